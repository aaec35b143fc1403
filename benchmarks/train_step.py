"""Training throughput: our training step (clipcap.train: captions padded per batch to the batch's longest) vs an
original-style step (rmokady/CLIP_prefix_caption train.py: every caption padded to one global length,
min(mean + 10·std, max) of all caption lengths, fp32, cross-entropy with ignore_index=0), at equal batch, on the
same data and the same initial weights. Also checks that both give the same loss on the same batch, and reports each
side's peak RSS.

    .venv/bin/python benchmarks/train_step.py [--layers 4] [--batch-size 40] [--steps 6] [--threads 1]

Random weights with GPT-2-small's width and vocabulary (768, 50257) and --layers blocks; MLP mapper, k = 10, tuned
LM (the paper's MLP setting), CPU. Captions are random word sequences with COCO-like lengths (mean ≈ 11.5 tokens,
std ≈ 2.9, plus a thin tail of long captions), one word = one token. Throughput: both sides in one process,
alternating step by step on the same batches, so they share whatever background load the machine has. Peak RSS and
the same-batch loss: each side alone in its own process.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

K = 10
CLIP_DIM = 512
VOCAB = 50257


def caption_lengths(n: int, rng: np.random.Generator) -> np.ndarray:
    """COCO-like caption lengths in tokens (the final '.' included)."""
    lengths = np.rint(rng.lognormal(np.log(11.2), 0.22, size=n)).clip(7, 30)
    tail = rng.random(n) < 0.003  # COCO has a few run-on captions
    lengths[tail] = rng.integers(25, 55, size=tail.sum())
    return lengths.astype(int)


def make_assets(root: Path, layers: int, images: int, seed: int = 0) -> np.ndarray:
    """A word-level tokenizer (w1..w50255, end token 50256 as in GPT-2), a GPT-2-shaped LM dir, and a store of 5
    captions per image. Returns the caption lengths in tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from clipcap.data.store import StoreWriter

    eos = "<|endoftext|>"
    tok = Tokenizer(models.WordLevel({**{f"w{i}": i for i in range(VOCAB - 1)}, eos: VOCAB - 1}, unk_token=eos))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=eos)
    torch.manual_seed(seed)
    # No dropout, so both sides' first training step sees the same function and their losses compare exactly.
    config = GPT2Config(vocab_size=VOCAB, n_layer=layers, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    GPT2LMHeadModel(config).save_pretrained(root / "lm")
    tokenizer.save_pretrained(root / "lm")
    rng = np.random.default_rng(seed)
    lengths = caption_lengths(images * 5, rng)
    with StoreWriter(root / "store", clip_model="clip", clip_dim=CLIP_DIM, normalized=False) as writer:
        for j in range(images):
            # length - 1 words (never token 0, the original's padding id); our side appends the end token, which
            # plays the original's final "." here
            caps = [
                " ".join(f"w{t}" for t in rng.integers(1, VOCAB - 1, size=n - 1)) for n in lengths[5 * j : 5 * j + 5]
            ]
            writer.add(rng.normal(size=CLIP_DIM), f"img{j}", caps)
    return lengths


def original_step(trainer, max_len: int):
    """The original train.py inner loop on the trainer's model: fixed-length batches, fp32, and an AdamW that
    updates parameter by parameter (as transformers.AdamW, which the original used, did)."""
    from transformers import get_linear_schedule_with_warmup

    pairs, model = trainer.pairs, trainer.model
    optimizer = torch.optim.AdamW(trainer._param_groups(), lr=trainer.cfg.lr, foreach=False)
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, trainer.total_steps)

    def step(micro_batches):
        (rows,) = micro_batches
        tokens = torch.zeros(len(rows), max_len, dtype=torch.long)
        for n, r in enumerate(rows):
            ids = torch.as_tensor(pairs.token_ids(int(r))[:max_len], dtype=torch.long)
            tokens[n, : len(ids)] = ids
        mask = torch.cat((torch.ones(len(rows), K), (tokens > 0).float()), dim=1)
        prefix = torch.from_numpy(pairs.store.image_embeddings([int(pairs.image[r]) for r in rows]))
        model.train()
        embeds = torch.cat((model.prefix(prefix), model.lm.get_input_embeddings()(tokens)), dim=1)
        logits = model.lm(inputs_embeds=embeds, attention_mask=mask).logits[:, K - 1 : -1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.flatten(), ignore_index=0)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        return loss.item(), None

    return step


def make_side(side: str, root: Path, batch_size: int):
    """A trainer on the store (same seed, so the same initial weights on both sides) and that side's step function."""
    from clipcap.train import TrainConfig, Trainer

    cfg = TrainConfig(
        data=str(root / "store"),
        out=str(root / f"run-{side}"),
        lm=str(root / "lm"),
        batch_size=batch_size,
        warmup_steps=0,
        mixed_precision="no",
        num_samples=0,
    )
    trainer = Trainer(cfg)
    lengths = np.diff(trainer.pairs.offsets)
    # The original dataset: max_seq_len = min(int(mean + 10 * std), max); every caption padded (or cut) to it.
    global_len = min(int(lengths.mean() + lengths.std() * 10), int(lengths.max()))
    if side == "ours":
        return trainer, trainer.train_step, lambda rows: K + int(max(lengths[r] for r in rows))
    return trainer, original_step(trainer, global_len), lambda rows: K + global_len


def run_memory(side: str, root: Path, batch_size: int) -> dict:
    """One side alone in this process: its first step (the loss on batch 0) and its peak RSS after two steps."""
    trainer, step, _ = make_side(side, root, batch_size)
    plan = trainer.epoch_steps(0)
    first_loss = step(plan[0])[0]
    step(plan[1])
    return {"first_loss": first_loss, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_speed(root: Path, batch_size: int, steps: int) -> dict:
    """Both sides in one process, alternating step by step on the same batches, so background load hits both."""
    sides = {side: make_side(side, root, batch_size) for side in ("ours", "original")}
    plan = sides["ours"][0].epoch_steps(0)[: steps + 1]
    seconds = {side: 0.0 for side in sides}
    length = {side: [] for side in sides}
    for i, micro_batches in enumerate(plan):
        for side, (_, step, padded) in sides.items():
            start = time.perf_counter()
            step(micro_batches)
            if i:  # the first step of each side is a warm-up
                seconds[side] += time.perf_counter() - start
                length[side].append(padded(micro_batches[0]))
    return {
        side: {"samples_per_s": steps * batch_size / seconds[side], "sequence_length": float(np.mean(length[side]))}
        for side in sides
    }


def child(args, *extra) -> dict:
    cmd = [sys.executable, __file__, "--root", args.root, "--batch-size", str(args.batch_size)]
    cmd += ["--steps", str(args.steps), "--threads", str(args.threads), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(extra)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4, help="GPT-2 blocks (GPT-2 small has 12)")
    parser.add_argument("--batch-size", type=int, default=40)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per side")
    parser.add_argument("--images", type=int, default=2000, help="store size (5 captions per image)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier on a busy machine)")
    parser.add_argument("--memory", choices=["ours", "original"], help=argparse.SUPPRESS)
    parser.add_argument("--speed", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory:
        print(json.dumps(run_memory(args.memory, Path(args.root), args.batch_size)))
        return
    if args.speed:
        print(json.dumps(run_speed(Path(args.root), args.batch_size, args.steps)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        args.root = tmp
        lengths = make_assets(Path(tmp), args.layers, args.images)
        global_len = min(int(lengths.mean() + 10 * lengths.std()), int(lengths.max()))
        print(
            f"captions: {len(lengths)}, length mean {lengths.mean():.1f} std {lengths.std():.1f} max {lengths.max()} "
            f"-> original global length {global_len}; GPT-2 width 768, {args.layers} layers, batch {args.batch_size}, "
            f"k={K}, MLP + tuned LM, fp32, {args.threads} thread(s)"
        )
        memory = {side: child(args, "--memory", side) for side in ("ours", "original")}
        speed = child(args, "--speed")
    for side in ("ours", "original"):
        print(
            f"  {side:8s} {speed[side]['samples_per_s']:6.2f} samples/s, mean sequence (prefix + caption) "
            f"{speed[side]['sequence_length']:4.1f} tokens, peak RSS {memory[side]['peak_rss_mib']:5.0f} MiB"
        )
    loss_ours, loss_original = memory["ours"]["first_loss"], memory["original"]["first_loss"]
    print(
        f"same batch, same weights: loss ours {loss_ours:.6f}, original-style {loss_original:.6f} "
        f"(|difference| {abs(loss_ours - loss_original):.1e})"
    )
    ratio = speed["ours"]["samples_per_s"] / speed["original"]["samples_per_s"]
    print(f"training samples/s ratio ours / original-style: {ratio:.2f}x  (target >= 1.5x on CPU)")
    rss_ratio = memory["original"]["peak_rss_mib"] / memory["ours"]["peak_rss_mib"]
    print(f"peak RSS ratio original-style / ours: {rss_ratio:.2f}x")


if __name__ == "__main__":
    main()
