"""`clipcap embed` throughput and the training-side memory of reading a store.

1. Extraction: img/s of the whole `embed()` call (reading the source, decoding JPEGs in DataLoader workers,
   preprocessing, encoding, writing float16 shards) vs img/s of the encoder's forward pass alone on the same images,
   already decoded and preprocessed into the same batches. Target: ratio >= 0.8 on CPU.
2. Memory: RSS (heap and file-backed) of a fresh process that iterates every (embedding, caption) pair of a
   synthetic 1 M-row store through a DataLoader (batch 40, shuffled), sampled as it goes. Target: < 1 GiB and flat.

Random-weight encoder with the ViT-B/32 shape (no download needed):
    .venv/bin/python benchmarks/embed.py [--images 256] [--rows 1000000]
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clipcap.data.store import StoreWriter
from clipcap.embed import EmbedConfig, embed
from clipcap.encoder import ImageEncoder


def make_encoder_dir(path: Path, small: bool) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    width, layers = (384, 6) if small else (768, 12)
    config = CLIPConfig(
        text_config=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=1, num_attention_heads=8),
        vision_config=dict(
            hidden_size=width,
            intermediate_size=4 * width,
            num_hidden_layers=layers,
            num_attention_heads=12 if not small else 6,
            image_size=224,
            patch_size=32,
        ),
        projection_dim=512,
    )
    CLIPModel(config).eval().save_pretrained(path)
    CLIPImageProcessor().save_pretrained(path)  # the openai/clip-vit-base-patch32 preprocessing
    return path


def make_images(root: Path, n: int, size: int) -> None:
    """JPEGs with smooth content (compress like photos, unlike noise) and a sidecar caption each."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        a, b, c = rng.uniform(0, 6, 3)
        img = np.stack([np.sin(a * xx + b * yy + c * k) for k in range(3)], -1) * 120 + 128
        buf = io.BytesIO()
        Image.fromarray(img.astype(np.uint8)).save(buf, "JPEG", quality=90)
        (root / f"{i:06d}.jpg").write_bytes(buf.getvalue())
        (root / f"{i:06d}.txt").write_text(f"image number {i}.")


def bench_extraction(args, tmp: Path) -> None:
    clip = make_encoder_dir(tmp / "clip", args.small)
    make_images(tmp / "images", args.images, args.size)
    encoder = ImageEncoder.from_pretrained(clip)
    paths = sorted((tmp / "images").glob("*.jpg"))
    batches = [
        encoder.preprocess([Image.open(p).convert("RGB") for p in paths[i : i + args.batch_size]])
        for i in range(0, len(paths), args.batch_size)
    ]
    encoder.encode_pixels(batches[0])  # warm-up, both sides
    common = dict(clip_model=str(clip), batch_size=args.batch_size, workers=args.workers)
    embed(EmbedConfig(source=str(tmp / "images"), out=str(tmp / "warm"), **common))

    start = time.perf_counter()
    for pixels in batches:
        encoder.encode_pixels(pixels)
    forward = len(paths) / (time.perf_counter() - start)

    start = time.perf_counter()
    embed(EmbedConfig(source=str(tmp / "images"), out=str(tmp / "store"), **common))
    full = len(paths) / (time.perf_counter() - start)
    info = json.loads((tmp / "store" / "info.json").read_text())
    assert info["num_images"] == len(paths)
    print(
        f"extraction: {len(paths)} {args.size}px JPEGs, {'small' if args.small else 'ViT-B/32-shaped'} random encoder, "
        f"batch {args.batch_size}, {args.workers} workers, {torch.get_num_threads()} torch threads"
    )
    print(f"  encoder forward only (pre-decoded batches): {forward:8.1f} img/s")
    print(f"  clipcap embed (decode + encode + write):    {full:8.1f} img/s")
    print(f"  ratio embed / forward-only: {full / forward:.2f}  (target >= 0.8)")


READER = """
import sys, time, torch
from clipcap.data.store import EmbeddingStore

def rss():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return [int(fields[k].split()[0]) / 2**20 for k in ("VmRSS", "RssAnon", "RssFile")]

print("imports", 0, *rss(), flush=True)
store = EmbeddingStore(sys.argv[1])
print("opened", len(store), *rss(), flush=True)
loader = torch.utils.data.DataLoader(store, batch_size=40, shuffle=True, num_workers=0)
seen, start = 0, time.perf_counter()
for n, (emb, caps) in enumerate(loader):
    seen += len(caps)
    if n % 2500 == 0:
        print("sample", seen, *rss(), flush=True)
print("done", seen, *rss(), time.perf_counter() - start, flush=True)
"""


def bench_memory(args, tmp: Path) -> None:
    dim, shard = 512, 100_000
    w = StoreWriter(tmp / "big", clip_model="synthetic", clip_dim=dim, normalized=True, shard_size=shard)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for s in range(0, args.rows, shard):
        n = min(shard, args.rows - s)
        emb = rng.standard_normal((n, dim), dtype=np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        keys = [str(s + i) for i in range(n)]
        w.write_shard(s // shard, emb, keys, [[f"synthetic caption number {s + i}."] for i in range(n)])
    w.finalize((args.rows + shard - 1) // shard)
    print(f"memory: wrote a {args.rows:,}-row {dim}-d store in {time.perf_counter() - start:.0f} s")
    out = subprocess.run([sys.executable, "-c", READER, str(tmp / "big")], capture_output=True, text=True, check=True)
    samples = [line.split() for line in out.stdout.splitlines()]
    rss = [float(s[2]) for s in samples]
    anon = [float(s[3]) for s in samples]
    file_backed = [float(s[4]) for s in samples]
    done = samples[-1]
    print(f"  iterated {int(done[1]):,} pairs (DataLoader batch 40, shuffled) in {float(done[5]):.0f} s")
    print(f"  RSS after importing torch + pyarrow: {rss[0]:.3f} GiB; after opening the store: {rss[1]:.3f} GiB")
    print(f"  RSS peak while iterating: {max(rss):.3f} GiB, last {rss[-1]:.3f} GiB (target < 1 GiB)")
    print(f"    of which anonymous (heap): opened {anon[1]:.3f}, peak {max(anon):.3f}, last {anon[-1]:.3f} GiB")
    print(
        f"    of which file-backed (shared libraries; store rows are read, not mapped): peak {max(file_backed):.3f} GiB"
    )
    mid = len(anon) // 2
    print(f"  heap growth over the second half of the epoch: {(anon[-1] - anon[mid]) * 1024:.1f} MiB (flat = ~0)")


def main() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=256, help="images for the extraction benchmark")
    p.add_argument("--size", type=int, default=320, help="JPEG side in pixels")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--small", action="store_true", help="a smaller random encoder (faster run)")
    p.add_argument("--rows", type=int, default=1_000_000, help="rows of the synthetic store for the memory benchmark")
    p.add_argument("--skip", choices=["extraction", "memory"], help="leave one benchmark out")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.skip != "extraction":
            bench_extraction(args, Path(tmp))
        if args.skip != "memory":
            bench_memory(args, Path(tmp))


if __name__ == "__main__":
    main()
