"""What candidates and CLIP reranking cost: captions/s for 1, 4 and 8 candidates per image, with and without
reranking, side by side in one run, and reranking's share of the time at 8 candidates.

    .venv/bin/python benchmarks/rerank.py [--images 16] [--tokens 20] [--rounds 3] [--threads 1]

The models have the real shapes and random weights (the work per token does not depend on them): a GPT-2-small-shaped
LM (12 layers, 768 wide, vocabulary 50257) behind an MLP mapper (prefix 10) and a CLIP ViT-B/32-shaped text tower
(12 layers, 512 wide, 512-d projection). No stop token, so every caption is exactly --tokens long. Both tokenizers
are word-level over the same made-up words ("w123"), one CLIP token per LM token plus the end token: the text tower
reads as many tokens as a real CLIP reads for a caption of that many GPT-2 tokens. The image embeddings are given
(the path of a store, or of an image encoded once for every candidate).

Per candidate count N (beam search, N beams, N returned; N = 1 is greedy), each through `rerank.score_embeddings`:
- `plain`: `Captioner.caption_embeddings`, the captions alone (N = 1 only: what captioning cost before scores);
- `none`: candidates + each one's mean token log-probability (one forward pass), the search's best kept;
- `clip`: the same + CLIPScore of every candidate with the text tower, the best by CLIPScore kept.
Reranking's share at N = 8 is (clip - none) / clip in seconds. Rounds interleave the settings; the median counts.
CPU time of this process is reported beside wall time: on a shared machine it is what the work costs a core.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

from clipcap import ClipCapConfig, ClipCapModel
from clipcap.captioner import Captioner
from clipcap.decoding import generate_kwargs
from clipcap.encoder import ImageEncoder
from clipcap.rerank import score_embeddings

CLIP_VOCAB, LM_VOCAB = 49408, 50257


def word_tokenizer(size: int, end: int, append_end: bool) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(size)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if append_end:
        tok.post_processor = processors.TemplateProcessing(single=f"$A w{end}", special_tokens=[(f"w{end}", end)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=f"w{end}", pad_token=f"w{end}", unk_token="w0")


def captioner(batch: int) -> Captioner:
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config()).eval()
    config = ClipCapConfig(lm="gpt2-small-shaped-random", clip_dim=512, prefix_length=10, mapping="mlp")
    model = ClipCapModel(config, lm=lm).eval()
    end = CLIP_VOCAB - 1
    clip = CLIPModel(
        CLIPConfig(
            text_config={"vocab_size": CLIP_VOCAB, "eos_token_id": end, "pad_token_id": end, "bos_token_id": end - 1},
            projection_dim=512,
        )
    ).eval()
    encoder = ImageEncoder(clip, CLIPImageProcessorPil(), word_tokenizer(CLIP_VOCAB, end, True), name="clip-b32-random")
    return Captioner(model, word_tokenizer(LM_VOCAB, 0, False), encoder, batch_size=batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cap = captioner(args.images)
    cap.model.config.stop_token_id = None  # every caption exactly --tokens long
    features = torch.randn(args.images, 512)

    def run(n: int, mode: str) -> None:
        decoding = generate_kwargs(defaults={}, num_beams=n, max_new_tokens=args.tokens)
        if mode == "plain":
            cap.caption_embeddings(features, **decoding)
        else:
            score_embeddings(cap, features, features if mode == "clip" else None, decoding, n, mode)

    settings = [(1, "plain")] + [(n, mode) for n in (1, 4, 8) for mode in ("none", "clip")]
    wall: dict = {s: [] for s in settings}
    cpu: dict = {s: [] for s in settings}
    run(1, "clip")  # warm-up
    for _ in range(args.rounds):
        for s in settings:
            w, c = time.perf_counter(), time.process_time()
            run(*s)
            wall[s].append(time.perf_counter() - w)
            cpu[s].append(time.process_time() - c)
    print(
        f"GPT-2-small-shaped LM + MLP mapper, CLIP ViT-B/32-shaped text tower, random weights; {args.images} images, "
        f"{args.tokens} new tokens, beam search with N beams; CPU, {args.threads} thread(s), median of "
        f"{args.rounds} rounds; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n"
    )
    print("| candidates | scoring | captions/s (CPU time) | captions/s (wall) | CPU s per round |")
    print("|---|---|---|---|---|")
    med = {s: (statistics.median(cpu[s]), statistics.median(wall[s])) for s in settings}
    labels = {"plain": "captions only", "none": "+ logprob, search's best", "clip": "+ logprob + CLIPScore, rerank"}
    for s in settings:
        c, w = med[s]
        print(f"| {s[0]} | {labels[s[1]]} | {args.images / c:.2f} | {args.images / w:.2f} | {c:.2f} |")
    for n in (4, 8):
        share = (med[(n, "clip")][0] - med[(n, "none")][0]) / med[(n, "clip")][0]
        print(f"\nreranking's share of the time at {n} candidates (CPU time): {share:.1%}")
    logprob = (med[(1, "none")][0] - med[(1, "plain")][0]) / med[(1, "none")][0]
    print(f"the log-probability pass's share at 1 candidate (CPU time): {logprob:.1%}")


if __name__ == "__main__":
    main()
