"""The `clipcap` commands: each one is an options dataclass, a help text, and a small function that calls the library
and tells the user what happened. Flags come from the dataclass fields (`arguments.py`)."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger("clipcap")


@dataclass(frozen=True)
class Command:
    """A subcommand: its options dataclass ("module:Class", imported only when the command is used) and
    `run(options, progress) -> exit status`."""

    name: str
    help: str
    description: str
    options_path: str
    run: Callable[..., int]
    progress: bool = True  # has a progress bar (gets --quiet)

    @property
    def options(self) -> type:
        module, _, name = self.options_path.partition(":")
        return getattr(importlib.import_module(module), name)


def say(message: str) -> None:
    logger.info(message)


def run_convert(cfg, progress: bool) -> int:
    from ..convert import convert

    say(f"wrote {convert(cfg)}")
    return 0


def run_caption(cfg, progress: bool) -> int:
    from .caption import run

    return run(cfg, progress)


def run_embed(cfg, progress: bool) -> int:
    from .engine import run_embed_job

    result = run_embed_job(cfg, progress)
    info = result.info
    if info is None:
        say(f"rank {result.rank} done; the last rank to finish writes {result.out / 'info.json'}")
        return 0
    what = "captions" if cfg.text_only else "images"
    reasons = ", ".join(f"{k} {v}" for k, v in info["skipped_by_reason"].items())
    skipped = f"skipped {info['skipped']}"
    if info["skipped"]:
        skipped += f" ({reasons}), listed in {result.out / 'skipped.jsonl'}"
    say(
        f"{info['num_images']} {what} ({info['num_captions']} captions) in {info['num_shards']} shards "
        f"-> {result.out}; {skipped}"
    )
    return 0


def run_train(cfg, progress: bool) -> int:
    from ..train import train

    train(cfg, progress)
    return 0


def run_merge_lora(cfg, progress: bool) -> int:
    from ..lora import merge_lora

    say(f"wrote {merge_lora(cfg)}")
    return 0


def run_evaluate(cfg, progress: bool) -> int:
    from ..evaluate import check_out, evaluate, format_table, output_policy, write_results

    check_out(cfg)  # before the minutes of captioning and scoring
    result = evaluate(cfg, progress)
    if result.missing_predictions:
        say(f"{result.missing_predictions} reference images have no prediction; scored the {result.num_images} that do")
    if result.skipped:
        counts: dict[str, int] = {}
        for s in result.skipped:
            reason = s["reason"].split(" (", 1)[0]
            counts[reason] = counts.get(reason, 0) + 1
        summary = ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items()))
        say(f"skipped {len(result.skipped)} images: {summary} (listed under 'skipped' in {cfg.out})")
    for path in write_results(result, cfg.out, **output_policy(cfg)):
        say(f"wrote {path}")
    print(format_table(result))
    return 0


def run_export(cfg, progress: bool) -> int:
    from ..export import export

    say(f"wrote {export(cfg.model_dir, cfg.out_dir, int8=cfg.int8, progress=progress, overwrite=cfg.overwrite)}")
    return 0


def run_serve(cfg, progress: bool) -> int:
    from ..serve import serve

    serve(cfg)
    return 0


def run_demo(cfg, progress: bool) -> int:
    from ..demo.runner import run_demo

    run_demo(cfg, progress=progress)
    return 0


def run_push(cfg, progress: bool) -> int:
    from ..push import push

    say(f"pushed {cfg.model_dir} to {push(cfg)}")
    return 0


def run_card(cfg, progress: bool) -> int:
    from ..card import write_card

    say(f"wrote {write_card(cfg)}")
    return 0


def run_experiment(cfg, progress: bool) -> int:
    from ..demo.experiments import run_experiment

    run_experiment(cfg)
    return 0


COMMANDS = (
    Command(
        "convert",
        "convert an original CLIP_prefix_caption .pt checkpoint to a model dir",
        "Convert a checkpoint of rmokady/CLIP_prefix_caption (a plain state dict) into a model dir that "
        "ClipCapModel.from_pretrained / Captioner.from_pretrained load. Sizes are read from the tensors; flags that "
        "contradict them are errors. The file is read with weights_only=True (never executed).",
        "clipcap.convert:ConvertConfig",
        run_convert,
        progress=False,
    ),
    Command(
        "caption",
        "caption images, a dataset or an embedding store (streamed, or sharded and resumable)",
        "Caption with a model dir: image files, directories (searched recursively) and globs; or one dataset source "
        "in any format `clipcap embed` reads (with its keys and metadata); or an embedding store, ours or "
        "clip-retrieval's (img_emb/*.npy + metadata/*.parquet, as LAION publishes), captioned from the stored "
        "vectors without reading an image (its encoder must be the model's). Without --out, one record per image "
        'goes to stdout as its batch finishes: JSON lines {"image": ..., "caption": ...} ({"key": ..., "image": '
        '..., ...} for a dataset or store; "captions": [...] with --num-captions > 1) or CSV; a bad image is skipped '
        "with one line on stderr. With --out DIR, captions go to DIR/captions/part-*.parquet (key, image, caption, "
        "the source's own columns; or JSON lines) written atomically, bad items to DIR/skipped.jsonl: rerun the same "
        "command after any interruption to finish what is missing. Under torchrun each process takes its share of "
        "the shards: torchrun --nproc-per-node 8 -m clipcap.cli caption STORE --model M --out DIR. The exit status "
        "is non-zero only when no image could be captioned. Decoding settings not given come from the model dir.",
        "clipcap.cli.caption:CaptionConfig",
        run_caption,
    ),
    Command(
        "embed",
        "encode a captioning dataset into an embedding store (resumable)",
        "Encode every image of SOURCE with a CLIP-family encoder into an embedding store (clip-retrieval layout: "
        "img_emb/*.npy float16 + metadata/*.parquet + info.json). Bad items (missing, corrupt, oversized images, "
        "empty or mis-encoded captions, malformed entries, duplicate keys) are skipped and listed in "
        "STORE/skipped.jsonl. Rerun the same command after an interruption to resume. Under torchrun each rank takes "
        "every WORLD_SIZE-th shard: torchrun --nproc-per-node 8 -m clipcap.cli embed SOURCE --out STORE ...",
        "clipcap.cli.engine:EmbedCommandConfig",
        run_embed,
    ),
    Command(
        "train",
        "train a ClipCap model on an embedding store",
        "Train the mapping network (and optionally the LM) on (CLIP embedding, caption) pairs of an embedding store "
        "made by `clipcap embed`. Defaults are the original implementation's. Runs on CPU, one GPU, or many GPUs / "
        "nodes when started with `torchrun` or `accelerate launch` (DDP). Writes RUN_DIR/final/ (a model dir for "
        "`clipcap caption --model`), RUN_DIR/best/ (lowest validation loss, with validation data), "
        "RUN_DIR/metrics.jsonl, RUN_DIR/loss.png, RUN_DIR/skipped.jsonl and RUN_DIR/checkpoints/.",
        "clipcap.train:TrainConfig",
        run_train,
    ),
    Command(
        "merge-lora",
        "merge a LoRA model dir's adapter into its LM: a plain model dir",
        "Write MODEL_DIR (trained with --lora-r: mapper + LoRA adapter + a reference to the base LM) as an ordinary "
        "model dir whose LM has the adapter merged into its weights (saved in full, as a tuned LM). Captions are the "
        "same; export and push take the merged dir.",
        "clipcap.lora:MergeLoraConfig",
        run_merge_lora,
        progress=False,
    ),
    Command(
        "evaluate",
        "score captions: coco-caption metrics (BLEU, METEOR, ROUGE-L, CIDEr-D, SPICE) + CLIPScore",
        "Either caption a dataset split with a model and score the captions (--model DIR --data SOURCE), or score a "
        "file of predictions (--predictions P --references R). Metrics are pycocoevalcap's (PTB tokenizer, "
        "BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, SPICE when its CoreNLP jars are installed) plus CLIPScore / "
        "RefCLIPScore; nocaps data is also scored per domain. Prints a Markdown table and writes OUT (metrics with "
        "the exact decoding settings and timings), OUT.csv (one row per image) and, when generating, "
        "OUT.predictions.json (COCO results format). Decoding settings not given come from the model dir.",
        "clipcap.evaluate:EvalConfig",
        run_evaluate,
    ),
    Command(
        "export",
        "export a model dir for fast CPU captioning (ONNX Runtime, optionally int8)",
        "Export MODEL_DIR for ONNX Runtime on the CPU: the mapping network and the language model (with its KV cache) "
        "as ONNX graphs, each checked against PyTorch, plus the tokenizer, decoding defaults and encoder dir. --int8 "
        "stores the language model's weights as int8 (dynamic quantization): about 4x smaller and faster on the CPU, "
        "captions close to but not always identical to fp32. `clipcap caption --model OUT_DIR` and `clipcap serve "
        "--model OUT_DIR` run the exported model as they run any model dir.",
        "clipcap.export:ExportConfig",
        run_export,
    ),
    Command(
        "serve",
        "run the captioning REST API and upload page",
        "Serve a model dir over HTTP: GET / is an upload page, POST /v1/captions takes multipart `image` fields "
        "(+ num_beams, max_new_tokens, num_captions, length_penalty, do_sample, temperature, top_p, top_k, "
        "repetition_penalty, prompt, candidates, rerank, rerank_weight) and returns {results: [{filename, captions, "
        "scores: [{caption, clip_score, logprob}], candidates}]}, GET /healthz, OpenAPI docs at "
        "/docs. "
        "The model loads once; concurrent requests are batched together. Decoding settings flags are the defaults "
        "for requests that do not say (else the model dir's).",
        "clipcap.serve:ServeConfig",
        run_serve,
        progress=False,
    ),
    Command(
        "demo",
        "offline end-to-end demo on the synthetic shapes world",
        "Run the whole method offline on the shapes world: generate it, embed it with the shipped tiny CLIP, train "
        "the demo's variants on the shipped tiny GPT-2, evaluate them on the in-domain test split and the novel "
        "split (purple triangles, yellow squares: never in the training pairs), objects, two-object relations and "
        "coco-caption metrics, caption sample images. Writes OUT/report.html, OUT/metrics.json and OUT/model (the "
        "first variant). Under 10 minutes on 2 CPU cores.",
        "clipcap.demo.runner:DemoConfig",
        run_demo,
    ),
    Command(
        "experiment",
        "the paper's ablations (prefix length, mapping x LM tuning; frozen vs LoRA vs full LM tuning) and where "
        "things are (relations)",
        "prefix-length: train and test score against the prefix length k for a tuned and a frozen LM (the paper's "
        "figure; OUT/prefix_length.png). mapping: MLP/Transformer x tuned/frozen LM (OUT/table.md). tuning: frozen LM "
        "vs LoRA (--lora-ranks) vs full tuning with each mapper, with trainable parameters, model-dir size and "
        "seconds per step (OUT/table.md). These write OUT/results.json and train every run with `clipcap train` on "
        "--data. relations: each CLIP of --clip-models "
        "x the pooled embedding (MLP + tuned LM, Transformer + frozen LM) or image tokens (Transformer, tuned or "
        "frozen LM, per --token-grids) on the demo's shapes world (--quick: a smaller one): single objects, "
        "two-object scenes named exactly and their relation, CIDEr, in-domain and novel, seconds of training and "
        "store size (OUT/table.md).",
        "clipcap.demo.experiments:ExperimentConfig",
        run_experiment,
        progress=False,
    ),
    Command(
        "push",
        "upload a model dir to the Hugging Face Hub with a model card",
        "Upload a model dir to the Hugging Face Hub as a complete captioning model (vision tower, mapper, LM, "
        "processor, generation config and model code; a dir whose encoder is only named is made complete first) with "
        "a model card (README.md, as `clipcap card` writes it, unless the dir has one), so that "
        'pipeline("image-text-to-text", model=REPO_ID, trust_remote_code=True) loads it. Needs a token '
        "(`hf auth login` or HF_TOKEN) and the network; offline it fails at once.",
        "clipcap.push:PushConfig",
        run_push,
        progress=False,
    ),
    Command(
        "card",
        "write a model card (README.md) for a model dir",
        "Write the Hugging Face model card of a model dir without uploading anything: YAML front matter "
        "(pipeline_tag image-to-text, library, tags, base models, datasets and metrics from a metrics.json in the "
        "model dir or beside it, licence), usage with transformers' pipeline and with clipcap, and the training "
        "settings when a train_config.json or a demo metrics.json is found.",
        "clipcap.card:CardConfig",
        run_card,
        progress=False,
    ),
)
