"""`clipcap caption --out` on the Ray engine vs the plain path vs torchrun, captions/s side by side in one run.

The job: an embedding store of N random 512-d vectors captioned by a GPT-2-small-shaped LM (12 layers, 768 wide,
50257 tokens, random weights; MLP mapper, prefix 10, no stop token, so every caption is exactly --tokens long and every
run does the same generation work), shards of --shard-size, batches of --batch-size, one torch thread per process.
Four runs of the real command, each a fresh process, timed from start to exit (loading the model, starting workers and
writing the shards included: what a user waits for):

1. the plain path: `clipcap caption STORE --model M --out D`, one process;
2. `--engine ray --ray-workers 1` and 3. `--ray-workers 2`, joining a local Ray cluster (2 CPUs) that this script
   starts once beforehand (a Ray cluster is running before jobs are sent to it; its start time is printed apart);
4. `torchrun --nproc_per_node 2 -m clipcap.cli caption ...`, two ranks.

Rounds alternate over the four; the median round is reported, with the overhead of the engine at one worker over the
plain path ((ray 1 s - plain s) / plain s). Both the wall time and the steady rate are given: the steady rate counts
the rows of every shard but the first written over the time from the first shard file to the last (their mtimes), so
it leaves out what a run pays once (Python and torch imports, one more in the Ray worker; loading the model; Ray Data
starting its actors). Every run's captions are checked equal to the plain path's.

    .venv/bin/python benchmarks/ray_engine.py [--images 96] [--tokens 12] [--batch-size 12] [--shard-size 12]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

VOCAB = 50257
CLIP_DIM = 512


def make_model(root: Path) -> Path:
    """A ClipCap dir with a GPT-2-small-shaped random LM and a word-level tokenizer of GPT-2's size."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from clipcap import ClipCapConfig, ClipCapModel

    eos = "<|endoftext|>"
    tok = Tokenizer(models.WordLevel({**{f"w{i}": i for i in range(VOCAB - 1)}, eos: VOCAB - 1}, unk_token=eos))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=eos)
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB)).eval()
    config = ClipCapConfig(
        lm="gpt2-small-shaped-random", clip_model="clip", clip_dim=CLIP_DIM, prefix_length=10, mapping="mlp",
        stop_token_id=None,
    )  # fmt: skip
    path = root / "model"
    ClipCapModel(config, lm=lm).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_store(root: Path, n: int) -> Path:
    from clipcap.data.store import StoreWriter

    rng = np.random.default_rng(0)
    with StoreWriter(root / "store", clip_model="clip", clip_dim=CLIP_DIM, normalized=False) as writer:
        for i in range(n):
            writer.add(rng.normal(size=CLIP_DIM).astype(np.float32), f"img{i}", [f"w{i}"])
    return root / "store"


def captions(out: Path) -> list:
    import pyarrow.parquet as pq

    return [
        (row["key"], row["caption"])
        for path in sorted((out / "captions").glob("part-*.parquet"))
        for row in pq.read_table(path).to_pylist()
    ]


def steady_rate(out: Path) -> float:
    """Captions/s between the first shard file written and the last (rows of all but the first over that time)."""
    import pyarrow.parquet as pq

    shards = sorted((p.stat().st_mtime, pq.read_metadata(p).num_rows) for p in (out / "captions").glob("*.parquet"))
    return sum(rows for _, rows in shards[1:]) / (shards[-1][0] - shards[0][0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=96, help="stored embeddings captioned per run")
    parser.add_argument("--tokens", type=int, default=12, help="tokens per caption")
    parser.add_argument("--batch-size", type=int, default=12)
    parser.add_argument("--shard-size", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    os.environ.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")  # before Ray starts: its workers inherit them
    import ray

    tmp = Path(tempfile.mkdtemp(prefix="clipcap-ray-engine-"))
    try:
        model, store = make_model(tmp), make_store(tmp, args.images)
        started = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        cluster_s = time.perf_counter() - started
        address = ray.get_runtime_context().gcs_address
        common = [str(store), "--model", str(model), "--max-new-tokens", str(args.tokens), "--quiet"]
        common += ["--batch-size", str(args.batch_size), "--shard-size", str(args.shard_size), "--device", "cpu"]
        cli = [sys.executable, "-m", "clipcap.cli", "caption"]
        ray_args = ["--engine", "ray", "--ray-address", address]
        runs = {
            "plain path, 1 process": (cli, []),
            "ray engine, 1 worker": (cli, [*ray_args, "--ray-workers", "1"]),
            "ray engine, 2 workers": (cli, [*ray_args, "--ray-workers", "2"]),
            "torchrun, 2 ranks": (
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m"]
                + ["clipcap.cli", "caption"],
                [],
            ),
        }
        seconds: dict[str, list[float]] = {name: [] for name in runs}
        steady: dict[str, list[float]] = {name: [] for name in runs}
        reference = None
        for round_ in range(args.rounds):
            for name, (command, extra) in runs.items():
                out = tmp / f"out-{round_}-{len(seconds[name])}-{name.split(',')[0].replace(' ', '-')}"
                start = time.perf_counter()
                done = subprocess.run([*command, *common, "--out", str(out), *extra], capture_output=True, text=True)
                seconds[name].append(time.perf_counter() - start)
                if done.returncode != 0:
                    raise SystemExit(f"{name}: exit {done.returncode}\n{done.stderr[-3000:]}")
                got = captions(out)
                reference = reference if reference is not None else got
                assert got == reference and len(got) == args.images, f"{name}: captions differ from the plain path"
                steady[name].append(steady_rate(out))
                shutil.rmtree(out)
        ray.shutdown()
        import torch

        print(
            f"{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"ray {ray.__version__}; {args.images} stored embeddings, GPT-2-small-shaped LM (random), "
            f"{args.tokens} tokens each, batch "
            f"{args.batch_size}, shards of {args.shard_size}, 1 torch thread per process, {args.rounds} round(s) "
            "(median); seconds from command start to exit"
        )
        plain = statistics.median(seconds["plain path, 1 process"])
        plain_rate = statistics.median(steady["plain path, 1 process"])
        for name in runs:
            s, rate = statistics.median(seconds[name]), statistics.median(steady[name])
            print(
                f"  {name:<24} {args.images / s:7.2f} captions/s  {s:6.1f} s  speedup {plain / s:.2f}   "
                f"steady {rate:7.2f} captions/s  speedup {rate / plain_rate:.2f}"
            )
        one = statistics.median(seconds["ray engine, 1 worker"])
        one_rate = statistics.median(steady["ray engine, 1 worker"])
        print(
            "  engine overhead at 1 worker vs the plain path (target <= 15 %): "
            f"wall {100 * (one - plain) / plain:+.1f} % ({one - plain:+.1f} s), "
            f"steady rate {100 * (plain_rate / one_rate - 1):+.1f} %"
        )
        print(f"  (starting the local Ray cluster, done once before the runs: {cluster_s:.1f} s)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
