"""Quality of the exported CPU paths on the shapes world: each demo model captioned by PyTorch fp32, ONNX Runtime
fp32 and ONNX Runtime int8 (`clipcap export`, `--int8`) on the same stored CLIP embeddings (image tokens for a model
that reads them), greedy as the demo decodes. Prints the demo's colour-shape binding accuracy per backend and split,
and how often the fast paths agree with PyTorch fp32 (identical captions, tokens agreeing position by position).

    clipcap demo --quick --out demo-quick          # trains both variants (about 10 minutes on 2 idle cores)
    .venv/bin/python benchmarks/cpu_quality.py demo-quick [--splits test novel] [--threads 1]

Every `runs/*/final` model dir of the demo output is measured, on its embedding store (`store/`).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from clipcap import Captioner
from clipcap.data.store import EmbeddingStore
from clipcap.demo.runner import DemoRecipe
from clipcap.demo.world import binding_accuracy
from clipcap.export import export


def caption_ids(captioner: Captioner, embeds: torch.Tensor, max_new_tokens: int, batch: int = 256) -> torch.Tensor:
    chunks = [
        captioner.model.generate(embeds[i : i + batch], max_new_tokens=max_new_tokens)
        for i in range(0, len(embeds), batch)
    ]
    return torch.cat(chunks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("demo_out", type=Path, help="output dir of `clipcap demo` (with runs/*/final and store/)")
    parser.add_argument("--splits", nargs="+", default=["test", "novel"], help="store splits (default: test novel)")
    parser.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipe = DemoRecipe()
    print(f"greedy, at most {recipe.max_new_tokens} new tokens; {time.strftime('%Y-%m-%d %H:%M')}")
    tmp = Path(tempfile.mkdtemp(prefix="clipcap-quality-"))
    header = f"{'model':<20} {'split':<6} {'backend':<18} {'single':>7} {'objects':>8} {'exact':>6}"
    print(f"{header} {'same captions':>14} {'tokens agreeing':>16}")
    for model_dir in sorted(args.demo_out.glob("runs/*/final")):
        name = model_dir.parent.name
        backends = {"PyTorch fp32": model_dir}
        for label, int8 in (("ONNX Runtime fp32", False), ("ONNX Runtime int8", True)):
            backends[label] = export(model_dir, tmp / f"{name}-{label.split()[-1]}", int8=int8, progress=False)
        captioners = {label: Captioner.from_pretrained(path, device="cpu") for label, path in backends.items()}
        for split in args.splits:
            store = EmbeddingStore(args.demo_out / "store", split=split)
            rows = range(store.num_images)
            reads_tokens = captioners["PyTorch fp32"].model.config.token_shape is not None
            embeds = torch.from_numpy(
                store.image_tokens(rows) if reads_tokens else store.image_embeddings(rows)
            ).float()
            references = [store.image_captions(j) for j in range(store.num_images)]
            reference_ids = None
            for label, captioner in captioners.items():
                ids = caption_ids(captioner, embeds, recipe.max_new_tokens)
                captions = captioner.decode(ids)
                score = binding_accuracy(captions, references)
                if reference_ids is None:
                    reference_ids, reference_captions = ids, captions
                width = max(ids.shape[1], reference_ids.shape[1])
                padded = [torch.nn.functional.pad(t, (0, width - t.shape[1]), value=-1) for t in (ids, reference_ids)]
                tokens = (padded[0] == padded[1]).float().mean().item()
                same = sum(a == b for a, b in zip(captions, reference_captions, strict=True)) / len(captions)
                print(
                    f"{name:<20} {split:<6} {label:<18} {score['single']:>7.3f} {score['objects']:>8.3f} "
                    f"{score['images_exact']:>6.3f} {same:>14.1%} {tokens:>16.1%}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
