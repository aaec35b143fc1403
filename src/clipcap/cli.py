"""The `clipcap` command. Thin: each subcommand parses flags and calls one library function.

Each subcommand has an `add_<name>(subparsers)` that declares its flags and a `cmd_<name>(args)` that runs it.
User mistakes raise ClipCapError, printed as one line (no traceback) with a non-zero exit.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import __version__
from .errors import ClipCapError


# -- convert -----------------------------------------------------------------------------------------------------
def add_convert(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="convert an original CLIP_prefix_caption .pt checkpoint to a model dir",
        description="Convert a checkpoint of rmokady/CLIP_prefix_caption (a plain state dict) into a model dir "
        "that ClipCapModel.from_pretrained / Captioner.from_pretrained load. Sizes are read from the tensors; "
        "flags that contradict them are errors. The file is read with weights_only=True (never executed).",
    )
    p.add_argument("checkpoint", help="original .pt file")
    p.add_argument("out_dir", help="model dir to write")
    p.add_argument(
        "--lm", default="gpt2", help="HF id or dir of the language model the checkpoint tuned (default: gpt2)"
    )
    p.add_argument("--mapping", choices=["mlp", "transformer"], help="mapping network (inferred when omitted)")
    p.add_argument("--prefix-length", type=int, help="k (inferred when omitted)")
    p.add_argument("--clip-length", type=int, help="transformer mapper's clip_length (inferred when omitted)")
    p.add_argument("--num-layers", type=int, help="transformer mapper layers (inferred when omitted)")
    p.add_argument("--clip-dim", type=int, help="CLIP embedding size (inferred when omitted)")
    p.add_argument(
        "--normalize-prefix",
        action="store_true",
        help="L2-normalise the CLIP embedding (the published Transformer)",
    )
    p.add_argument(
        "--clip-model",
        help="HF id or dir of the CLIP encoder to record (default: openai/clip-vit-base-patch32 for 512-d checkpoints)",
    )
    p.set_defaults(func=cmd_convert)


def cmd_convert(args) -> int:
    from .convert import convert_original

    out = convert_original(
        args.checkpoint,
        args.out_dir,
        lm=args.lm,
        mapping=args.mapping,
        prefix_length=args.prefix_length,
        clip_length=args.clip_length,
        num_layers=args.num_layers,
        clip_dim=args.clip_dim,
        normalize_prefix=args.normalize_prefix,
        clip_model=args.clip_model,
    )
    print(f"wrote {out}", file=sys.stderr)
    return 0


# -- demo --------------------------------------------------------------------------------------------------------
def add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="offline end-to-end demo on the synthetic shapes world",
        description="Run the whole method offline on the shapes world: generate it, embed it with the shipped tiny "
        "CLIP, train MLP + tuned LM and Transformer + frozen LM on the shipped tiny GPT-2, evaluate both on the "
        "in-domain test split and the novel split (purple triangles, yellow squares: never in the training pairs), "
        "caption sample images. Writes OUT/report.html, OUT/metrics.json and OUT/model (the better variant). "
        "About 10 minutes on 2 CPU cores.",
    )
    p.add_argument("--out", default="demo-out", help="output directory (default: demo-out)")
    p.add_argument("--quick", action="store_true", help="a small world and 2 epochs: a smoke run of a few minutes")
    p.add_argument(
        "--rebuild-encoders",
        action="store_true",
        help="first remake the small pretrained encoders (tiny CLIP, BPE tokenizer, tiny GPT-2) under OUT/encoders "
        "instead of using the shipped ones (tens of minutes on 2 cores)",
    )
    p.add_argument("--encoders", help="a dir with clip/ and lm/ to use instead of the shipped encoders")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from .demo.runner import run_demo

    run_demo(args.out, quick=args.quick, rebuild_encoders=args.rebuild_encoders, encoders=args.encoders)
    return 0


# -- experiment --------------------------------------------------------------------------------------------------
def add_experiment(sub) -> None:
    p = sub.add_parser(
        "experiment",
        help="the paper's ablations (prefix length, mapping x LM tuning) and where things are (relations)",
        description="prefix-length: train and test score against the prefix length k for a tuned and a frozen LM "
        "(the paper's figure; OUT/prefix_length.png). mapping: MLP/Transformer x tuned/frozen LM (OUT/table.md). "
        "Both write OUT/results.json and train every run with `clipcap train` on --data. relations: each CLIP of "
        "--clip-models x pooled embedding (MLP + tuned, Transformer + frozen LM) or image tokens (Transformer, tuned "
        "or frozen LM) on the demo's shapes world (--quick: a smaller one): single objects, two-object scenes and "
        "their relations, in-domain and novel, seconds of training, store size (OUT/table.md).",
    )
    p.add_argument("kind", choices=["prefix-length", "mapping", "relations"], help="which ablation")
    p.add_argument("--out", required=True, help="output directory (runs/, results.json, plots)")
    p.add_argument("--data", help="embedding store to train and test on (made by `clipcap embed`)")
    p.add_argument("--lm", help="HF id or dir of the language model")
    p.add_argument("--quick", action="store_true", help="without --data: a small shapes world and the shipped encoders")
    p.add_argument(
        "--lengths", type=lambda t: [int(v) for v in t.split(",")], help="prefix lengths (default: 1,5,10,20,40)"
    )
    p.add_argument("--mapping", choices=["mlp", "transformer"], default="mlp", help="prefix-length: mapping network")
    p.add_argument("--prefix-length", type=int, default=10, help="mapping: k for every run (default: 10)")
    p.add_argument("--train-split", default="train", help="split of --data to train on (default: train)")
    p.add_argument("--test-split", default="test", help="split of --data to score on (default: test)")
    p.add_argument("--epochs", type=int, help="epochs per run (default: 3; 2 with --quick)")
    p.add_argument("--batch-size", type=int, default=64, help="batch size (default: 64)")
    p.add_argument("--lr", type=float, default=2e-3, help="learning rate of the mapper (default: 2e-3)")
    p.add_argument("--lm-lr", type=float, default=2e-4, help="learning rate of a tuned LM (default: 2e-4)")
    p.add_argument("--num-layers", type=int, default=4, help="transformer mapper layers (default: 4)")
    p.add_argument("--beams", type=int, default=1, help="beam width when scoring (default: 1, greedy)")
    p.add_argument("--train-eval-images", type=int, default=500, help="training images scored for the train curve")
    p.add_argument(
        "--clip-models",
        nargs="+",
        help="relations: CLIP encoders to compare, as DIR or NAME=DIR (default: the shipped shapes CLIP)",
    )
    p.add_argument(
        "--token-grids",
        type=lambda t: [None if v == "all" else int(v) for v in t.split(",")],
        help="relations: token grids for the token variants, e.g. all,3,2 (default: all tokens)",
    )
    p.add_argument(
        "--variants",
        type=lambda t: t.split(","),
        help="relations: which variants, comma-separated (default: mlp_tuned,transformer_frozen,tokens_tuned,"
        "tokens_frozen)",
    )
    p.set_defaults(func=cmd_experiment)


def cmd_experiment(args) -> int:
    from .demo.experiments import run_experiment

    run_experiment(
        args.kind,
        args.out,
        data=args.data,
        lm=args.lm,
        quick=args.quick,
        lengths=args.lengths,
        mapping=args.mapping,
        prefix_length=args.prefix_length,
        train_split=args.train_split,
        test_split=args.test_split,
        batch_size=args.batch_size,
        lr=args.lr,
        lm_lr=args.lm_lr,
        num_layers=args.num_layers,
        num_beams=args.beams,
        train_eval_images=args.train_eval_images,
        clip_models=args.clip_models,
        token_grids=args.token_grids,
        variants=args.variants,
        **({} if args.epochs is None else {"epochs": args.epochs}),  # unset: --quick picks its own
    )
    return 0


# -- embed -------------------------------------------------------------------------------------------------------
def add_embed(sub) -> None:
    p = sub.add_parser(
        "embed",
        help="encode a captioning dataset into an embedding store (resumable)",
        description="Encode every image of SOURCE with a CLIP-family encoder into an embedding store "
        "(clip-retrieval layout: img_emb/*.npy float16 + metadata/*.parquet + info.json). Bad items (missing, "
        "corrupt, oversized images, empty captions, duplicate keys) are skipped and listed in STORE/skipped.jsonl. "
        "Rerun the same command after an interruption to resume. Under torchrun each rank takes every "
        "WORLD_SIZE-th shard: torchrun --nproc-per-node 8 -m clipcap.cli embed SOURCE --out STORE ...",
    )
    p.add_argument(
        "source",
        help="dataset: Karpathy/COCO/nocaps JSON, Conceptual Captions TSV, CSV/JSONL/parquet, a folder of images "
        "with .txt sidecars, or webdataset .tar shards (a dir, a glob or shard-{00000..00009}.tar)",
    )
    p.add_argument("--out", required=True, help="store directory to write (or resume)")
    p.add_argument("--clip-model", required=True, help="HF id or dir of the CLIP-family encoder")
    p.add_argument(
        "--format",
        default="auto",
        choices=["auto", "karpathy", "coco", "nocaps", "cc", "csv", "jsonl", "parquet", "folder", "webdataset"],
        help="source format (default: auto, from the extension or the JSON content)",
    )
    p.add_argument(
        "--images",
        help="image root for sources that name images by relative path (default: the source file's folder); "
        "for cc, the img2dataset output (folder or .tar shards) whose .json sidecars map URLs to images",
    )
    p.add_argument("--split", help="only this split (Karpathy: train, val, test, ...; restval counts as train)")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoder forward pass (default: 64)")
    p.add_argument("--workers", type=int, default=2, help="image-decoding worker processes; 0 decodes in-process")
    p.add_argument(
        "--text-only",
        action="store_true",
        help="store CLIP text embeddings of the captions instead (one row per caption; for text-only training)",
    )
    p.add_argument(
        "--normalize",
        action="store_true",
        help="L2-normalise the embeddings, as clip-retrieval does (default: raw features, as the paper trained on)",
    )
    p.add_argument("--shard-size", type=int, default=10_000, help="records per shard file (default: 10000)")
    p.add_argument(
        "--tokens",
        action="store_true",
        help="also store the vision tower's last hidden states per image (tok_emb/*.npy), for `train --tokens`",
    )
    p.add_argument(
        "--token-grid",
        type=int,
        help="with --tokens: average-pool the patch tokens to an N x N grid (class token kept; default: all tokens)",
    )
    p.add_argument("--device", help="torch device (default: cuda:LOCAL_RANK when available, else cpu)")
    p.add_argument("--image-column", help="CSV/JSONL/parquet column holding the image path (default: guessed)")
    p.add_argument("--caption-column", help="CSV/JSONL/parquet column holding the caption(s) (default: guessed)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary line")
    p.set_defaults(func=cmd_embed)


def cmd_embed(args) -> int:
    from .embed import embed

    embed(
        args.source,
        args.out,
        args.clip_model,
        format=args.format,
        images=args.images,
        split=args.split,
        batch_size=args.batch_size,
        workers=args.workers,
        text_only=args.text_only,
        normalize=args.normalize,
        shard_size=args.shard_size,
        device=args.device,
        image_column=args.image_column,
        caption_column=args.caption_column,
        progress=not args.quiet,
        tokens=args.tokens,
        token_grid=args.token_grid,
    )
    return 0


# -- serve -------------------------------------------------------------------------------------------------------
def add_serve(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="run the captioning REST API and upload page",
        description="Serve a model dir over HTTP: GET / is an upload page, POST /v1/captions takes multipart "
        "`image` fields (+ num_beams, max_new_tokens, num_captions) and returns {results: [{filename, captions}]}, "
        "GET /healthz, OpenAPI docs at /docs. The model loads once; concurrent requests are batched together.",
    )
    p.add_argument("--model", required=True, help="model dir (or HF Hub id) to serve")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1; the API has no auth)")
    p.add_argument("--port", type=int, default=8000, help="port to bind (default: 8000)")
    p.add_argument("--clip-model", help="CLIP encoder dir or id (default: the one named in the model's config)")
    p.add_argument("--device", help="torch device for the model, e.g. cuda (default: cpu)")
    p.add_argument("--max-batch-size", type=int, default=32, help="images per batched model run (default: 32)")
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=10.0,
        help="how long a request waits for others to share its batch (default: 10)",
    )
    p.add_argument(
        "--max-queue", type=int, default=256, help="requests waiting for the model before 503 (default: 256)"
    )
    p.add_argument("--max-images", type=int, default=16, help="images per request (default: 16)")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="request body size limit in MB (default: 10)")
    p.add_argument(
        "--max-pixels",
        type=int,
        default=64_000_000,
        help="pixels per image, checked before decoding (default: 64000000)",
    )
    p.add_argument("--timeout", type=float, default=60.0, help="per-request time limit in seconds (default: 60)")
    p.add_argument("--beams", type=int, default=1, help="beam width when a request gives none (default: 1, greedy)")
    p.add_argument(
        "--max-new-tokens", type=int, default=67, help="caption length when a request gives none (default: 67)"
    )
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    from .serve import ServeConfig, serve

    config = ServeConfig(
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        max_images=args.max_images,
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        max_pixels=args.max_pixels,
        timeout_s=args.timeout,
        num_beams=args.beams,
        default_new_tokens=args.max_new_tokens,
    )
    serve(args.model, host=args.host, port=args.port, clip_model=args.clip_model, device=args.device, config=config)
    return 0


# -- evaluate ----------------------------------------------------------------------------------------------------
def add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="score captions: coco-caption metrics (BLEU, METEOR, ROUGE-L, CIDEr-D, SPICE) + CLIPScore",
        description="Either caption a dataset split with a model and score the captions (--model DIR --data "
        "SOURCE), or score a file of predictions (--predictions P --references R). Metrics are pycocoevalcap's "
        "(PTB tokenizer, BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, SPICE when its CoreNLP jars are installed) plus "
        "CLIPScore / RefCLIPScore; nocaps data is also scored per domain. Prints a Markdown table and writes "
        "OUT (metrics with the exact decoding settings and timings), OUT.csv (one row per image) and, when "
        "generating, OUT.predictions.json (COCO results format).",
    )
    p.add_argument("--model", help="model dir (or HF id) to generate captions with")
    p.add_argument(
        "--data",
        help="with --model: a dataset source (Karpathy/COCO/nocaps JSON, CSV/JSONL, image folder, webdataset, ...; "
        "images are encoded with the model's CLIP) or an embedding store dir (its embeddings are captioned)",
    )
    p.add_argument(
        "--predictions",
        help="captions to score: COCO results JSON [{image_id, caption}], `clipcap caption` JSONL, or {id: caption}",
    )
    p.add_argument(
        "--references",
        help="reference captions: COCO/nocaps annotation JSON, Karpathy JSON, JSONL/CSV, or {id: [captions]}",
    )
    p.add_argument(
        "--out", default="metrics.json", help="metrics file; OUT.csv etc. are written beside it (default: metrics.json)"
    )
    p.add_argument(
        "--split", help="split to evaluate; 'all' for every image (default: test with --model, all otherwise)"
    )
    p.add_argument(
        "--format",
        default="auto",
        choices=["auto", "karpathy", "coco", "nocaps", "cc", "csv", "jsonl", "parquet", "folder", "webdataset"],
        help="format of --data / --references (default: auto, from the extension or the JSON content)",
    )
    p.add_argument(
        "--images",
        help="image root for sources that name images by relative path (default: the source file's folder); with "
        "--predictions, where CLIPScore looks for the images (ID.jpg or the references' file names)",
    )
    p.add_argument("--beams", type=int, help="beam width; 1 = greedy (default: 5, length-normalised, as the paper)")
    p.add_argument("--max-new-tokens", type=int, help="longest caption in tokens (default: 67, as the paper)")
    p.add_argument(
        "--length-penalty",
        type=float,
        help="beam scores are divided by length**F (default: 1.0, the paper's length normalisation)",
    )
    p.add_argument(
        "--batch-size", type=int, help="images per batch for CLIP and decoding (default: 32; 64 for --predictions)"
    )
    p.add_argument("--limit", type=int, help="evaluate only the first N images of the split (quick checks)")
    p.add_argument(
        "--clip-model",
        help="CLIP for CLIPScore (HF id or dir); with --model it also replaces the encoder the model config names "
        "(default there: the model's own CLIP; with --predictions CLIPScore is skipped without it)",
    )
    p.add_argument("--no-clipscore", action="store_true", help="skip CLIPScore / RefCLIPScore")
    p.add_argument("--no-spice", action="store_true", help="skip SPICE (slow; needs Java and Stanford CoreNLP jars)")
    p.add_argument("--device", help="torch device, e.g. cuda (default: cpu)")
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate, format_table

    result = evaluate(
        model=args.model,
        data=args.data,
        predictions=args.predictions,
        references=args.references,
        out=args.out,
        split=args.split,
        format=args.format,
        images=args.images,
        clip_model=args.clip_model,
        clipscore=not args.no_clipscore,
        spice=not args.no_spice,
        batch_size=args.batch_size,
        device=args.device,
        num_beams=args.beams,
        max_new_tokens=args.max_new_tokens,
        length_penalty=args.length_penalty,
        limit=args.limit,
    )
    print(format_table(result))
    return 0


# -- caption -----------------------------------------------------------------------------------------------------
def _count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_caption(sub) -> None:
    p = sub.add_parser(
        "caption",
        help="caption image files, directories or globs",
        description="Caption images with a model dir. Directories are searched recursively and globs expanded "
        "(both pick files with an image extension). One record per image goes to stdout as its batch finishes: "
        'JSON lines {"image": ..., "caption": ...} ({"image": ..., "captions": [...]} with --num-captions > 1) '
        "or CSV. A bad image (missing, corrupt, not an image, too many pixels) is skipped with one line on stderr; "
        "the exit status is non-zero only when no image could be captioned.",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR_OR_GLOB", help="image files, directories or globs")
    p.add_argument("--model", required=True, help="model dir (or HF Hub id) to caption with")
    p.add_argument("--beams", type=_count, default=1, help="beam width; 1 is greedy decoding (default: 1)")
    p.add_argument(
        "--max-new-tokens", type=_count, default=67, help="longest caption in tokens (default: 67, the original's)"
    )
    p.add_argument(
        "--num-captions", type=_count, default=1, help="captions per image, the best beams (needs --beams >= N)"
    )
    p.add_argument("--batch-size", type=_count, default=32, help="images encoded and decoded together (default: 32)")
    p.add_argument("--format", choices=["jsonl", "csv"], default="jsonl", help="stdout format (default: jsonl)")
    p.add_argument("--clip-model", help="CLIP encoder dir or id (default: the one named in the model's config)")
    p.add_argument(
        "--device", default="auto", help="torch device, e.g. cuda:0 (default: cuda when available, else cpu)"
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        help="weights and compute dtype (default: as saved; float16/bfloat16 are for GPUs)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary line (bad images still reported)")
    p.set_defaults(func=cmd_caption)


def cmd_caption(args) -> int:
    from .captioner import Captioner

    Captioner.from_pretrained(
        args.model, clip_model=args.clip_model, device=args.device, dtype=args.dtype, batch_size=args.batch_size
    ).caption_files(
        args.images,
        sys.stdout,
        fmt=args.format,
        progress=not args.quiet,
        num_beams=args.beams,
        max_new_tokens=args.max_new_tokens,
        num_return_sequences=args.num_captions,
    )
    return 0


# -- train -------------------------------------------------------------------------------------------------------
def add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a ClipCap model on an embedding store",
        description="Train the mapping network (and optionally the LM) on (CLIP embedding, caption) pairs of an "
        "embedding store made by `clipcap embed`. Defaults are the original implementation's. Runs on CPU, one GPU, "
        "or many GPUs / nodes when started with `torchrun` or `accelerate launch` (DDP). Writes RUN_DIR/final/ (a "
        "model dir for `clipcap caption --model`), RUN_DIR/best/ (lowest validation loss, with validation data), "
        "RUN_DIR/metrics.jsonl, RUN_DIR/loss.png, RUN_DIR/skipped.jsonl and RUN_DIR/checkpoints/.",
    )
    p.add_argument("--data", required=True, help="embedding store to train on (`clipcap embed --out`)")
    p.add_argument("--out", required=True, help="run dir to write (RUN_DIR)")
    p.add_argument("--lm", default="gpt2", help="HF id or dir of the causal LM and its tokenizer (default: gpt2)")
    p.add_argument("--mapping", choices=["mlp", "transformer"], default="mlp", help="mapping network (default: mlp)")
    p.add_argument("--prefix-length", type=int, default=10, help="prefix length k (default: 10)")
    p.add_argument("--clip-length", type=int, help="transformer mapper's clip_length (default: the prefix length)")
    p.add_argument("--num-layers", type=int, default=8, help="transformer mapper layers (default: 8)")
    lm = p.add_mutually_exclusive_group()
    lm.add_argument(
        "--tune-lm", dest="tune_lm", action="store_true", default=None, help="train the LM too (default for mlp)"
    )
    lm.add_argument(
        "--frozen-lm",
        dest="tune_lm",
        action="store_false",
        help="train only the mapping network (default for transformer, the paper's pairing)",
    )
    p.add_argument("--epochs", type=int, default=10, help="passes over every (image, caption) pair (default: 10)")
    p.add_argument("--batch-size", type=int, default=40, help="pairs per batch per process (default: 40)")
    p.add_argument("--lr", type=float, default=2e-5, help="AdamW learning rate (default: 2e-5)")
    p.add_argument("--lm-lr", type=float, help="separate, e.g. lower, learning rate for a tuned LM (default: --lr)")
    p.add_argument(
        "--warmup-steps",
        type=int,
        default=5000,
        help="linear warm-up steps, then linear decay to 0 (default: 5000; clipped to 10%% of a shorter run)",
    )
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: 0, as the original)")
    p.add_argument(
        "--grad-accum", type=int, default=1, help="micro-batches accumulated per optimizer step (default: 1)"
    )
    p.add_argument("--max-grad-norm", type=float, help="clip the gradient norm to this (default: no clipping)")
    p.add_argument(
        "--max-caption-tokens",
        type=int,
        default=67,
        help="longest caption in tokens, end token included; longer ones are skipped and counted (default: 67)",
    )
    p.add_argument(
        "--mixed-precision",
        choices=["auto", "no", "fp16", "bf16"],
        default="auto",
        help="autocast precision (default: auto = bf16, or fp16 without bf16 support, on GPU; fp32 on CPU)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation, sample order and noise (default: 0)")
    p.add_argument("--split", help="train only on images of this split of --data (default: all)")
    p.add_argument("--val-data", help="embedding store for validation loss and sample captions")
    p.add_argument("--val-split", help="split of --val-data (or of --data when --val-data is not given) to validate on")
    p.add_argument(
        "--val-every", type=int, default=0, help="validate every N steps as well as after each epoch (default: 0)"
    )
    p.add_argument("--num-samples", type=int, default=4, help="sample captions logged per validation (default: 4)")
    p.add_argument("--log-every", type=int, default=50, help="log the training loss every N steps (default: 50)")
    p.add_argument(
        "--save-every", type=int, default=1000, help="checkpoint every N steps and after each epoch (default: 1000)"
    )
    p.add_argument("--keep-checkpoints", type=int, default=2, help="checkpoints kept, newest first (default: 2)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue RUN_DIR from its newest checkpoint exactly where it stopped (starts fresh if there is none)",
    )
    p.add_argument(
        "--text-only",
        action="store_true",
        help="CapDec: train on CLIP text embeddings (`clipcap embed --text-only`) with noise; caption images later",
    )
    p.add_argument(
        "--noise-variance", type=float, default=0.016, help="--text-only Gaussian noise variance (default: 0.016)"
    )
    p.add_argument(
        "--tokens",
        action="store_true",
        help="the transformer mapper reads the store's image tokens (`embed --tokens`) instead of one pooled vector",
    )
    p.add_argument("--lm-text", help="plain-text file (one passage per line) for extra LM loss while tuning the LM")
    p.add_argument("--lm-text-weight", type=float, default=0.0, help="weight of the --lm-text loss (default: 0 = off)")
    p.add_argument("--lm-text-block", type=int, default=64, help="tokens per packed --lm-text block (default: 64)")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    from .train import TrainConfig, train

    fields = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    train(TrainConfig(**fields))
    return 0


# -- entry point -------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipcap",
        description="ClipCap: CLIP prefix captioning — convert, caption, embed, train, evaluate, serve.",
    )
    parser.add_argument("--version", action="version", version=f"clipcap {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (add_convert, add_demo, add_experiment, add_embed, add_serve, add_evaluate, add_caption, add_train):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # our own progress bars and messages only
    hf_logging.disable_progress_bar()
    try:
        return int(args.func(args) or 0)
    except ClipCapError as e:
        print(f"clipcap {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"clipcap {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
