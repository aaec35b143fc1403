"""Captioning throughput on the CPU, in one process on one GPT-2-small-shaped model (random weights: the work per
token does not depend on them; no stop token, so every caption is exactly --tokens long).

    .venv/bin/python benchmarks/generation.py [--part all|original|cpu] [--threads 1] [--repeats 2]

Part "original": ClipCapModel.generate (batched, KV cache, transformers' generate) against the original repo's
decoding loops (rmokady/CLIP_prefix_caption `generate2` and `generate_beam`: one image at a time, no cache, the whole
sequence recomputed at every step). Those loops are slow, so they run on the first few images only; captions/s is a
rate, so the two sides compare directly. Both must produce identical tokens.

Part "cpu": the machine's own limits and each CPU decoding path against them.
- Limits, with the same thread count: dense matmul throughput (torch fp32 and bf16; ONNX Runtime fp32 and its
  dynamic-int8 MatMul) on the model's own GEMM shapes and on 1024^3, and memory read bandwidth.
- Paths: PyTorch fp32 (ClipCapModel.generate), ONNX Runtime fp32 and int8 (`clipcap export` dirs run by
  ExportedModel.generate); all decode through transformers' generate. Batch 64 (captions/s) and batch 1 (seconds per
  caption: the web-app case, bound by reading the weights), interleaved over --repeats rounds (the best round
  counts; the spread says how noisy the machine was). Times are CPU seconds of this process (one thread): on a
  shared machine they are what the work costs a core, where wall time stretches with everyone else's load (shown
  beside). Exported dirs are written under --export-dir and reused by later runs with the same dir.
- Model FLOPs per caption: mapper (counted by torch's FlopCounterMode), the LM blocks per position (2 x matmul
  weights, plus attention over the KV cache: 4 x layers x hidden x positions attended), the LM head once per new
  token. Achieved FLOP/s = FLOPs per caption x captions/s, as a fraction of the matching peak (int8 path: int8
  peak). At batch 1 also the weight bytes read per second against the measured bandwidth.
- The image encoder (CLIP ViT-B/32 shape, PyTorch fp32): its seconds per image beside each path's decoding.
- Where the time goes: the share spent inside the LM's forward (the engine) vs generate's per-step Python (logits
  processing, stopping, cache bookkeeping, our wrapper), and a torch profile of the PyTorch path by operator.
- Quality: tokens of each fast path against PyTorch fp32 greedy on the same 64 images.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from importlib.resources import files
from pathlib import Path

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


def original_section(args, model: ClipCapModel, clip: torch.Tensor) -> None:
    prefixes = model.prefix(clip).detach()
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


# -- part "cpu": the machine's limits and the CPU decoding paths ------------------------------------------------------
def cpu_timed(fn):
    """(result, CPU seconds of this process, wall seconds). With one thread, CPU seconds are what the work costs a
    core, whatever else the shared machine runs; wall seconds stretch with the load."""
    cpu, wall = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - cpu, time.perf_counter() - wall


def _rate(fn, seconds: float = 1.0) -> float:
    """Calls per CPU second of fn (after one warm-up call), over at least `seconds` of CPU time."""
    fn()
    count, start = 0, time.process_time()
    while (elapsed := time.process_time() - start) < seconds or count < 3:
        fn()
        count += 1
    return count / elapsed


def _ort_matmul(m: int, k: int, n: int, int8: bool, threads: int, tmp: Path):
    """An ONNX Runtime session computing A (m, k) @ W (k, n) with W a constant, fp32 or dynamic-int8 quantized
    (the same quantizer and kernels as an int8 export)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((k, n)).astype(np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "W"], ["Y"])],
        "matmul",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, n])],
        [weight],
    )
    path = tmp / f"matmul-{k}-{n}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    if int8:
        quantize_dynamic(path, path.with_suffix(".int8.onnx"), weight_type=QuantType.QInt8, per_channel=True)
        path = path.with_suffix(".int8.onnx")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    a = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
    return lambda: session.run(None, {"A": a})


def measure_peaks(threads: int, tmp: Path) -> dict[str, float]:
    """Dense matmul GFLOP/s (best over shapes) per engine and dtype, and read bandwidth in GB/s."""
    import logging

    logging.getLogger().setLevel(logging.ERROR)  # the quantizer's advice on preprocessing
    shapes = [(64, 768, 3072), (64, 3072, 768), (1024, 1024, 1024)]
    peaks: dict[str, float] = {}
    for m, k, n in shapes:
        flops = 2 * m * k * n
        for dtype, name in ((torch.float32, "torch fp32"), (torch.bfloat16, "torch bf16")):
            a, w = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
            peaks[name] = max(peaks.get(name, 0.0), flops * _rate(lambda a=a, w=w: torch.mm(a, w)) / 1e9)
        for int8, name in ((False, "onnxruntime fp32"), (True, "onnxruntime int8")):
            rate = _rate(_ort_matmul(m, k, n, int8, threads, tmp))
            peaks[name] = max(peaks.get(name, 0.0), flops * rate / 1e9)
    big = torch.ones(64 * 1024 * 1024)  # 256 MB: far beyond the caches
    peaks["read GB/s"] = big.numel() * 4 * _rate(lambda: big.sum(), 2.0) / 1e9
    return peaks


def caption_flops(model: ClipCapModel, tokens: int) -> float:
    """Model FLOPs of one greedy caption of `tokens` new tokens (see the module doc)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.prefix(torch.zeros(1, model.config.clip_dim))
    mapper = counter.get_total_flops()
    lm, k = model.lm, model.config.prefix_length
    matmul_weights = sum(p.numel() for p in lm.transformer.h.parameters() if p.dim() == 2)
    layers, hidden = lm.config.n_layer, lm.config.n_embd
    head = 2 * hidden * lm.config.vocab_size
    # positions fed: the k prefix positions, then tokens-1 new tokens (the last token is never fed back)
    attended = sum(range(1, k + 1)) + sum(k + j for j in range(1, tokens))
    blocks = 2 * matmul_weights * (k + tokens - 1) + 4 * layers * hidden * attended
    return mapper + blocks + head * tokens


def weight_bytes(model: ClipCapModel, int8: bool) -> int:
    """Bytes of LM weights read per decoding step (blocks' matmuls + LM head)."""
    lm = model.lm
    count = sum(p.numel() for p in lm.transformer.h.parameters() if p.dim() == 2) + lm.lm_head.weight.numel()
    return count * (1 if int8 else 4)


class ForwardClock:
    """Seconds spent inside an LM's forward (its engine), via forward hooks: the rest of a generate call is the
    per-step Python around it."""

    def __init__(self, lm: torch.nn.Module):
        self.seconds, self._start = 0.0, 0.0
        lm.register_forward_pre_hook(self._enter)
        lm.register_forward_hook(self._leave)

    def _enter(self, *_):
        self._start = time.process_time()

    def _leave(self, *_):
        self.seconds += time.process_time() - self._start


def profile_pytorch(model: ClipCapModel, clip: torch.Tensor, tokens: int) -> list[tuple[str, float]]:
    """Shares of the PyTorch path's time by kind of work (torch profiler, self CPU time)."""
    from torch.profiler import ProfilerActivity, profile

    kinds = {
        "matmul (weights)": ("aten::addmm", "aten::mm", "aten::linear", "aten::matmul"),
        "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::bmm", "aten::baddbmm"),
        "KV-cache concatenation": ("aten::cat",),
        "element-wise (GELU, adds, norms)": ("aten::mul", "aten::add", "aten::tanh", "aten::pow", "aten::layer_norm"),
        "logits processing (argmax, copies)": ("aten::argmax", "aten::copy_", "aten::_to_copy"),
    }
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model.generate(clip, max_new_tokens=tokens, stop_token_id=None)
    wall = time.perf_counter() - start  # the profiler times operators in wall time: shares of the wall time
    self_us = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    shares = [(kind, sum(self_us.get(op, 0) for op in ops) / 1e6 / wall) for kind, ops in kinds.items()]
    shares.append(("everything else (Python, other ops)", 1 - sum(share for _, share in shares)))
    return shares


def image_encoder_seconds(batch: int) -> dict[int, float]:
    """Seconds per image of a CLIP ViT-B/32-shaped image tower (random weights), at `batch` and at 1."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    tower = CLIPVisionModelWithProjection(CLIPVisionConfig(projection_dim=512)).eval()
    out = {}
    with torch.no_grad():
        for size in (batch, 1):
            pixels = torch.randn(size, 3, 224, 224)
            out[size] = 1 / (size * _rate(lambda pixels=pixels: tower(pixel_values=pixels), 2.0))
    return out


def cpu_section(args, model: ClipCapModel, clip: torch.Tensor) -> None:
    from clipcap.export import export
    from clipcap.exported import ExportedModel, is_exported

    tmp = Path(args.export_dir or tempfile.mkdtemp(prefix="clipcap-bench-"))
    tmp.mkdir(parents=True, exist_ok=True)
    print(f"\n== the machine's limits ({args.threads} thread{'s' if args.threads > 1 else ''}, per CPU second) ==")
    peaks = measure_peaks(args.threads, tmp)
    for name, value in peaks.items():
        print(f"{name:<18} {value:>8.1f} {'GB/s' if 'GB' in name else 'GFLOP/s'}")

    print(f"\n== exported dirs (clipcap export) under {tmp} ==", flush=True)
    source = tmp / "model"
    if not source.is_dir():
        model.save_pretrained(source)
        shapes_lm = Path(str(files("clipcap") / "demo" / "assets" / "shapes" / "lm"))
        for name in ("tokenizer.json", "tokenizer_config.json"):  # any tokenizer will do: captions are not decoded
            (source / name).write_bytes((shapes_lm / name).read_bytes())
    paths: dict[str, object] = {"PyTorch fp32": model}
    for name, int8 in (("ONNX Runtime fp32", False), ("ONNX Runtime int8", True)):
        out = tmp / name.split()[-1]
        if is_exported(out):  # from an earlier run of this benchmark with the same --export-dir (same seed)
            note = "reused"
        else:
            _, cpu, wall = cpu_timed(lambda out=out, int8=int8: export(source, out, int8=int8, progress=False))
            note = f"exported in {cpu:.0f} CPU s ({wall:.0f} s wall)"
        size = (out / "decoder.onnx").stat().st_size / 1e6
        print(f"{name:<18} {note}, decoder.onnx {size:.0f} MB", flush=True)
        paths[name] = ExportedModel.from_pretrained(out, threads=args.threads)

    flops = caption_flops(model, args.tokens)
    print(f"\nmodel FLOPs per caption: {flops / 1e9:.2f} GFLOP ({args.tokens} new tokens)")
    single = clip[: args.single]
    clocks = {name: ForwardClock(path.lm) for name, path in paths.items()}
    for path in paths.values():  # warm-up
        path.generate(clip[:2], max_new_tokens=2, stop_token_id=None)
    runs: dict[tuple[str, int], list[float]] = {}
    walls: dict[tuple[str, int], list[float]] = {}
    engine: dict[tuple[str, int], float] = {}
    ids: dict[str, torch.Tensor] = {}
    print(f"\n== decoding: {args.repeats} interleaved rounds (CPU seconds; wall seconds in brackets) ==", flush=True)
    for round_ in range(args.repeats):
        for name, path in paths.items():
            for batch, images in ((1, single), (len(clip), clip)):
                clocks[name].seconds = 0.0
                if batch == 1:
                    _, seconds, wall = cpu_timed(
                        lambda path=path, images=images: [
                            path.generate(image[None], max_new_tokens=args.tokens, stop_token_id=None)
                            for image in images
                        ]
                    )
                    engine[(name, batch)] = clocks[name].seconds / seconds
                    seconds, wall = seconds / len(images), wall / len(images)  # per caption
                else:
                    ids[name], seconds, wall = cpu_timed(
                        lambda path=path, images=images: path.generate(
                            images, max_new_tokens=args.tokens, stop_token_id=None
                        )
                    )
                    engine[(name, batch)] = clocks[name].seconds / seconds
                runs.setdefault((name, batch), []).append(seconds)
                walls.setdefault((name, batch), []).append(wall)
                print(f"round {round_ + 1}: {name:<18} batch {batch:<3} {seconds:8.2f} s ({wall:.2f} s)", flush=True)

    peak = {name: peaks["onnxruntime int8" if "int8" in name else "torch fp32"] for name in paths}
    print(
        f"\n{'path':<18} {'batch':>5} {'captions/s':>11} {'s/caption':>10} {'x fp32 PyTorch':>15} {'GFLOP/s':>8} "
        f"{'of peak':>8} {'weights GB/s':>13} {'in forward':>11} {'spread':>7} {'wall/CPU':>7}"
    )
    base = {batch: min(runs[("PyTorch fp32", batch)]) for batch in (1, len(clip))}
    for batch in (len(clip), 1):
        for name in paths:
            best = min(runs[(name, batch)])
            per_caption = best / (len(clip) if batch > 1 else 1)
            achieved = flops / per_caption / 1e9
            bandwidth = ""
            if batch == 1:
                read = weight_bytes(model, "int8" in name) * args.tokens / per_caption / 1e9
                bandwidth = f"{read:.1f} ({read / peaks['read GB/s']:.0%})"
            print(
                f"{name:<18} {batch:>5} {1 / per_caption:>11.3f} {per_caption:>10.3f} {base[batch] / best:>14.2f}x "
                f"{achieved:>8.1f} {achieved / peak[name]:>8.0%} {bandwidth:>13} {engine[(name, batch)]:>11.0%} "
                f"{max(runs[(name, batch)]) / best:>6.2f}x {min(walls[(name, batch)]) / best:>6.1f}x"
            )
    print(
        "(of peak: against the fp32 matmul peak, the int8 path against the int8 one; weights GB/s: LM weight bytes "
        "read per second at batch 1, against the read bandwidth; in forward: share of the time inside the LM's "
        "forward, the rest is generate's per-step Python; spread: slowest round / fastest round; wall/CPU: how much "
        "the shared machine stretched the wall time)"
    )
    for batch, target in ((1, 2.5), (len(clip), 1.6)):
        best = max(base[batch] / min(runs[(name, batch)]) for name in paths)
        print(f"target batch {batch}: best fast path {best:.2f}x fp32 PyTorch (target >= {target}x)")

    print("\n== tokens against PyTorch fp32 greedy (64 captions) ==")
    reference = ids["PyTorch fp32"]
    for name in list(paths)[1:]:
        same = ids[name] == reference
        first = (~same).float().argmax(1).where(~same.all(1), torch.tensor(same.shape[1]))
        print(
            f"{name:<18} tokens agreeing {same.float().mean().item():.1%}, identical captions "
            f"{int(same.all(1).sum())}/{len(same)}, first difference at token {first.float().mean().item():.1f} "
            "on average"
        )

    print("\n== the image encoder beside decoding (CLIP ViT-B/32 shape, PyTorch fp32, 224 px) ==")
    encoder_seconds = image_encoder_seconds(len(clip))
    for name in paths:
        for batch in (len(clip), 1):
            decode = min(runs[(name, batch)]) / (len(clip) if batch > 1 else 1)
            share = encoder_seconds[batch] / (encoder_seconds[batch] + decode)
            print(
                f"{name:<18} batch {batch:<3} encoder {encoder_seconds[batch]:.3f} s/image, "
                f"{share:.0%} of encode + caption"
            )

    print(f"\n== where the PyTorch path's time goes (batch {len(clip)}, torch profiler, 20 tokens) ==")
    for kind, share in profile_pytorch(model, clip, 20):
        print(f"{kind:<40} {share:>6.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["all", "original", "cpu"], default="all", help="what to run (default all)")
    parser.add_argument("--images", type=int, default=64, help="images captioned by our batched generate (default 64)")
    parser.add_argument("--tokens", type=int, default=60, help="new tokens per caption, no early stop (default 60)")
    parser.add_argument("--beams", type=int, default=5, help="beam width (default 5, the original's)")
    parser.add_argument("--greedy-subset", type=int, default=2, help="images the original greedy loop decodes")
    parser.add_argument("--beam-subset", type=int, default=1, help="images the original beam loop decodes")
    parser.add_argument("--single", type=int, default=3, help="cpu: images captioned one at a time (default 3)")
    parser.add_argument("--repeats", type=int, default=2, help="cpu: interleaved rounds, the best counts (default 2)")
    parser.add_argument(
        "--export-dir", help="cpu: where the exported dirs go; ones already there (same seed) are reused (default: new)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch and ONNX Runtime CPU threads (default 1: on a loaded machine, threads spin-wait on each other "
        "and the timings measure the scheduler)",
    )
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config()).eval()  # GPT-2 small: 12 layers, 768 hidden, 12 heads, vocab 50257
    config = ClipCapConfig(lm="gpt2-small-shaped-random", clip_dim=512, prefix_length=10, mapping="mlp")
    model = ClipCapModel(config, lm=lm).eval()
    clip = torch.randn(args.images, 512)
    params = sum(p.numel() for p in lm.parameters()) / 1e6
    print(
        f"GPT-2-small-shaped LM ({params:.0f} M params, random weights), MLP mapper, prefix 10, {args.images} images, "
        f"{args.tokens} new tokens, no early stop; CPU, {args.threads} thread(s); {time.strftime('%Y-%m-%d %H:%M')}\n"
    )
    if args.part in ("all", "original"):
        original_section(args, model, clip)
    if args.part in ("all", "cpu"):
        cpu_section(args, model, clip)


if __name__ == "__main__":
    main()
