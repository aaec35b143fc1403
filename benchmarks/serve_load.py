"""`clipcap serve` under load: many concurrent clients (dynamic micro-batching) vs one request at a time, on the same
server in one run. Bounded: a fixed number of requests to 127.0.0.1, then the server is stopped.

    .venv/bin/python benchmarks/serve_load.py [--clients 32] [--requests 256] [--sequential 48] [--rounds 4]

The server is a real `clipcap serve` subprocess (uvicorn, default limits and batching settings) over a model dir
built in a temp dir with random weights: a GPT-2-shaped LM (4 layers, 384 hidden, 4096-token vocabulary) and a small
CLIP vision tower. The work per caption does not depend on the weights; the config has no stop token, so every
caption is exactly --tokens long on both sides. The client is this process (httpx, asyncio); each request carries one
PNG. Target: concurrent captions/s >= 4x sequential, zero errors.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from clipcap import ClipCapConfig, ClipCapModel

VOCAB = 4096


def make_model_dir(path: Path) -> Path:
    """A ClipCap model dir with random weights: GPT-2-shaped LM + tokenizer, MLP mapper, CLIP encoder under clip/."""
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(2, 9))) for _ in range(6000)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator([" ".join(words[i : i + 12]) for i in range(0, len(words), 12)] * 3, trainer)
    eos = "<|endoftext|>"
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=eos, pad_token=eos, bos_token=eos)

    torch.manual_seed(0)
    lm = GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=384, n_layer=4, n_head=6, eos_token_id=0)
    )
    clip = CLIPModel(
        CLIPConfig(
            text_config=dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1),
            vision_config=dict(
                hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, image_size=96
            ),
            projection_dim=256,
        )
    )
    config = ClipCapConfig(
        lm="random-gpt2", clip_model="clip", clip_dim=256, prefix_length=10, mapping="mlp", stop_token_id=None
    )
    ClipCapModel(config, lm=lm).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    clip.eval().save_pretrained(path / "clip")
    CLIPImageProcessor(size={"shortest_edge": 96}, crop_size={"height": 96, "width": 96}).save_pretrained(path / "clip")
    return path


def make_images(n: int) -> list[bytes]:
    rng = np.random.default_rng(1)
    out = []
    for _ in range(n):
        img = Image.new("RGB", (128, 128), tuple(int(c) for c in rng.integers(200, 256, 3)))
        x, y = (int(v) for v in rng.integers(10, 70, 2))
        img.paste(tuple(int(c) for c in rng.integers(0, 256, 3)), (x, y, x + 40, y + 40))
        buf = io.BytesIO()
        img.save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_ready(client: httpx.AsyncClient, server: subprocess.Popen, log: Path) -> None:
    for _ in range(1200):  # up to ~2 min to load the model and bind
        if server.poll() is not None:
            sys.exit(f"the server exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if (await client.get("/healthz")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.1)
    sys.exit(f"the server did not answer /healthz:\n{log.read_text()[-3000:]}")


async def one(client: httpx.AsyncClient, image: bytes, tokens: int) -> tuple[float, int]:
    start = time.perf_counter()
    r = await client.post(
        "/v1/captions", files=[("image", ("img.png", image, "image/png"))], data={"max_new_tokens": str(tokens)}
    )
    ok = r.status_code == 200 and len(r.json()["results"]) == 1
    return time.perf_counter() - start, 0 if ok else 1


async def sequential(client, images, n, tokens):
    results = [await one(client, images[i % len(images)], tokens) for i in range(n)]
    return results


async def concurrent(client, images, n, clients, tokens):
    async def worker(k: int):
        return [await one(client, images[(k + j) % len(images)], tokens) for j in range(k, n, clients)]

    return [r for rs in await asyncio.gather(*(worker(k) for k in range(clients))) for r in rs]


def summary(name: str, results: list[tuple[float, int]], wall: float) -> dict:
    latencies = sorted(t for t, _ in results)
    ok = len(results) - sum(e for _, e in results)
    row = dict(
        name=name,
        requests=len(results),
        errors=len(results) - ok,
        wall=wall,
        rate=ok / wall,
        p50=statistics.median(latencies) * 1000,
        p99=latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1000,
    )
    print(
        f"{name:<23} {row['requests']:>8} {row['errors']:>6} {wall:>8.1f} {row['rate']:>11.1f} "
        f"{row['p50']:>9.0f} {row['p99']:>9.0f}"
    )
    return row


async def main_async(args, model_dir: Path, log: Path) -> int:
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "clipcap.cli", "serve", "--model", str(model_dir), "--port", str(port)]
    command += ["--max-wait-ms", str(args.max_wait_ms)] if args.max_wait_ms is not None else []
    with open(log, "w") as log_file:
        server = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    images = make_images(16)
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=300, limits=limits) as client:
            await wait_ready(client, server, log)
            await sequential(client, images, 4, args.tokens)  # warm-up
            await concurrent(client, images, args.clients, args.clients, args.tokens)

            # Alternate the two sides in rounds, so both see the same background load on a shared machine.
            seq, conc, seq_wall, conc_wall, batches = [], [], 0.0, 0.0, 0
            for _ in range(args.rounds):
                start = time.perf_counter()
                seq += await sequential(client, images, args.sequential // args.rounds, args.tokens)
                seq_wall += time.perf_counter() - start
                before = (await client.get("/healthz")).json()["batches"]
                start = time.perf_counter()
                conc += await concurrent(client, images, args.requests // args.rounds, args.clients, args.tokens)
                conc_wall += time.perf_counter() - start
                batches += (await client.get("/healthz")).json()["batches"] - before
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"server: {' '.join(command[1:])}; {args.rounds} rounds of sequential then concurrent requests")
    print(f"{'':<23} {'requests':>8} {'errors':>6} {'wall s':>8} {'captions/s':>11} {'p50 ms':>9} {'p99 ms':>9}")
    seq = summary("sequential (1 client)", seq, seq_wall)
    conc = summary(f"concurrent ({args.clients} clients)", conc, conc_wall)
    ratio = conc["rate"] / seq["rate"]
    errors = seq["errors"] + conc["errors"]
    print(
        f"concurrent phase: {batches} generate runs, {conc['requests'] / max(batches, 1):.1f} images per run on average"
    )
    print(
        f"captions/s ratio concurrent / sequential: {ratio:.2f}x (target >= 4x: {'met' if ratio >= 4 else 'NOT met'})"
    )
    print(f"errors: {errors}")
    return 0 if errors == 0 and ratio >= 4 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (default: 32)")
    parser.add_argument("--requests", type=int, default=256, help="requests in the concurrent phase (default: 256)")
    parser.add_argument("--sequential", type=int, default=48, help="requests in the sequential phase (default: 48)")
    parser.add_argument("--tokens", type=int, default=20, help="caption length in tokens (default: 20)")
    parser.add_argument("--max-wait-ms", type=float, help="the server's batching wait (default: the server's, 10)")
    parser.add_argument("--rounds", type=int, default=4, help="sequential/concurrent alternations (default: 4)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model_dir(Path(tmp) / "model")
        print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads")
        return asyncio.run(main_async(args, model_dir, Path(tmp) / "server.log"))


if __name__ == "__main__":
    sys.exit(main())
