"""Training throughput: our training step (clipcap.train: captions padded per batch to the batch's longest) vs an
original-style step (rmokady/CLIP_prefix_caption train.py: every caption padded to one global length,
min(mean + 10·std, max) of all caption lengths, fp32, cross-entropy with ignore_index=0), at equal batch, on the
same data and the same initial weights. Also checks that both give the same loss on the same batch, and reports each
side's peak RSS.

    .venv/bin/python benchmarks/train_step.py [--layers 4] [--batch-size 40] [--steps 3] [--rounds 2]

Random weights with GPT-2-small's width and vocabulary (768, 50257) and --layers blocks; MLP mapper, k = 10, tuned
LM (the paper's MLP setting), CPU. Captions are random word sequences with COCO-like lengths (mean ≈ 11.5 tokens,
std ≈ 2.7, plus a thin tail of long captions), one word = one token. Each side runs in its own process (so its peak
RSS is its own); the sides alternate, --rounds times each, so they share whatever background load the machine has.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
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


def run_side(side: str, root: Path, batch_size: int, steps: int) -> dict:
    """One side: a first (untimed) step, then `steps` timed steps, on the first batches of epoch 0: the same rows and
    the same initial weights on both sides."""
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
    plan = trainer.epoch_steps(0)[: steps + 1]
    lengths = np.diff(trainer.pairs.offsets)
    # The original dataset: max_seq_len = min(int(mean + 10 * std), max); every caption padded (or cut) to it.
    global_len = min(int(lengths.mean() + lengths.std() * 10), int(lengths.max()))
    step = trainer.train_step if side == "ours" else original_step(trainer, global_len)
    first_loss = step(plan[0])[0]
    start = time.perf_counter()
    for micro_batches in plan[1:]:
        step(micro_batches)
    elapsed = time.perf_counter() - start
    padded = [K + (max(lengths[r] for r in rows) if side == "ours" else global_len) for (rows,) in plan[1:]]
    return {
        "side": side,
        "samples_per_s": steps * batch_size / elapsed,
        "first_loss": first_loss,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "sequence_length": float(np.mean(padded)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4, help="GPT-2 blocks (GPT-2 small has 12)")
    parser.add_argument("--batch-size", type=int, default=40)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round and side")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--images", type=int, default=2000, help="store size (5 captions per image)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--side", choices=["ours", "original"], help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.side:
        print(json.dumps(run_side(args.side, Path(args.root), args.batch_size, args.steps)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        lengths = make_assets(root, args.layers, args.images)
        global_len = min(int(lengths.mean() + 10 * lengths.std()), int(lengths.max()))
        print(
            f"captions: {len(lengths)}, length mean {lengths.mean():.1f} std {lengths.std():.1f} max {lengths.max()} "
            f"-> original global length {global_len}; GPT-2 width 768, {args.layers} layers, batch {args.batch_size}, "
            f"k={K}, MLP + tuned LM, fp32, {torch.get_num_threads()} threads"
        )
        results: dict[str, list[dict]] = {"ours": [], "original": []}
        for _ in range(args.rounds):
            for side in ("ours", "original"):
                cmd = [sys.executable, __file__, "--side", side, "--root", tmp, "--batch-size", str(args.batch_size)]
                cmd += ["--steps", str(args.steps), "--threads", str(args.threads)]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode:
                    sys.exit(f"{side} side failed:\n{done.stderr[-3000:]}")
                out = done.stdout
                results[side].append(json.loads(out.strip().splitlines()[-1]))
                r = results[side][-1]
                print(
                    f"  {side:8s} {r['samples_per_s']:7.2f} samples/s, mean sequence length (prefix + caption) "
                    f"{r['sequence_length']:5.1f}, peak RSS {r['peak_rss_mib']:6.0f} MiB"
                )
    ours = statistics.median(r["samples_per_s"] for r in results["ours"])
    original = statistics.median(r["samples_per_s"] for r in results["original"])
    loss_ours, loss_original = results["ours"][0]["first_loss"], results["original"][0]["first_loss"]
    print(f"same batch, same weights: loss ours {loss_ours:.6f} vs original-style {loss_original:.6f}")
    print(f"  |difference| = {abs(loss_ours - loss_original):.2e}")
    print(f"training samples/s (median of {args.rounds}): ours {ours:.2f}, original-style {original:.2f}")
    print(f"ratio ours / original-style: {ours / original:.2f}x  (target >= 1.5x on CPU)")
    rss = {side: max(r["peak_rss_mib"] for r in rs) for side, rs in results.items()}
    print(f"peak RSS: ours {rss['ours']:.0f} MiB, original-style {rss['original']:.0f} MiB")


if __name__ == "__main__":
    main()
