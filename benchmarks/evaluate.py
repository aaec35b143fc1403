"""Scoring cost of `clipcap evaluate`, and per-domain (nocaps-style) scoring: clipcap's `compute_scores(...,
subsets=domains)` (PTB-tokenize once, one METEOR JVM for every run) vs scoring the whole set and each domain as
separate coco-caption runs (a fresh tokenizer and METEOR JVM each time, as a script calling pycocoevalcap per subset
does). Both sides must give identical numbers.

    .venv/bin/python benchmarks/evaluate.py [--images 5000] [--domains 3]

Captions come from the shapes world (5 references per image, as COCO; the prediction is a sixth caption of the same
scene), so the text lengths are caption-like; no model is involved.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from clipcap import metrics as ev
from clipcap.demo.world import captions, sample_scene


def corpus(n: int, seed: int = 0) -> tuple[dict[str, str], dict[str, list[str]]]:
    rng = np.random.default_rng(seed)
    predictions, references = {}, {}
    for i in range(n):
        texts = captions(sample_scene(rng), rng, n=6)
        references[str(i)], predictions[str(i)] = texts[:5], texts[-1]
    return predictions, references


def separate_runs(predictions, references, subsets) -> dict[str, dict[str, float]]:
    out = {}
    for name, ids in {"overall": list(predictions), **subsets}.items():
        ev._meteor.cache_clear()  # a fresh METEOR JVM, as a separate pycocoevalcap run has
        out[name] = ev.compute_scores({i: predictions[i] for i in ids}, references, spice=False).metrics
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000, help="images to score (default: 5000, COCO test)")
    parser.add_argument("--domains", type=int, default=3, help="subsets, like nocaps' in/near/out (default: 3)")
    args = parser.parse_args()
    if ev.java_problem():
        raise SystemExit(f"this benchmark measures the Java scorers: {ev.java_problem()}")
    predictions, references = corpus(args.images)
    ids = list(predictions)
    subsets = {f"domain-{d}": ids[d :: args.domains] for d in range(args.domains)}

    ev._meteor.cache_clear()
    start = time.perf_counter()
    one = ev.compute_scores(predictions, references, spice=False)
    single = time.perf_counter() - start
    print(f"one coco-caption run, {args.images} images x 5 refs (PTB, BLEU, METEOR, ROUGE-L, CIDEr): {single:.1f} s")
    print(f"  {args.images / single:.0f} images/s; CIDEr {one.metrics['CIDEr']:.4f}")

    ev._meteor.cache_clear()
    start = time.perf_counter()
    shared = ev.compute_scores(predictions, references, spice=False, subsets=subsets)
    shared_s = time.perf_counter() - start
    start = time.perf_counter()
    separate = separate_runs(predictions, references, subsets)
    separate_s = time.perf_counter() - start
    assert separate["overall"] == shared.metrics, "overall scores differ"
    for name in subsets:
        assert separate[name] == shared.subsets[name].metrics, f"{name} scores differ"
    print(f"overall + {args.domains} domains, separate runs:          {separate_s:.1f} s")
    print(f"overall + {args.domains} domains, shared tokenize + JVM:  {shared_s:.1f} s")
    print(f"ratio separate / shared: {separate_s / shared_s:.2f}x (identical scores)")


if __name__ == "__main__":
    main()
