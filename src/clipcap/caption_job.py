"""Captioning at dataset scale: image files, any source `embed` reads, or an embedding store -> captions.

Inputs (`input_format`; detected by default):
- `images`: image files, directories (searched recursively) and globs;
- a dataset source in any format `embed` reads (karpathy, coco, nocaps, cc, csv, jsonl, parquet, folder,
  webdataset), with its keys and its own metadata;
- `store`: an embedding store, ours or clip-retrieval's (img_emb/*.npy + metadata/*.parquet), captioned from the
  stored vectors without reading a single image. Its encoder must be the model's (`check_store`).

Without an output dir, `caption_stream` yields each item's captions (or why it was skipped) in input order as its
batch finishes. With one, `caption_job` cuts the items into fixed shards of `shard_size`: shard i always holds the same
items in the same batches, and is written atomically (its skip list, then its captions file, whose presence marks it
done), so a rerun after any interruption, even a SIGKILL, finishes only the missing shards and gives the same output
as an uninterrupted run; job.json refuses a different command on the same dir (`jobs.py`). Under torchrun rank r takes
shards r, r + world, ...; whichever process finds every shard done writes info.json and the merged skipped.jsonl.

Images are decoded and preprocessed in DataLoader workers while the main process encodes and generates.
"""

from __future__ import annotations

import base64
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .caption_report import HISTOGRAM, ScoreFilterOptions, dataset_report, passed, repeated_ngram, write_histogram
from .data.loading import image_loader
from .data.sources import FORMATS, Record, detect_format, is_shard_pattern, path_key, read_images, read_source
from .data.store import EmbeddingStore, arrow, is_store, reason_class, write_json
from .decoding import DecodingOptions
from .devices import DEVICE_HELP
from .encoder import same_encoder
from .errors import ClipCapError
from .hub import resolve_dir
from .images import is_image_file
from .jobs import claim_job, dir_fingerprint, items_digest, rank_and_world, shards_of
from .limits import MAX_BATCH_SIZE, MAX_CAPTIONS, MAX_WORKERS
from .options import option
from .outputs import CAPTIONS, claim_dir, replace_atomically
from .rerank import Scored, candidate_decoding, image_inputs, score_embeddings, text_tower_problem

logger = logging.getLogger(__name__)

INPUT_KINDS = ("images", "store", *FORMATS)
SHARD_FORMATS = ("parquet", "jsonl")
COMMAND, KIND = "clipcap caption", "caption job"
INFO, SKIPPED = "info.json", "skipped.jsonl"
OUTPUT_ENTRIES = ("job.json", "captions", "skipped", INFO, SKIPPED, HISTOGRAM)  # what a job writes in its output dir
OWN_COLUMNS = ("key", "image", "caption", "captions", "clip_score", "logprob", "clip_scores", "logprobs", "candidates",
               "repeated_ngram", "passed")  # fmt: skip
SOURCE_SUFFIXES = (".json", ".tsv", ".csv", ".jsonl", ".parquet")
SCORING = ("candidates", "rerank", "rerank_weight", "min_clip_score", "drop_below", "collapse_threshold")


@dataclass(kw_only=True)
class CaptionJobConfig(ScoreFilterOptions, DecodingOptions):
    """What to caption, with which model, and where the captions go."""

    inputs: list[str] = option(
        positional=True,
        metavar="INPUT",
        help="image files, directories (searched recursively) or globs; or one dataset source (any format embed "
        "reads) or embedding store (ours or clip-retrieval's), captioned from its stored vectors",
    )
    model: str = option(help="model dir (or HF Hub id) to caption with")
    out: str | None = option(
        None,
        help="directory for sharded, resumable output (rerun the same command to finish an interrupted job; under "
        "torchrun each process takes its share of the shards)",
        default_text="none: records stream out as they are captioned",
    )
    overwrite: bool = option(
        False, help="start the job in the output dir over: its earlier captions are deleted (other files kept)"
    )
    input_format: str = option(
        "auto",
        choices=("auto", *INPUT_KINDS),
        help="what the inputs are: images, an embedding store, or a dataset source format (auto: detected)",
    )
    image_root: str | None = option(
        None,
        help="image root for sources that name images by relative path (default: the source file's folder); for cc, "
        "the img2dataset output whose .json sidecars map URLs to images",
    )
    split: str | None = option(None, help="only this split of a dataset source or store")
    image_column: str | None = option(None, help="CSV/JSONL/parquet column holding the image path (default: guessed)")
    num_captions: int = option(
        1, min=1, max=MAX_CAPTIONS, help="captions per image: the best beams (needs beams >= N) or samples"
    )
    batch_size: int = option(32, min=1, max=MAX_BATCH_SIZE, help="images (or stored embeddings) captioned together")
    workers: int = option(
        2, min=0, max=MAX_WORKERS, help="image-decoding worker processes, ahead of generation; 0 decodes in-process"
    )
    shard_size: int = option(10_000, min=1, help="items per output shard (with an output dir)")
    shard_format: str = option(
        "parquet", choices=SHARD_FORMATS, help="output shard files (with an output dir): parquet or JSON lines"
    )
    clip_model: str | None = option(None, help="CLIP encoder dir or id", default_text="the one the model config names")
    device: str = option("auto", help=DEVICE_HELP)
    dtype: str | None = option(
        None,
        choices=("float32", "float16", "bfloat16"),
        help="weights and compute dtype (float16/bfloat16 are for GPUs)",
        default_text="as saved",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.overwrite and self.out is None:
            raise ClipCapError("`overwrite` starts an output dir over: it needs `out` (without it nothing is written)")


# -- inputs ------------------------------------------------------------------------------------------------------
def input_kind(cfg: CaptionJobConfig) -> str:
    """The kind of `cfg.inputs`: `input_format`, or the detected kind when that is "auto"."""
    return detect_input(cfg.inputs) if cfg.input_format == "auto" else cfg.input_format


def detect_input(inputs: list[str]) -> str:
    """The input kind of `inputs`: "store" for an embedding store, a source format for one dataset file or set of
    webdataset shards, else "images" (image files, directories and globs)."""
    if len(inputs) != 1:
        return "images"
    item = inputs[0]
    path = Path(item).expanduser()
    if is_store(path):
        return "store"
    if is_shard_pattern(item) or (path.is_file() and path.suffix.lower() in SOURCE_SUFFIXES):
        return detect_format(item)
    if path.is_dir() and not any(is_image_file(p) for p in path.rglob("*")) and next(path.rglob("*.tar"), None):
        return "webdataset"
    return "images"


@dataclass
class Inputs:
    """The items to caption: records (images and sources) or the images of a store, with the reason each item the
    reader could not use is skipped (by item index)."""

    kind: str
    records: list[Record] | None = None
    store: EmbeddingStore | None = None
    bad: dict[int, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.store.num_images if self.store is not None else len(self.records)

    def names(self, indices: list[int]) -> list[tuple[str, str | None]]:
        """(key, image reference) of the given items, as text that can be written out."""
        if self.store is None:
            return [
                (self.records[n].key, path_key(self.records[n].image) if self.records[n].image else None)
                for n in indices
            ]
        return _store_names(self.store.metadata(indices), indices)


def _store_image_column(names: list[str]) -> str | None:
    return next((c for c in ("image_path", "url") if c in names), None)


def _store_names(table, indices: list[int]) -> list[tuple[str, str | None]]:
    """(key, image) of store rows: its `key` column (else the row number) and `image_path` (else `url`) column."""
    keys = table.column("key").to_pylist() if "key" in table.column_names else [None] * len(indices)
    column = _store_image_column(table.column_names)
    images = table.column(column).to_pylist() if column else [None] * len(indices)
    return [
        (str(k) if k is not None else str(n), str(i) if i is not None else None)
        for n, k, i in zip(indices, keys, images, strict=True)
    ]


def open_inputs(cfg: CaptionJobConfig) -> Inputs:
    """Read what `cfg.inputs` names (records are listed whole; a store is opened, not loaded)."""
    kind = input_kind(cfg)
    if kind in ("images", "store"):
        given = [n for n in ("image_root", "image_column") if getattr(cfg, n) is not None]
        given += ["split"] if kind == "images" and cfg.split is not None else []
        if given:
            raise ClipCapError(f"`{given[0]}` applies to dataset sources, not to {kind} inputs")
    if kind == "images":
        return Inputs(kind, records=list(read_images(cfg.inputs)))
    if len(cfg.inputs) != 1:
        raise ClipCapError(
            f"caption one dataset source or store at a time, not {len(cfg.inputs)} inputs ({', '.join(cfg.inputs)})"
        )
    source = cfg.inputs[0]
    if kind == "store":
        if not is_store(source):
            raise ClipCapError(f"{source} is not an embedding store (no img_emb/ or text_emb/ directory in it)")
        inputs = Inputs(kind, store=EmbeddingStore(source, caption_column=None, split=cfg.split))
        if not len(inputs):
            raise ClipCapError(f"{source} holds no embeddings to caption")
        return inputs
    records = list(
        read_source(
            source, kind, images=cfg.image_root, split=cfg.split, image_column=cfg.image_column, require_captions=False
        )
    )
    bad, seen = {}, set()
    for n, rec in enumerate(records):
        if rec.problem:
            bad[n] = rec.problem
        elif rec.key in seen:
            bad[n] = "duplicate key (first occurrence kept)"
        seen.add(rec.key)
    if not records:
        raise ClipCapError(f"{source} holds no items to caption")
    return Inputs(kind, records=records, bad=bad)


# -- the model ---------------------------------------------------------------------------------------------------
def check_store(store: EmbeddingStore, captioner) -> None:
    """Refuse a store whose vectors the model cannot caption: text embeddings, another size, another encoder, or
    normalised vectors for a model that maps raw ones. A store that records no encoder (clip-retrieval's) is taken
    to come from the model's encoder when the size matches, and a warning says so."""
    config, name = captioner.model.config, captioner.clip_model
    if store.modality != "image":
        raise ClipCapError(f"{store.path} holds {store.modality} embeddings, not image embeddings")
    if store.clip_dim != config.clip_dim:
        raise ClipCapError(
            f"{store.path} holds {store.clip_dim}-d embeddings but the model expects {config.clip_dim}-d ones "
            f"(from {name})"
        )
    if store.clip_model is None:
        logger.warning(
            "%s records no encoder: its %d-d embeddings are taken to come from %s, the model's encoder (only their "
            "size can be checked)",
            store.path,
            store.clip_dim,
            name,
        )
    elif not same_encoder(store.clip_model, name, store.clip_fingerprint):
        raise ClipCapError(
            f"{store.path} was embedded with {store.clip_model}, but the model expects embeddings from {name}: embed "
            "the data with the model's encoder, or name the store's encoder as `clip_model` if the model was trained "
            "on it"
        )
    tokens = config.token_shape
    if tokens is not None and (store.token_shape is None or list(store.token_shape) != list(tokens)):
        held = "no image tokens" if store.token_shape is None else f"image tokens of shape {list(store.token_shape)}"
        raise ClipCapError(
            f"{store.path} holds {held}, but the model reads image tokens of shape {list(tokens)}: embed the data "
            "with `tokens` (and the model's token grid)"
        )
    if tokens is not None and store.token_grid != config.token_grid:
        raise ClipCapError(
            f"{store.path} pooled its image tokens to grid {store.token_grid}, the model to {config.token_grid}"
        )
    if store.normalized and not config.normalize_prefix:
        raise ClipCapError(
            f"{store.path} holds L2-normalised embeddings but the model maps raw ones (normalize_prefix is off in its "
            "config), so its captions of them would be wrong: embed without normalising, or use a model trained on "
            "normalised embeddings"
        )


def load_captioner(cfg: CaptionJobConfig, inputs: Inputs, device: str | None = None):
    """The Captioner for `cfg` (without an image encoder for a store, whose vectors it checks) and the keyword
    arguments for its decoding; `device` overrides `cfg.device` for a process that only prepares the job."""
    from .captioner import Captioner

    store = inputs.store
    if store is not None and store.clip_model is None and cfg.needs_clip:
        raise ClipCapError(
            f"{store.path} does not record which encoder made its embeddings, so captions cannot be scored against "
            "them (CLIPScore): embed the data with the model's encoder, or leave `rerank` and `min_clip_score` unset"
        )
    load = dict(clip_model=cfg.clip_model, device=device or cfg.device, dtype=cfg.dtype, batch_size=cfg.batch_size)
    # A store's vectors are captioned without the vision tower; the encoder is loaded for its text tower (the
    # CLIPScore of every caption) when the store names it.
    try:
        with_encoder = store is None or store.clip_model is not None
        captioner = Captioner.from_pretrained(cfg.model, load_encoder=with_encoder, **load)
    except ClipCapError as e:
        if store is None or cfg.needs_clip:
            raise
        # The vectors caption without the encoder, as they always could: only the scores are lost, and said so.
        logger.warning("captions get no clip_score: %s", e)
        captioner = Captioner.from_pretrained(cfg.model, load_encoder=False, **load)
    if store is not None:
        check_store(store, captioner)
    problem = text_tower_problem(captioner.encoder)
    if problem and cfg.needs_clip:
        raise ClipCapError(f"CLIP reranking and `min_clip_score` need the model's CLIP text tower: {problem}")
    if cfg.num_captions > 1 and (cfg.candidates is not None or cfg.min_clip_score is not None):
        name = "candidates" if cfg.candidates is not None else "min_clip_score"
        raise ClipCapError(f"`{name}` applies to one caption per image, not to `num_captions` {cfg.num_captions}")
    return captioner, candidate_decoding(
        captioner.decoding(cfg, cfg.num_captions), cfg.candidates, beams_given=cfg.num_beams is not None
    )


def clip_unavailable(captioner, inputs: Inputs) -> str | None:
    """Why the captions of this job get no CLIPScore, or None."""
    if inputs.store is not None and inputs.store.clip_model is None:
        return f"{inputs.store.path} does not record which encoder made its embeddings"
    return text_tower_problem(captioner.encoder)


def _caption_batches(captioner, inputs: Inputs, batches: list[list[int]], decoding: dict, cfg: CaptionJobConfig):
    """For each batch of item indices, in order: ({index: Scored}, {index: reason}). Stored vectors are read
    straight from the store; images are decoded by `workers` DataLoader processes ahead of generation. Several
    captions per image (`num_captions`) come as one Scored whose candidates are in the search's order."""
    several = cfg.num_captions > 1
    count = cfg.num_captions if several else cfg.candidates or 1
    scorable = clip_unavailable(captioner, inputs) is None

    def generate(embeds: torch.Tensor, features: torch.Tensor | None) -> list[Scored]:
        features = features if scorable else None
        return score_embeddings(
            captioner, embeds, features, decoding, count, cfg.rerank, cfg.rerank_weight, keep_order=several
        )

    if inputs.store is not None:
        reads_tokens = captioner.model.config.token_shape is not None
        for batch in batches:
            vectors = inputs.store.image_tokens(batch) if reads_tokens else inputs.store.image_embeddings(batch)
            finite = np.isfinite(vectors.reshape(len(batch), -1)).all(axis=1)
            good = [n for n, ok in zip(batch, finite, strict=True) if ok]
            failed = {n: "stored embedding is not finite" for n, ok in zip(batch, finite, strict=True) if not ok}
            pooled = inputs.store.image_embeddings(batch)[finite] if reads_tokens else vectors[finite]
            captions = generate(torch.from_numpy(vectors[finite]), torch.from_numpy(pooled)) if good else []
            yield dict(zip(good, captions, strict=True)), failed
        return
    encoder = captioner.encoder
    pin = encoder.device.type == "cuda"
    for good, pixels, failed in image_loader(inputs.records, encoder.processor, batches, cfg.workers, pin_memory=pin):
        captions = generate(*image_inputs(captioner, pixels)) if good else []
        yield dict(zip(good, captions, strict=True)), failed


def _batches(indices: list[int], size: int) -> list[list[int]]:
    return [indices[i : i + size] for i in range(0, len(indices), size)]


# -- streaming ---------------------------------------------------------------------------------------------------
@dataclass
class Captioned:
    """One item's outcome: its captions (with their scores), or the reason it was skipped."""

    key: str
    image: str | None
    captions: list[str] | None
    reason: str | None = None
    fields: dict | None = None  # the output fields after key and image (`row_fields`)
    dropped: bool = False  # captioned, but below `min_clip_score` with `drop_below`


def row_fields(scored: Scored, cfg: CaptionJobConfig) -> dict:
    """An item's output fields: caption, clip_score, logprob, repeated_ngram, passed and, with `candidates`, the
    runners-up as [{caption, clip_score, logprob}]; with several captions per image, captions, clip_scores and
    logprobs (lists, in the search's order)."""
    if cfg.num_captions > 1:
        every = scored.candidates
        return {
            "captions": [c.caption for c in every],
            "clip_scores": [c.clip_score for c in every],
            "logprobs": [c.logprob for c in every],
        }
    out = {
        "caption": scored.caption,
        "clip_score": scored.clip_score,
        "logprob": scored.logprob,
        "repeated_ngram": repeated_ngram(scored.caption),
        "passed": passed(scored.clip_score, cfg.min_clip_score),
    }
    if cfg.candidates is not None:
        out["candidates"] = [c.to_dict() for c in scored.runners_up]
    return out


def caption_stream(cfg: CaptionJobConfig, progress: bool = False) -> Iterator[Captioned]:
    """Caption every item of `cfg.inputs`, yielding outcomes in input order as each batch finishes."""
    from tqdm.auto import tqdm

    inputs = open_inputs(cfg)
    captioner, decoding = load_captioner(cfg, inputs)
    good = [n for n in range(len(inputs)) if n not in inputs.bad]
    batches = _batches(good, cfg.batch_size)
    unreadable = sorted(inputs.bad)
    bar = tqdm(total=len(inputs), unit="img", desc="captioning", disable=not progress or len(inputs) < 2)

    def outcomes(indices: list[int], captions: dict, failed: dict) -> Iterator[Captioned]:
        for n, (key, image) in zip(indices, inputs.names(indices), strict=True):
            reason = inputs.bad.get(n) or failed.get(n)
            scored = captions.get(n)
            if scored is None:
                yield Captioned(key, image, None, reason)
                continue
            fields = row_fields(scored, cfg)
            texts = [fields["caption"]] if "caption" in fields else fields["captions"]
            yield Captioned(key, image, texts, None, fields, cfg.drop_below and not fields["passed"])
        bar.update(len(indices))

    generated = _caption_batches(captioner, inputs, batches, decoding, cfg)
    with bar:
        done = 0
        for batch, (captions, failed) in zip(batches, generated, strict=True):
            # Items the reader could not use come out where they stand in the input.
            start = done
            while done < len(unreadable) and unreadable[done] < batch[-1]:
                done += 1
            yield from outcomes(sorted(unreadable[start:done] + batch), captions, failed)
        yield from outcomes(unreadable[done:], {}, {})


# -- sharded jobs ------------------------------------------------------------------------------------------------
def _items_digest(records: list[Record]) -> str:
    """Everything of the records that reaches the output: keys, images, problems and the metadata columns."""
    return items_digest([r.key, r.image, r.problem, r.split, r.captions, r.extra] for r in records)


def _job_record(cfg: CaptionJobConfig, inputs: Inputs, captioner, decoding: dict) -> dict:
    """The parameters that decide the output: a rerun with the same ones resumes, any other is refused."""
    model_dir = resolve_dir(cfg.model)
    resolved = [str(Path(i).resolve()) if Path(i).exists() else i for i in cfg.inputs]
    return {
        "command": "caption",
        "inputs": resolved,
        "input_format": inputs.kind,
        "image_root": str(Path(cfg.image_root).resolve()) if cfg.image_root is not None else None,
        "split": cfg.split,
        "image_column": cfg.image_column,
        "num_items": len(inputs),
        "items_sha256": _items_digest(inputs.records) if inputs.records is not None else None,
        "model": str(model_dir.resolve()),
        "model_fingerprint": dir_fingerprint(model_dir),
        "clip_model": str(captioner.clip_model),
        "clip_fingerprint": dir_fingerprint(str(captioner.clip_model)),
        "decoding": decoding,
        "num_captions": cfg.num_captions,
        "batch_size": cfg.batch_size,
        "dtype": cfg.dtype,
        "device": cfg.device,
        "shard_size": cfg.shard_size,
        "shard_format": cfg.shard_format,
        **{name: getattr(cfg, name) for name in SCORING},
    }


def _free_name(name: str, taken: set[str]) -> str:
    while name in taken:
        name = f"source_{name}"
    return name


def _json_value(value):
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def caption_schema(pa, num_captions: int, candidates: bool):
    """The output's own fields after key and image (docs/design.md, "Caption rows")."""
    if num_captions > 1:
        return [
            pa.field("captions", pa.list_(pa.string())),
            pa.field("clip_scores", pa.list_(pa.float64())),
            pa.field("logprobs", pa.list_(pa.float64())),
        ]
    fields = [
        pa.field("caption", pa.string()),
        pa.field("clip_score", pa.float64()),
        pa.field("logprob", pa.float64()),
        pa.field("repeated_ngram", pa.string()),
        pa.field("passed", pa.bool_()),
    ]
    if candidates:
        entry = pa.struct([("caption", pa.string()), ("clip_score", pa.float64()), ("logprob", pa.float64())])
        fields.append(pa.field("candidates", pa.list_(entry)))
    return fields


class _Columns:
    """The output columns, the same in every shard: key, image, the caption fields (`caption_schema`), then the
    source's own metadata columns (for a store, its metadata columns as stored; for a source, split, its captions
    as `source_captions` and its extra fields), renamed `source_NAME` where a name is taken."""

    def __init__(self, inputs: Inputs, cfg: CaptionJobConfig):
        pa, _, _ = arrow("sharded output")
        self.pa = pa
        self.inputs = inputs
        self.own = caption_schema(pa, cfg.num_captions, cfg.candidates is not None)
        taken = set(OWN_COLUMNS)
        self.fields = []  # (output name, source name, arrow type, as JSON text)
        if inputs.store is not None:
            schema = inputs.store.metadata_schema
            used = {"key", _store_image_column(schema.names)}  # they are the key and image columns
            for f in schema:
                if f.name not in used:
                    name = _free_name(f.name, taken)
                    taken.add(name)
                    self.fields.append((name, f.name, f.type, False))
            return
        good = [r for n, r in enumerate(inputs.records) if n not in inputs.bad]
        columns = {}
        if any(r.split is not None for r in good):
            columns["split"] = [r.split for r in good]
        if any(r.captions for r in good):
            columns["source_captions"] = [r.captions for r in good]
        for name in dict.fromkeys(k for r in good for k in r.extra):
            columns[f"extra:{name}"] = [r.extra.get(name) for r in good]
        for source, values in columns.items():
            name = _free_name(source.removeprefix("extra:"), taken)
            taken.add(name)
            try:
                kind = pa.array(values).type
                as_json = False
            except (pa.ArrowException, TypeError, ValueError, OverflowError):
                kind, as_json = pa.string(), True  # mixed types across rows: kept as JSON text
            self.fields.append((name, source, pa.string() if pa.types.is_null(kind) else kind, as_json))

    @property
    def names(self) -> list[str]:
        return ["key", "image", *(f.name for f in self.own), *(name for name, *_ in self.fields)]

    def table(self, indices: list[int], rows: dict[int, dict]):
        """The rows of the captioned items `indices` (in order; `rows`: their `row_fields`) as one Arrow table."""
        pa = self.pa
        meta = self.inputs.store.metadata(indices) if self.inputs.store is not None else None
        names = _store_names(meta, indices) if meta is not None else self.inputs.names(indices)
        arrays = {
            "key": pa.array([k for k, _ in names], pa.string()),
            "image": pa.array([i for _, i in names], pa.string()),
            **{f.name: pa.array([rows[n][f.name] for n in indices], f.type) for f in self.own},
        }
        for name, source, kind, as_json in self.fields:
            if meta is not None:
                arrays[name] = meta.column(source)
                continue
            values = [self._value(self.inputs.records[n], source) for n in indices]
            if as_json:
                values = [None if v is None else json.dumps(v, ensure_ascii=False, sort_keys=True) for v in values]
            arrays[name] = pa.array(values, kind)
        return pa.table(arrays)

    @staticmethod
    def _value(record: Record, source: str):
        if source == "split":
            return record.split
        if source == "source_captions":
            return record.captions
        return record.extra.get(source.removeprefix("extra:"))


@dataclass
class CaptionJobResult:
    """Where the output is, this process's rank, and info.json once every shard is written (None on a rank that
    finished while others still work)."""

    out: Path
    rank: int
    world: int
    info: dict | None


class _ShardFiles:
    """OUT/captions/part-NNNNN.{parquet,jsonl} and OUT/skipped/part-NNNNN.jsonl."""

    def __init__(self, out: Path, fmt: str, num_shards: int):
        self.out, self.fmt, self.num_shards = out, fmt, num_shards
        self.width = max(5, len(str(num_shards - 1)))
        self.captions_dir, self.skipped_dir = out / "captions", out / "skipped"

    def captions(self, i: int) -> Path:
        return self.captions_dir / f"part-{i:0{self.width}d}.{self.fmt}"

    def skipped(self, i: int) -> Path:
        return self.skipped_dir / f"part-{i:0{self.width}d}.jsonl"

    def done(self, i: int) -> bool:
        return self.captions(i).is_file()

    def write(self, i: int, table, skipped: list[dict]) -> None:
        """The skip list, then the captions (whose file marks the shard done), each atomically."""
        _, _, pq = arrow("sharded output")
        lines = "".join(json.dumps({**s, "shard": i}, ensure_ascii=False) + "\n" for s in skipped)
        replace_atomically(self.skipped(i), lambda tmp: tmp.write_text(lines, encoding="utf-8"))
        if self.fmt == "parquet":
            replace_atomically(self.captions(i), lambda tmp: pq.write_table(table, tmp))
            return
        rows = "".join(json.dumps(r, ensure_ascii=False, default=_json_value) + "\n" for r in table.to_pylist())
        replace_atomically(self.captions(i), lambda tmp: tmp.write_text(rows, encoding="utf-8"))

    def rows(self, i: int) -> int:
        """How many rows shard i holds; a file damaged since it was written is one error naming it."""
        path = self.captions(i)
        damaged = f"{path} is damaged (%s): delete it and rerun the same command to redo that shard"
        if self.fmt == "parquet":
            pa, _, pq = arrow("sharded output")
            try:
                return pq.read_metadata(path).num_rows
            except (pa.ArrowException, OSError) as e:
                raise ClipCapError(damaged % str(e).splitlines()[0]) from None
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
            for line in lines:
                json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ClipCapError(damaged % e) from None
        return len(lines)

    def read_skipped(self, i: int) -> list[tuple[str, str, bool]]:
        """(line, reason, whether it was left out for its score) of each entry of shard i's skip list."""
        path = self.skipped(i)
        try:
            lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            entries = [json.loads(line) for line in lines]
            reasons = [(e["reason"], bool(e.get("dropped"))) for e in entries]
        except FileNotFoundError:
            raise ClipCapError(f"{path} is missing: delete {self.captions(i)} and rerun to redo that shard") from None
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ClipCapError(f"{path} is damaged ({e}): delete {self.captions(i)} and rerun to redo it") from None
        return [(line, reason, dropped) for line, (reason, dropped) in zip(lines, reasons, strict=True)]

    def columns(self, i: int, names: list[str]) -> dict[str, list]:
        """The named columns of shard i as lists."""
        path = self.captions(i)
        if self.fmt == "parquet":
            _, _, pq = arrow("sharded output")
            return pq.read_table(path, columns=names).to_pydict()
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        return {name: [r[name] for r in rows] for name in names}


@dataclass
class CaptionJob:
    """A claimed caption job, ready to caption any of its shards: its inputs, model, output columns and files."""

    cfg: CaptionJobConfig
    inputs: Inputs
    captioner: object
    decoding: dict
    columns: _Columns
    files: _ShardFiles
    encoder: dict  # which encoder the captions were made (or a store's vectors checked) with, for info.json
    no_clip: str | None  # why the captions get no CLIPScore, or None

    @property
    def num_shards(self) -> int:
        return self.files.num_shards

    def finalize(self, world: int = 1) -> dict | None:
        """info.json and the merged skipped.jsonl once every shard is written (else None); `world` > 1 when other
        processes may still be writing temporaries in the output dir."""
        if not all(self.files.done(s) for s in range(self.num_shards)):
            return None
        report = (self.cfg.collapse_threshold, self.no_clip)
        return _finalize(self.files, self.inputs, self.columns, len(self.inputs), world, self.encoder, report)


def open_job(cfg: CaptionJobConfig, load_device: str | None = None) -> CaptionJob:
    """Read the inputs, load the model and claim (or check) the job in `cfg.out`: what every process of a job does
    once before it captions shards. `load_device` overrides `cfg.device` (a driver that hands the shards to others
    loads the model on the CPU, to check it)."""
    if cfg.out is None:
        raise ClipCapError("a sharded job needs an output dir (`out`)")
    rank, world = rank_and_world()  # a bad RANK / WORLD_SIZE is refused before the model loads
    if cfg.overwrite and world > 1:
        raise ClipCapError("`overwrite` starts a job over from one process: run it without torchrun first")
    # Before minutes of reading and loading. The inputs are the existing paths among cfg.inputs and the model.
    out = claim_dir(
        cfg.out,
        CAPTIONS,
        COMMAND,
        OUTPUT_ENTRIES,
        inputs=[*cfg.inputs, cfg.model],
        overwrite=cfg.overwrite,
        resume=True,
        legacy="job.json",
    )
    inputs = open_inputs(cfg)
    captioner, decoding = load_captioner(cfg, inputs, load_device)
    columns = _Columns(inputs, cfg)
    claim_job(out, _job_record(cfg, inputs, captioner, decoding), COMMAND, KIND)
    num_shards = max(1, math.ceil(len(inputs) / cfg.shard_size))
    files = _ShardFiles(out, cfg.shard_format, num_shards)
    for d in (files.captions_dir, files.skipped_dir):
        d.mkdir(exist_ok=True)
    encoder, no_clip = captioner.encoder_info, clip_unavailable(captioner, inputs)
    return CaptionJob(cfg, inputs, captioner, decoding, columns, files, encoder, no_clip)


def caption_job(cfg: CaptionJobConfig, progress: bool = False) -> CaptionJobResult:
    """Caption `cfg.inputs` into sharded, resumable output in `cfg.out` (this process's share under torchrun)."""
    job = open_job(cfg)
    rank, world = rank_and_world()
    desc = "caption" + (f" [rank {rank}/{world}]" if world > 1 else "")
    caption_shards(job, shards_of(rank, world, job.num_shards), progress, desc)
    # the last process to finish writes info.json
    return CaptionJobResult(job.files.out, rank, world, job.finalize(world))


def caption_shards(job: CaptionJob, shards, progress: bool = False, desc: str = "caption") -> list[int]:
    """Caption and write those of `shards` not yet done; returns the shards this call wrote."""
    from tqdm.auto import tqdm

    cfg, inputs, files, columns = job.cfg, job.inputs, job.files, job.columns
    pending = [s for s in shards if not files.done(s)]
    items = {s: range(s * cfg.shard_size, min((s + 1) * cfg.shard_size, len(inputs))) for s in pending}
    batches, owners = [], []
    for shard in pending:
        for batch in _batches([n for n in items[shard] if n not in inputs.bad], cfg.batch_size):
            batches.append(batch)
            owners.append(shard)
    left = {s: owners.count(s) for s in pending}
    state = {s: ({}, {}) for s in pending}  # captions and reasons by item
    bar = tqdm(total=sum(len(items[s]) for s in pending), unit="img", desc=desc, disable=not progress)

    def finish(shard: int) -> None:
        captions, failed = state.pop(shard)
        failed.update({n: inputs.bad[n] for n in items[shard] if n in inputs.bad})
        rows = {n: row_fields(scored, cfg) for n, scored in captions.items()}
        below = {n for n, row in rows.items() if cfg.drop_below and not row["passed"]}
        kept = [n for n in items[shard] if n in rows and n not in below]
        lost = [n for n in items[shard] if n in failed]
        skipped = [
            {"key": key, "image": image, "reason": failed[n]}
            for n, (key, image) in zip(lost, inputs.names(lost), strict=True)
        ]
        # Left out for their score: recorded in the shard's skip list, so a resumed job still counts them.
        dropped = sorted(below)
        skipped += [
            {"key": key, "image": image, "reason": f"clip_score below the minimum ({rows[n]['clip_score']:.4f})",
             "dropped": True}
            for n, (key, image) in zip(dropped, inputs.names(dropped), strict=True)
        ]  # fmt: skip
        files.write(shard, columns.table(kept, rows), skipped)
        bar.update(sum(1 for n in items[shard] if n in inputs.bad))
        if skipped:
            counts: dict[str, int] = {}
            for s in skipped:
                counts[reason_class(s["reason"])] = counts.get(reason_class(s["reason"]), 0) + 1
            summary = ", ".join(f"{reason} {count}" for reason, count in sorted(counts.items()))
            logger.info("shard %d: skipped %d of %d (%s)", shard, len(skipped), len(items[shard]), summary)

    with bar:
        for shard in pending:
            if left[shard] == 0:  # nothing to caption in it: write its skip list now
                finish(shard)
        generated = _caption_batches(job.captioner, inputs, batches, job.decoding, cfg)
        for shard, batch, (captions, failed) in zip(owners, batches, generated, strict=True):
            state[shard][0].update(captions)
            state[shard][1].update(failed)
            bar.update(len(batch))
            left[shard] -= 1
            if left[shard] == 0:
                finish(shard)
    return pending


def _finalize(
    files: _ShardFiles, inputs: Inputs, columns: _Columns, num_items: int, world: int, encoder: dict, report: tuple
) -> dict:
    """Merge the skip lists into skipped.jsonl, write info.json with the dataset report (`caption_report`) and the
    clip_score histogram beside it (all the same whoever writes them). `encoder` says which encoder the model
    captioned with (or a store's vectors were checked against); `report`: (collapse threshold, why there is no
    CLIPScore or None)."""
    rows = [files.rows(i) for i in range(files.num_shards)]
    listed = [entry for i in range(files.num_shards) for entry in files.read_skipped(i)]
    skipped = [(line, reason) for line, reason, dropped in listed if not dropped]
    num_dropped = sum(dropped for *_, dropped in listed)
    by_reason: dict[str, int] = {}
    for _, reason in skipped:
        by_reason[reason_class(reason)] = by_reason.get(reason_class(reason), 0) + 1
    text = "".join(line + "\n" for line, _ in skipped)
    replace_atomically(files.out / SKIPPED, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    info = {
        "format": "clipcap-captions",
        "version": 1,
        "input_format": inputs.kind,
        "num_items": num_items,
        "num_captioned": sum(rows),
        "num_skipped": len(skipped),
        "num_dropped": num_dropped,
        "skipped_by_reason": dict(sorted(by_reason.items())),
        "num_shards": files.num_shards,
        "shard_format": files.fmt,
        "columns": columns.names,
        **encoder,
    }
    if "caption" in columns.names:  # one caption per row: the dataset report
        values = {name: [] for name in ("caption", "clip_score", "logprob", "repeated_ngram", "passed")}
        for i in range(files.num_shards):
            for name, column in files.columns(i, list(values)).items():
                values[name] += column
        threshold, no_clip = report
        info["report"] = dataset_report(
            values["caption"], values["clip_score"], values["logprob"], values["repeated_ngram"], values["passed"],
            num_dropped, threshold, no_clip,
        )  # fmt: skip
        scores = [v for v in values["clip_score"] if v is not None]
        info["histogram"] = HISTOGRAM if write_histogram(scores, files.out / HISTOGRAM) else None
    write_json(files.out / INFO, info)
    # Temporaries of processes killed mid-write; no process writes shards any more once every one is done.
    for d in (files.captions_dir, files.skipped_dir):
        for tmp in d.glob(".*.tmp*"):
            tmp.unlink(missing_ok=True)
    if world == 1:
        for tmp in files.out.glob(".*.tmp*"):
            tmp.unlink(missing_ok=True)
    return info
