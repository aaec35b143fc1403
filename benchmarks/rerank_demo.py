"""Candidates and CLIP reranking on the demo's two models, over the two-object scenes of the test and novel splits.

    .venv/bin/python benchmarks/rerank_demo.py DIR [--train] [--only VARIANT] [--candidates 8] [--splits test,novel]
        [--limit N] [--json OUT]

DIR is a `clipcap demo --out DIR` output (its store/ and runs/<variant>/). `--train` first trains the demo's
variants that DIR/runs lacks, with the demo's own recipe (`demo.runner.train_variant`), on DIR/store. Then, per
model and split: objects exact (pairs_exact) and relation right, scored by the demo world's own functions
(`world.relation_accuracy`), for greedy, beam 3, and 8 candidates (beam search's 8 best; 8 samples) kept by the
search (none), by CLIPScore (clip), by CLIPScore + w x mean token log-probability, and the oracle (the best
candidate in the list: any candidate right). Each list is generated once and every choice made on it. Writes the
table as markdown to stdout and DIR/rerank_table.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from clipcap.captioner import Captioner
from clipcap.data.store import EmbeddingStore
from clipcap.decoding import generate_kwargs
from clipcap.demo import world
from clipcap.demo.encoders import ASSETS
from clipcap.demo.runner import DemoRecipe, train_variant
from clipcap.rerank import choose, score_embeddings

WEIGHTS = (0.25, 1.0)
CANDIDATES = 8
TOKENS = 24


def model_dirs(out: Path, train: bool) -> dict[str, Path]:
    found = {}
    # The Transformer + frozen LM first: it is the model the target is about, and the quicker to train.
    for v in sorted(DemoRecipe().variants, key=lambda v: v.tune_lm):
        run = out / "runs" / v.name
        done = next((run / d for d in ("best", "final") if (run / d / "config.json").is_file()), None)
        if done is None and train:
            start = time.perf_counter()
            done = train_variant(v, out / "store", ASSETS / "lm", run, DemoRecipe().seed, progress=True)
            print(f"trained {v.title} in {time.perf_counter() - start:.0f} s", flush=True)
        if done is not None:
            found[v.title] = done
    return found


def two_object_rows(store: EmbeddingStore, limit: int | None) -> tuple[list[int], list[list[str]]]:
    rows, refs = [], []
    for j in range(store.num_images):
        captions = store.image_captions(j)
        if len(world.read_caption(captions[0]).objects) == 2:
            rows.append(j)
            refs.append(captions)
    return rows[:limit], refs[:limit]


def scores(predictions: list[str], references: list[list[str]]) -> dict:
    r = world.relation_accuracy(predictions, references)
    return {"objects_exact": r["pairs_exact"], "relation_right": r["relation_right"]}


def oracle(lists: list[list[str]], references: list[list[str]]) -> dict:
    exact = right = 0
    for candidates, refs in zip(lists, references, strict=True):
        each = [scores([c], [refs]) for c in candidates]
        exact += any(s["objects_exact"] for s in each)
        right += any(s["relation_right"] for s in each)
    return {"objects_exact": exact / len(lists), "relation_right": right / len(lists)}


def measure(model: Path, store_dir: Path, split: str, limit: int | None, n: int = CANDIDATES, batch: int = 64) -> list:
    captioner = Captioner.from_pretrained(model, batch_size=batch)
    store = EmbeddingStore(store_dir, split=split)
    rows, refs = two_object_rows(store, limit)
    reads_tokens = captioner.model.config.token_shape is not None
    out = []

    def run(name: str, candidates: int, **options) -> list:
        torch.manual_seed(0)
        decoding = generate_kwargs(defaults={}, max_new_tokens=TOKENS, **options)
        kept, start = [], time.perf_counter()
        for i in range(0, len(rows), batch):
            idx = rows[i : i + batch]
            pooled = torch.from_numpy(store.image_embeddings(idx))
            inputs = torch.from_numpy(store.image_tokens(idx)) if reads_tokens else pooled
            kept += score_embeddings(captioner, inputs, pooled, decoding, candidates, keep_order=True)
        print(f"  {split} {name}: {len(rows)} images in {time.perf_counter() - start:.0f} s", flush=True)
        return kept

    for name, options in (("greedy", {"num_beams": 1}), ("beam 3", {"num_beams": 3})):
        kept = run(name, 1, **options)
        out.append({"decoding": name, **scores([s.caption for s in kept], refs)})
    for name, options in (
        (f"beam {n}, {n} best", {"num_beams": n}),
        (f"{n} samples", {"num_beams": 1, "do_sample": True}),
    ):
        lists = [s.candidates for s in run(name, n, **options)]
        picks = {"none": [choose(c, "none") for c in lists], "clip": [choose(c, "clip") for c in lists]}
        picks |= {f"clip + {w:g} logprob": [choose(c, "clip", w) for c in lists] for w in WEIGHTS}
        for rerank, kept in picks.items():
            out.append({"decoding": f"{name}, rerank {rerank}", **scores([s.caption for s in kept], refs)})
        out.append({"decoding": f"{name}, oracle", **oracle([[c.caption for c in cands] for cands in lists], refs)})
    for row in out:
        row.update(split=split, images=len(rows))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--train", action="store_true")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--only", default=None, help="only the variant whose name (runs/NAME) this is")
    parser.add_argument("--candidates", type=int, default=CANDIDATES)
    parser.add_argument("--splits", default="test,novel")
    parser.add_argument("--json", type=Path, default=None, help="where the table goes (default DIR/rerank_table.json)")
    args = parser.parse_args()
    results = {}
    for title, model in model_dirs(args.dir, args.train).items():
        if args.only is not None and model.parent.name != args.only:
            continue
        print(f"{title}: {model}", flush=True)
        splits = args.splits.split(",")
        results[title] = [
            row for s in splits for row in measure(model, args.dir / "store", s, args.limit, args.candidates)
        ]
    (args.json or args.dir / "rerank_table.json").write_text(json.dumps(results, indent=2) + "\n")
    print("| model | split | decoding | objects exact | relation right |\n|---|---|---|---|---|")
    for title, rows in results.items():
        for r in rows:
            scores = f"{r['objects_exact']:.3f} | {r['relation_right']:.3f}"
            print(f"| {title} | {r['split']} | {r['decoding']} | {scores} |")


if __name__ == "__main__":
    main()
