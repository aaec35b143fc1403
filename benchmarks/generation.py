"""Captioning throughput: ClipCapModel.generate (batched, KV cache, transformers' generate) vs the original repo's
decoding loops (rmokady/CLIP_prefix_caption `generate2` and `generate_beam`: one image at a time, no cache, the whole
sequence recomputed at every step), in one process on the same GPT-2-small-shaped model.

    .venv/bin/python benchmarks/generation.py [--threads 1] [--greedy-subset 2] [--beam-subset 1]

Random weights are enough: the work per token does not depend on them, and decoding never stops early (no stop
token), so every caption is exactly --tokens long. The original-style loops are slow, so they run on the first few of
the images only; captions/s is a rate, so the two sides compare directly. Both sides must produce identical tokens.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from clipcap import ClipCapConfig, ClipCapModel


@torch.no_grad()
def original_greedy(model: ClipCapModel, embed: torch.Tensor, entry_length: int, top_p: float = 0.8) -> list[int]:
    """`generate2` of the original repo (stop token never met): top-p filter, then argmax; full recompute."""
    generated = embed
    tokens = None
    wte = model.lm.get_input_embeddings()
    for _ in range(entry_length):
        logits = model.lm(inputs_embeds=generated, use_cache=False).logits
        logits = logits[:, -1, :]
        sorted_logits, sorted_indices = torch.sort(logits, descending=True)
        cumulative_probs = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
        sorted_indices_to_remove = cumulative_probs > top_p
        sorted_indices_to_remove[..., 1:] = sorted_indices_to_remove[..., :-1].clone()
        sorted_indices_to_remove[..., 0] = 0
        indices_to_remove = sorted_indices[sorted_indices_to_remove]
        logits[:, indices_to_remove] = -float("inf")
        next_token = torch.argmax(logits, -1).unsqueeze(0)
        tokens = next_token if tokens is None else torch.cat((tokens, next_token), dim=1)
        generated = torch.cat((generated, wte(next_token)), dim=1)
    return tokens[0].tolist()


@torch.no_grad()
def original_beam(model: ClipCapModel, embed: torch.Tensor, entry_length: int, beam_size: int = 5) -> list[int]:
    """`generate_beam` of the original repo (stop token never met): per-step length-averaged beam scores, all beams
    recomputed from the start at every step. Returns the best beam."""
    wte = model.lm.get_input_embeddings()
    tokens, scores = None, None
    seq_lengths = torch.ones(beam_size)
    is_stopped = torch.zeros(beam_size, dtype=torch.bool)
    generated = embed
    for _ in range(entry_length):
        logits = model.lm(inputs_embeds=generated, use_cache=False).logits
        logits = logits[:, -1, :].softmax(-1).log()
        if scores is None:
            scores, next_tokens = logits.topk(beam_size, -1)
            generated = generated.expand(beam_size, *generated.shape[1:])
            next_tokens, scores = next_tokens.permute(1, 0), scores.squeeze(0)
            tokens = next_tokens
        else:
            logits[is_stopped] = -float(np.inf)
            logits[is_stopped, 0] = 0
            scores_sum = scores[:, None] + logits
            seq_lengths[~is_stopped] += 1
            scores_sum_average = scores_sum / seq_lengths[:, None]
            scores_sum_average, next_tokens = scores_sum_average.view(-1).topk(beam_size, -1)
            next_tokens_source = next_tokens // scores_sum.shape[1]
            seq_lengths = seq_lengths[next_tokens_source]
            next_tokens = (next_tokens % scores_sum.shape[1]).unsqueeze(1)
            tokens = torch.cat((tokens[next_tokens_source], next_tokens), dim=1)
            generated = generated[next_tokens_source]
            scores = scores_sum_average * seq_lengths
            is_stopped = is_stopped[next_tokens_source]
        generated = torch.cat((generated, wte(next_tokens.squeeze(1)).view(beam_size, 1, -1)), dim=1)
    order = (scores / seq_lengths).argsort(descending=True)
    return tokens[order[0]].tolist()


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64, help="images captioned by our batched generate (default 64)")
    parser.add_argument("--tokens", type=int, default=60, help="new tokens per caption, no early stop (default 60)")
    parser.add_argument("--beams", type=int, default=5, help="beam width (default 5, the original's)")
    parser.add_argument("--greedy-subset", type=int, default=2, help="images the original greedy loop decodes")
    parser.add_argument("--beam-subset", type=int, default=1, help="images the original beam loop decodes")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a loaded machine, threads spin-wait on each other and the timings "
        "measure the scheduler)",
    )
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config()).eval()  # GPT-2 small: 12 layers, 768 hidden, 12 heads, vocab 50257
    config = ClipCapConfig(lm="gpt2-small-shaped-random", clip_dim=512, prefix_length=10, mapping="mlp")
    model = ClipCapModel(config, lm=lm).eval()
    clip = torch.randn(args.images, 512)
    prefixes = model.prefix(clip).detach()
    params = sum(p.numel() for p in lm.parameters()) / 1e6
    print(
        f"GPT-2-small-shaped LM ({params:.0f} M params, random weights), MLP mapper, prefix 10, {args.images} images, "
        f"{args.tokens} new tokens, no early stop; CPU, {args.threads} torch threads\n"
    )

    # warm-up (allocator, kernels) on both paths
    model.generate(clip[:2], max_new_tokens=2, stop_token_id=None)
    original_greedy(model, prefixes[:1], 2)

    print(f"{'decoding':<9} {'method':<36} {'images':>6} {'seconds':>8} {'captions/s':>11}", flush=True)
    rate = {}

    def row(mode: str, method: str, images: int, fn):
        out, seconds = timed(fn)
        rate[(mode, method.split(":")[0])] = images / seconds
        print(f"{mode:<9} {method:<36} {images:>6} {seconds:>8.1f} {images / seconds:>#11.3g}", flush=True)
        return out

    beam = f"beam {args.beams}"
    ours, n = f"ours: batch {args.images}, KV cache", args.images
    original = "original-style: batch 1, no cache"
    greedy_ids = row("greedy", ours, n, lambda: model.generate(clip, max_new_tokens=args.tokens, stop_token_id=None))
    n = args.greedy_subset
    greedy_ref = row(
        "greedy", original, n, lambda: [original_greedy(model, p[None], args.tokens) for p in prefixes[:n]]
    )
    beam_ids = row(
        beam,
        ours,
        args.images,
        lambda: model.generate(clip, max_new_tokens=args.tokens, num_beams=args.beams, stop_token_id=None),
    )
    n = args.beam_subset
    beam_ref = row(
        beam, original, n, lambda: [original_beam(model, p[None], args.tokens, args.beams) for p in prefixes[:n]]
    )

    print("\n(the original-style loops ran on the first images only: captions/s is a rate, so the rows compare)")
    for mode, target in (("greedy", 20), (beam, 8)):
        ratio = rate[(mode, "ours")] / rate[(mode, "original-style")]
        print(f"speed-up {mode}: {ratio:.1f}x (target >= {target}x)")
    same_greedy = sum(a == b for a, b in zip(greedy_ids.tolist()[: len(greedy_ref)], greedy_ref, strict=True))
    same_beam = sum(a == b for a, b in zip(beam_ids.tolist()[: len(beam_ref)], beam_ref, strict=True))
    print(f"identical tokens: greedy {same_greedy}/{len(greedy_ref)}, {beam} {same_beam}/{len(beam_ref)} (best beam)")


if __name__ == "__main__":
    main()
