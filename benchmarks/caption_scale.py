"""`clipcap caption --out` at dataset scale: captions/s from an embedding store vs from the same images, and
2 processes (torchrun) vs 1 process, measured side by side in one run.

1. Store vs images: the same model and decoding caption N JPEGs through the image path (DataLoader workers decode
   and preprocess, the encoder runs, then generation) and the store `embed` made of them (stored vectors straight to
   generation: no image I/O, no encoder). Rounds alternate between the two; the median round is reported.
2. Scaling: the store job run by `torchrun --nproc_per_node 2` (one thread each) vs one process with one thread and
   with two. Every process loads and waits at a start line, so the seconds compared are captioning, not Python and
   torch starting (which the command's wall time adds once per process; it is printed too).

The model: the shipped shapes-world encoders (CLIP 40 px, 128-d; GPT-2 4 layers) with a fresh MLP mapper and no stop
token, so every caption is exactly --tokens long and both sides do the same generation work.

    .venv/bin/python benchmarks/caption_scale.py [--images 256] [--tokens 20] [--batch-size 64] [--rounds 3]

Each job's time includes loading the model (and, on the image side, the encoder) and writing its shards: what a
user waits for; small --images lets those fixed costs dominate.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ASSETS = Path(__file__).resolve().parents[1] / "src" / "clipcap" / "demo" / "assets" / "shapes"


def make_model(path: Path) -> Path:
    import torch

    from clipcap import ClipCapConfig, ClipCapModel
    from clipcap.hub import load_tokenizer

    torch.manual_seed(0)
    config = ClipCapConfig(
        lm=str(ASSETS / "lm"), clip_model=str(ASSETS / "clip"), clip_dim=128, prefix_length=10, mapping="mlp"
    )
    ClipCapModel(config).save_pretrained(path)
    load_tokenizer(ASSETS / "lm").save_pretrained(path)
    return path


def make_images(root: Path, n: int, size: int) -> Path:
    """Smooth JPEGs (they compress like photos) listed in a JSONL source."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    rows = []
    for i in range(n):
        a, b, c = rng.uniform(0, 6, 3)
        img = np.stack([np.sin(a * xx + b * yy + c * k) for k in range(3)], -1) * 120 + 128
        buf = io.BytesIO()
        Image.fromarray(img.astype(np.uint8)).save(buf, "JPEG", quality=90)
        (root / f"{i:06d}.jpg").write_bytes(buf.getvalue())
        rows.append(json.dumps({"image": f"{i:06d}.jpg", "caption": "x."}))
    (root / "list.jsonl").write_text("\n".join(rows) + "\n")
    return root / "list.jsonl"


def job(inputs: str, model: Path, out: Path, args, workers: int):
    from clipcap.caption_job import CaptionJobConfig

    return CaptionJobConfig(
        inputs=[inputs],
        model=str(model),
        out=str(out),
        max_new_tokens=args.tokens,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        workers=workers,
        device="cpu",
    )


def store_vs_images(args, tmp: Path, model: Path, source: Path, store: Path) -> None:
    from clipcap.caption_job import caption_job

    def timed(inputs: str, name: str, workers: int) -> float:
        out = tmp / name
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        info = caption_job(job(inputs, model, out, args, workers)).info
        seconds = time.perf_counter() - start
        assert info["num_captioned"] == args.images, info
        return args.images / seconds

    images_dir = str(source.parent)
    timed(str(store), "warm", 0)  # first loads and imports, on neither side
    rates: dict[str, list[float]] = {"images": [], "store": []}
    for _ in range(args.rounds):
        rates["images"].append(timed(images_dir, "from-images", args.workers))
        rates["store"].append(timed(str(store), "from-store", 0))
    img, sto = statistics.median(rates["images"]), statistics.median(rates["store"])
    print(
        f"store vs images: {args.images} {args.size}px JPEGs, batch {args.batch_size}, {args.tokens} tokens each, "
        f"{args.workers} decoding workers on the image side, {args.threads} torch thread(s), {args.rounds} alternating "
        "rounds (median)"
    )
    print(f"  from images (decode + encode + generate): {img:8.1f} captions/s  {fmt(rates['images'])}")
    print(f"  from the store (vectors + generate):      {sto:8.1f} captions/s  {fmt(rates['store'])}")
    print(f"  ratio store / images: {sto / img:.2f}")


def fmt(values: list[float]) -> str:
    return "(" + ", ".join(f"{v:.1f}" for v in values) + ")"


WORKER = "worker"


def worker(args) -> None:
    """One process of the scaling run: load, say ready, wait at the start line, caption its shards, say done."""
    from clipcap.caption_job import caption_job
    from clipcap.jobs import rank_and_world

    rank, _ = rank_and_world()
    sync = Path(args.sync)
    cfg = job(args.store, Path(args.model), Path(args.out), args, 0)
    import clipcap.captioner  # noqa: F401 - the model code is imported before the start line

    (sync / f"ready-{rank}").write_text("")
    while not (sync / "go").exists():
        time.sleep(0.01)
    caption_job(cfg)
    (sync / f"done-{rank}").write_text(str(time.time()))


def scaling(args, tmp: Path, model: Path, store: Path) -> None:
    me = [str(Path(__file__).resolve()), WORKER, "--store", str(store), "--model", str(model)]
    me += ["--tokens", str(args.tokens), "--batch-size", str(args.batch_size), "--shard-size", str(args.shard_size)]
    runs = {
        "1 process, 1 thread": (1, 1),
        "1 process, 2 threads": (1, 2),
        "2 processes (torchrun), 1 thread each": (2, 1),
    }
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    walls: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(args.rounds):
        for name, (procs, threads) in runs.items():
            sync, out = tmp / f"sync-{round_}-{procs}-{threads}", tmp / f"scale-{round_}-{procs}-{threads}"
            sync.mkdir()
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
            torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
            command = [*(torchrun if procs > 1 else [sys.executable]), *me, "--sync", str(sync), "--out", str(out)]
            started = time.perf_counter()
            proc = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
            while len(list(sync.glob("ready-*"))) < procs:
                if proc.poll() is not None:
                    raise SystemExit(f"{name}: exited with {proc.returncode} before starting")
                time.sleep(0.01)
            go = time.time()
            (sync / "go").write_text("")
            if proc.wait() != 0:
                raise SystemExit(f"{name}: exited with {proc.returncode}")
            walls[name].append(time.perf_counter() - started)
            seconds[name].append(max(float(p.read_text()) for p in sync.glob("done-*")) - go)
            info = json.loads((out / "info.json").read_text())
            assert info["num_captioned"] == args.images, info
    base = statistics.median(seconds["1 process, 1 thread"])
    print(
        f"scaling: the store job ({args.images} embeddings, batch {args.batch_size}, shards of {args.shard_size}), "
        f"{args.rounds} rounds (median); captioning seconds from the start line, and the command's wall time"
    )
    for name in runs:
        s = statistics.median(seconds[name])
        print(
            f"  {name:<38} {args.images / s:8.1f} captions/s  speedup {base / s:.2f}  "
            f"(wall {statistics.median(walls[name]):.1f} s with start-up)"
        )
    two, one = statistics.median(seconds[list(runs)[2]]), statistics.median(seconds[list(runs)[1]])
    print(f"  2 processes vs 1 process with both threads: {one / two:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", choices=[WORKER], help=argparse.SUPPRESS)
    parser.add_argument("--images", type=int, default=256, help="images (and stored embeddings) captioned")
    parser.add_argument("--size", type=int, default=256, help="JPEG side in pixels")
    parser.add_argument("--tokens", type=int, default=20, help="tokens per caption")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="decoding workers on the image side")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the store vs images part")
    for name in ("--store", "--model", "--out", "--sync"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode == WORKER:
        worker(args)
        return
    import torch

    from clipcap.embed import EmbedConfig, embed

    torch.set_num_threads(args.threads)
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    tmp = Path(tempfile.mkdtemp(prefix="clipcap-caption-scale-"))
    try:
        model = make_model(tmp / "model")
        source = make_images(tmp / "images", args.images, args.size)
        store = tmp / "store"
        embed(EmbedConfig(source=str(source), out=str(store), clip_model=str(ASSETS / "clip"), workers=0))
        store_vs_images(args, tmp, model, source, store)
        scaling(args, tmp, model, store)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
