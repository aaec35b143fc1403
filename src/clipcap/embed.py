"""Embedding a dataset: a captioning source -> an embedding store (data/store.py), batched, resumable, multi-process.

The record list is cut into fixed shards of `shard_size` records; shard i always holds the same records and is
encoded in the same batches, so it is a deterministic unit of work. A shard is complete once its embedding file
exists (written last, atomically): rerunning the same command after a kill skips complete shards and redoes the rest,
giving the same store as an uninterrupted run. Under `torchrun` (RANK / WORLD_SIZE in the environment) rank r takes
shards r, r + world, ...; whichever rank finds every shard complete writes info.json and skipped.jsonl.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .data.loading import image_loader
from .data.sources import FORMATS, Record, detect_format, read_source
from .data.store import StoreWriter
from .devices import DEVICE_HELP, resolve_device
from .encoder import ImageEncoder, fingerprint
from .errors import ClipCapError
from .jobs import claim_job, dir_fingerprint, items_digest, rank_and_world, shards_of
from .limits import MAX_BATCH_SIZE, MAX_WORKERS
from .options import check_options, option
from .outputs import STORE, claim_dir

# What `embed` writes in a store dir (data/store.py's layout), deleted by `overwrite`.
STORE_ENTRIES = ("job.json", "info.json", "skipped.jsonl", "skipped", "metadata", "img_emb", "text_emb", "tok_emb")


def _clean(records: list[Record]) -> tuple[list[Record], dict[int, str], dict[int, list[dict]]]:
    """Strip captions; mark records that cannot become rows (a problem found by the reader, duplicate key, no usable
    caption) and note captions dropped from otherwise good records. Returns (records, bad reason by index, notes by
    index)."""
    seen: set[str] = set()
    bad: dict[int, str] = {}
    notes: dict[int, list[dict]] = {}
    for n, rec in enumerate(records):
        captions = [c.strip() for c in rec.captions if isinstance(c, str)]
        kept = [c for c in captions if c]
        if rec.problem:
            bad[n] = rec.problem
        elif rec.key in seen:
            bad[n] = "duplicate key (first occurrence kept)"
        elif not rec.captions:
            bad[n] = "no captions"
        elif not kept:
            bad[n] = "empty caption (no non-empty caption left)"
        elif len(kept) < len(rec.captions):
            dropped = len(rec.captions) - len(kept)
            notes[n] = [
                {"key": rec.key, "image": rec.image, "reason": f"empty caption ({dropped} dropped, image kept)"}
            ]
        seen.add(rec.key)
        rec.captions = kept
    return records, bad, notes


@dataclass(kw_only=True)
class EmbedConfig:
    """What `embed` encodes, with which encoder, into which store."""

    source: str = option(
        positional=True,
        help="dataset: Karpathy/COCO/nocaps JSON, Conceptual Captions TSV, CSV/JSONL/parquet, a folder of images "
        "with .txt sidecars, or webdataset .tar shards (a dir, a glob or shard-{00000..00009}.tar)",
    )
    out: str = option(help="store directory to write (or resume)")
    overwrite: bool = option(False, help="start the store over: its earlier contents are deleted (other files kept)")
    clip_model: str = option(help="HF id or dir of the CLIP-family encoder")
    format: str = option("auto", choices=("auto", *FORMATS), help="source format (auto: from the extension or content)")
    images: str | None = option(
        None,
        help="image root for sources that name images by relative path (default: the source file's folder); "
        "for cc, the img2dataset output (folder or .tar shards) whose .json sidecars map URLs to images",
    )
    split: str | None = option(None, help="only this split (Karpathy: train, val, test, ...; restval counts as train)")
    batch_size: int = option(64, min=1, max=MAX_BATCH_SIZE, help="images per encoder forward pass")
    workers: int = option(2, min=0, max=MAX_WORKERS, help="image-decoding worker processes; 0 decodes in-process")
    text_only: bool = option(
        False,
        help="store CLIP text embeddings of the captions instead (one row per caption; for text-only training)",
    )
    normalize: bool = option(
        False, help="L2-normalise the embeddings, as clip-retrieval does (default: raw features, as the paper)"
    )
    shard_size: int = option(10_000, min=1, help="records per shard file")
    device: str = option("auto", help=DEVICE_HELP)
    image_column: str | None = option(None, help="CSV/JSONL/parquet column holding the image path (default: guessed)")
    caption_column: str | None = option(None, help="CSV/JSONL/parquet column holding the caption(s) (default: guessed)")
    tokens: bool = option(
        False,
        help="also store the vision tower's last hidden states of each image (tok_emb/*.npy), for a mapper that reads "
        "image tokens",
    )
    token_grid: int | None = option(
        None,
        min=1,
        metavar="N",
        help="with `tokens`: average-pool the patch tokens to an N x N grid (a class token is kept as it is)",
        default_text="every token",
    )

    def __post_init__(self) -> None:
        check_options(self)
        if self.tokens and self.text_only:
            raise ClipCapError("image tokens come from images: `tokens` cannot go with `text_only`")
        if self.token_grid is not None and not self.tokens:
            raise ClipCapError("`token_grid` pools image tokens: it needs `tokens`")


@dataclass
class EmbedResult:
    """Where the store is, and its info.json once every shard is written (None on a rank that finished early)."""

    out: Path
    rank: int
    world: int
    info: dict | None


def embed(cfg: EmbedConfig, progress: bool = False) -> EmbedResult:
    """Encode `cfg.source` into the store `cfg.out`.

    Image mode: one row per image with all its captions (training visits each (image, caption) pair). `text_only`:
    one row per caption holding the CLIP *text* embedding of that caption ("modality": "text"), for text-only
    (CapDec-style) training. `normalize` L2-normalises the vectors (what clip-retrieval stores hold); the default
    keeps the raw features the paper trained on. `tokens` also stores the vision tower's last hidden states per
    image (every token, or the patch grid average-pooled to `token_grid` x `token_grid`), for a mapper that reads
    them. Rerunning after an interruption resumes."""
    rank, world = rank_and_world()
    job = open_embed_job(cfg)
    desc = "embed" + (f" [rank {rank}/{world}]" if world > 1 else "")
    embed_shards(job, shards_of(rank, world, job.num_shards), progress, desc)
    # the last rank to finish writes info.json
    return EmbedResult(Path(cfg.out), rank, world, job.finalize())


@dataclass
class EmbedJob:
    """A claimed embedding job, ready to encode any of its shards: its records, encoder and store writer."""

    cfg: EmbedConfig
    records: list[Record]
    bad: dict[int, str]
    notes: dict[int, list[dict]]
    encoder: ImageEncoder
    writer: StoreWriter
    token_shape: tuple[int, int] | None
    num_shards: int

    def finalize(self) -> dict | None:
        """Write info.json and skipped.jsonl once every shard is written (else None)."""
        if not all(self.writer.shard_done(s) for s in range(self.num_shards)):
            return None
        return self.writer.finalize(self.num_shards)


def open_embed_job(
    cfg: EmbedConfig, clean_temporaries: bool | None = None, load_device: str | None = None
) -> EmbedJob:
    """Read the source, claim (or check) the store in `cfg.out` and load the encoder: what every process of a job
    does once before it encodes shards. `clean_temporaries` (default: when this is the only process) deletes what
    killed writers left behind, which is only safe while no other process writes; `load_device` overrides
    `cfg.device`."""
    # The source first: a source the options do not fit is refused before the store dir is made.
    fmt = detect_format(cfg.source) if cfg.format == "auto" else cfg.format
    records = list(
        read_source(
            cfg.source,
            fmt,
            images=cfg.images,
            split=cfg.split,
            image_column=cfg.image_column,
            caption_column=cfg.caption_column,
        )
    )
    records, bad, notes = _clean(records)
    _, world = rank_and_world()
    if cfg.overwrite and world > 1:
        raise ClipCapError("`overwrite` starts a store over from one process: run it without torchrun first")
    # The store may go inside the image root (`images`), not into the source or the encoder.
    out = claim_dir(
        cfg.out,
        STORE,
        "clipcap embed",
        STORE_ENTRIES,
        inputs=[cfg.source, cfg.clip_model],
        hosts=[cfg.images],
        overwrite=cfg.overwrite,
        resume=True,
        legacy="job.json",
    )
    source = cfg.source
    job = {
        "source": str(Path(source).resolve()) if Path(source).exists() else str(source),
        "format": fmt,
        "images": str(Path(cfg.images).resolve()) if cfg.images is not None else None,
        "split": cfg.split,
        "clip_model": str(cfg.clip_model),
        "clip_files": dir_fingerprint(cfg.clip_model),
        "records_sha256": items_digest([r.key, r.image, r.problem, r.split, r.captions, r.extra] for r in records),
        "text_only": cfg.text_only,
        "normalize": cfg.normalize,
        "shard_size": cfg.shard_size,
        "num_records": len(records),
        "image_column": cfg.image_column,
        "caption_column": cfg.caption_column,
        "tokens": cfg.tokens,
        "token_grid": cfg.token_grid,
    }
    claim_job(out, job, "clipcap embed", "store")
    if clean_temporaries is None:
        clean_temporaries = world == 1
    if clean_temporaries:  # temporaries left by a killed run; with several processes another may be writing one
        for tmp in out.rglob(".*.tmp*"):
            tmp.unlink(missing_ok=True)
    shard_size = cfg.shard_size
    num_shards = max(1, math.ceil(len(records) / shard_size))
    device = resolve_device(load_device or cfg.device)
    encoder = ImageEncoder.from_pretrained(cfg.clip_model, normalize=cfg.normalize, device=device)
    token_shape = _token_shape(encoder, cfg.token_grid) if cfg.tokens else None
    writer = StoreWriter(
        out,
        clip_model=str(cfg.clip_model),
        clip_dim=encoder.dim,
        normalized=cfg.normalize,
        modality="text" if cfg.text_only else "image",
        shard_size=shard_size,
        extra_info={
            "source": job["source"],
            "format": fmt,
            "split": cfg.split,
            "clip_fingerprint": fingerprint(str(cfg.clip_model)),
        },
        token_shape=token_shape,
        token_grid=cfg.token_grid,
    )
    return EmbedJob(cfg, records, bad, notes, encoder, writer, token_shape, num_shards)


def embed_shards(job: EmbedJob, shards, progress: bool = False, desc: str = "embed") -> list[int]:
    """Encode and write those of `shards` not yet done; returns the shards this call wrote."""
    from tqdm.auto import tqdm

    cfg, records, bad, notes, encoder, writer = job.cfg, job.records, job.bad, job.notes, job.encoder, job.writer
    token_shape, shard_size = job.token_shape, cfg.shard_size
    pending = [s for s in shards if not writer.shard_done(s)]
    shard_items = {s: range(s * shard_size, min((s + 1) * shard_size, len(records))) for s in pending}
    text_only = cfg.text_only
    todo = sum(len(records[n].captions) if text_only else 1 for s in pending for n in shard_items[s] if n not in bad)
    unit = "caption" if text_only else "img"
    bar = tqdm(total=todo, unit=unit, desc=desc, disable=not progress, dynamic_ncols=True)

    def write(shard: int, vectors: dict[int, np.ndarray], failed: dict[int, str], grids=None) -> None:
        rows = [n for n in shard_items[shard] if n in vectors]
        skipped = []
        for n in shard_items[shard]:
            reason = bad.get(n) or failed.get(n)
            if reason:
                skipped.append({"key": records[n].key, "image": records[n].image, "reason": reason})
            skipped.extend(notes.get(n, []))
        if text_only:
            rows = [(n, c) for n in rows for c in range(len(records[n].captions))]
            emb = [vectors[n][c] for n, c in rows]
            writer.write_shard(
                shard,
                np.stack(emb) if emb else np.zeros((0, encoder.dim), np.float32),
                keys=[f"{records[n].key}#{c}" for n, c in rows],
                captions=[[records[n].captions[c]] for n, c in rows],
                image_paths=[records[n].image for n, _ in rows],
                splits=[records[n].split for n, _ in rows],
                extras=[{**records[n].extra, "image_key": records[n].key} for n, _ in rows],
                skipped=skipped,
            )
            return
        writer.write_shard(
            shard,
            np.stack([vectors[n] for n in rows]) if rows else np.zeros((0, encoder.dim), np.float32),
            keys=[records[n].key for n in rows],
            captions=[records[n].captions for n in rows],
            image_paths=[records[n].image for n in rows],
            splits=[records[n].split for n in rows],
            extras=[records[n].extra for n in rows],
            skipped=skipped,
            tokens=None if grids is None else np.array([grids[n] for n in rows]).reshape(len(rows), *token_shape),
        )

    if text_only:
        for shard in pending:
            _embed_texts(encoder, records, shard, shard_items[shard], bad, cfg.batch_size, write, bar)
    else:
        _embed_images(
            encoder,
            records,
            pending,
            shard_items,
            bad,
            cfg.batch_size,
            cfg.workers,
            write,
            bar,
            cfg.token_grid,
            cfg.tokens,
        )
    bar.close()
    return pending


def _token_shape(encoder: ImageEncoder, grid: int | None) -> tuple[int, int]:
    """(T, D) of the tokens `encoder` gives per image with the patch grid pooled to `grid`: one probe forward pass."""
    size = encoder.processor.crop_size if getattr(encoder.processor, "do_center_crop", False) else None
    size = size or encoder.processor.size
    height = size.get("height") or size.get("shortest_edge")
    width = size.get("width") or size.get("shortest_edge")
    probe = torch.zeros(1, 3, height, width)
    return tuple(encoder.encode_pixels_and_tokens(probe, grid)[1].shape[1:])


def _embed_images(
    encoder, records, pending, shard_items, bad, batch_size, workers, write, bar, grid=None, tokens=False
) -> None:
    """Decode in DataLoader workers, encode batch by batch, write each shard as soon as its last batch is in.
    Batches never cross a shard boundary, so a redone shard sees exactly the batches it saw the first time.
    With `tokens`, the vision tower's last hidden states (patch grid pooled to `grid`) go with each vector."""
    batches, owners = [], []
    for shard in pending:
        good = [n for n in shard_items[shard] if n not in bad]
        for i in range(0, len(good), batch_size):
            batches.append(good[i : i + batch_size])
            owners.append(shard)
    remaining = {s: owners.count(s) for s in pending}
    state = {s: ({}, {}, {} if tokens else None) for s in pending}
    for shard in pending:
        if remaining[shard] == 0:  # nothing loadable in this shard: write its skip list now
            write(shard, *state.pop(shard))
    if not batches:
        return
    loader = image_loader(records, encoder.processor, batches, workers, pin_memory=encoder.device.type == "cuda")
    for shard, (indices, pixels, failed) in zip(owners, loader, strict=True):
        vectors, reasons, grids = state[shard]
        if pixels is not None and tokens:
            pooled, hidden = encoder.encode_pixels_and_tokens(pixels, grid)
            for n, vec, tok in zip(indices, pooled.cpu().numpy(), hidden.cpu().numpy(), strict=True):
                vectors[n], grids[n] = vec, tok
        elif pixels is not None:
            for n, vec in zip(indices, encoder.encode_pixels(pixels).cpu().numpy(), strict=True):
                vectors[n] = vec
        reasons.update(failed)
        bar.update(len(indices) + len(failed))
        remaining[shard] -= 1
        if remaining[shard] == 0:
            write(shard, *state.pop(shard))


def _embed_texts(encoder, records, shard, items, bad, batch_size, write, bar) -> None:
    """CLIP text features of every caption in one shard, in batches of `batch_size` captions."""
    flat = [(n, c) for n in items if n not in bad for c in records[n].captions]
    features = []
    for i in range(0, len(flat), batch_size):
        chunk = [c for _, c in flat[i : i + batch_size]]
        features.append(encoder.encode_text(chunk, batch_size=batch_size).cpu().numpy())
        bar.update(len(chunk))
    features = np.concatenate(features) if features else np.zeros((0, encoder.dim), np.float32)
    vectors: dict[int, list[np.ndarray]] = {}
    for (n, _), vec in zip(flat, features, strict=True):
        vectors.setdefault(n, []).append(vec)
    write(shard, vectors, {})
