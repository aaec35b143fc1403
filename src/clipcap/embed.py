"""`clipcap embed`: a captioning source -> an embedding store (data/store.py), batched, resumable, multi-process.

The record list is cut into fixed shards of `shard_size` records; shard i always holds the same records and is
encoded in the same batches, so it is a deterministic unit of work. A shard is complete once its embedding file
exists (written last, atomically): rerunning the same command after a kill skips complete shards and redoes the rest,
giving the same store as an uninterrupted run. Under `torchrun` (RANK / WORLD_SIZE in the environment) rank r takes
shards r, r + world, ...; whichever rank finds every shard complete writes info.json and skipped.jsonl.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch

from .data.sources import Record, detect_format, open_record_image, read_source
from .data.store import INFO, JOB, StoreWriter, write_json
from .encoder import ImageEncoder, ImageLoadError
from .errors import ClipCapError


class _ImageDataset(torch.utils.data.Dataset):
    """Decodes and preprocesses one record's image in a DataLoader worker; a bad image becomes a reason string."""

    def __init__(self, records: list[Record], processor):
        self.records = records
        self.processor = processor

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        try:
            image = open_record_image(self.records[i])
            return i, self.processor(images=[image], return_tensors="pt")["pixel_values"][0], None
        except ImageLoadError as e:
            return i, None, e.reason
        except Exception as e:  # a bad item must never end the job; its reason is reported instead
            return i, None, f"preprocessing failed ({type(e).__name__}: {e})"


def _collate(items):
    good = [(i, pixels) for i, pixels, _ in items if pixels is not None]
    bad = [(i, reason) for i, _, reason in items if reason is not None]
    pixels = torch.stack([p for _, p in good]) if good else None
    return [i for i, _ in good], pixels, bad


def _worker_init(_):
    torch.set_num_threads(1)  # decoding workers share the cores with the encoder's forward pass


def _clean(records: list[Record]) -> tuple[list[Record], dict[int, str], dict[int, list[dict]]]:
    """Strip captions; mark records that cannot become training rows (duplicate key, no usable caption) and note
    captions dropped from otherwise good records. Returns (records, bad reason by index, notes by index)."""
    seen: set[str] = set()
    bad: dict[int, str] = {}
    notes: dict[int, list[dict]] = {}
    for n, rec in enumerate(records):
        captions = [c.strip() for c in rec.captions if isinstance(c, str)]
        kept = [c for c in captions if c]
        if rec.key in seen:
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


def _check_job(out: Path, job: dict, world: int) -> None:
    """Refuse to resume into a store started by a different command; start a fresh one otherwise."""
    job_file = out / JOB
    if job_file.is_file():
        previous = json.loads(job_file.read_text())
        differs = sorted(k for k in set(job) | set(previous) if job.get(k) != previous.get(k))
        if differs:
            raise ClipCapError(
                f"{out} holds a store from a different `clipcap embed` command (differs in: {', '.join(differs)}); "
                "pass another --out, or delete it to start over"
            )
        if world == 1:  # temporaries left by a killed run; with several ranks another rank may be writing one
            for tmp in out.rglob(".*.tmp*"):
                tmp.unlink(missing_ok=True)
        return
    if out.exists() and any(out.iterdir()):
        raise ClipCapError(f"{out} exists and is not a store started by `clipcap embed`: pass an empty or new --out")
    out.mkdir(parents=True, exist_ok=True)
    write_json(job_file, job)


def _rank() -> tuple[int, int]:
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= rank < world:
        raise ClipCapError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return rank, world


def _device(device: str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def embed(
    source: str | Path,
    out: str | Path,
    clip_model: str | Path,
    format: str = "auto",
    images: str | Path | None = None,
    split: str | None = None,
    batch_size: int = 64,
    workers: int = 2,
    text_only: bool = False,
    normalize: bool = False,
    shard_size: int = 10_000,
    device: str | None = None,
    image_column: str | None = None,
    caption_column: str | None = None,
    progress: bool = True,
    tokens: bool = False,
    token_grid: int | None = None,
) -> Path:
    """Encode `source` into the store `out` and return its path.

    Image mode: one row per image with all its captions (training visits each (image, caption) pair). `text_only`:
    one row per caption holding the CLIP *text* embedding of that caption ("modality": "text"), for text-only
    (CapDec-style) training. `normalize` L2-normalises the vectors (what clip-retrieval stores hold); the default
    keeps the raw features the paper trained on. `tokens` also stores the vision tower's last hidden states per
    image (every token, or the patch grid average-pooled to `token_grid` x `token_grid`), for a mapper that reads
    them. Rerunning after an interruption resumes.
    """
    from tqdm.auto import tqdm

    if batch_size < 1 or shard_size < 1 or workers < 0:
        raise ClipCapError("--batch-size and --shard-size must be >= 1 and --workers >= 0")
    if tokens and text_only:
        raise ClipCapError("image tokens come from images: they cannot be stored with text-only embeddings")
    if token_grid is not None and not tokens:
        raise ClipCapError("a token grid pools image tokens: it needs tokens stored")
    if token_grid is not None and (not isinstance(token_grid, int) or isinstance(token_grid, bool) or token_grid < 1):
        raise ClipCapError(f"the token grid must be a positive integer, got {token_grid!r}")
    out = Path(out)
    fmt = detect_format(source, images) if format == "auto" else format
    records = list(
        read_source(source, fmt, images=images, split=split, image_column=image_column, caption_column=caption_column)
    )
    records, bad, notes = _clean(records)
    rank, world = _rank()
    job = {
        "source": str(Path(source).resolve()) if Path(source).exists() else str(source),
        "format": fmt,
        "images": str(Path(images).resolve()) if images is not None else None,
        "split": split,
        "clip_model": str(clip_model),
        "text_only": text_only,
        "normalize": normalize,
        "shard_size": shard_size,
        "num_records": len(records),
        "image_column": image_column,
        "caption_column": caption_column,
        "tokens": tokens,
        "token_grid": token_grid,
    }
    _check_job(out, job, world)
    num_shards = max(1, math.ceil(len(records) / shard_size))
    encoder = ImageEncoder.from_pretrained(clip_model, normalize=normalize, device=_device(device))
    token_shape = _token_shape(encoder, token_grid) if tokens else None
    writer = StoreWriter(
        out,
        clip_model=str(clip_model),
        clip_dim=encoder.dim,
        normalized=normalize,
        modality="text" if text_only else "image",
        shard_size=shard_size,
        extra_info={"source": job["source"], "format": fmt, "split": split},
        token_shape=token_shape,
        token_grid=token_grid,
    )
    pending = [s for s in range(rank, num_shards, world) if not writer.shard_done(s)]
    shard_items = {s: range(s * shard_size, min((s + 1) * shard_size, len(records))) for s in pending}
    todo = sum(len(records[n].captions) if text_only else 1 for s in pending for n in shard_items[s] if n not in bad)
    unit = "caption" if text_only else "img"
    desc = "embed" + (f" [rank {rank}/{world}]" if world > 1 else "")
    bar = tqdm(total=todo, unit=unit, desc=desc, disable=not progress, file=sys.stderr, dynamic_ncols=True)

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
            _embed_texts(encoder, records, shard, shard_items[shard], bad, batch_size, write, bar)
    else:
        _embed_images(encoder, records, pending, shard_items, bad, batch_size, workers, write, bar, token_grid, tokens)
    bar.close()

    if not all(writer.shard_done(s) for s in range(num_shards)):
        if progress:
            print(f"clipcap embed: rank {rank} done; the last rank to finish writes {out / INFO}", file=sys.stderr)
        return out
    info = writer.finalize(num_shards)
    if progress:
        reasons = ", ".join(f"{k} {v}" for k, v in info["skipped_by_reason"].items())
        print(
            f"clipcap embed: {info['num_images']} {'captions' if text_only else 'images'} "
            f"({info['num_captions']} captions) in {num_shards} shards -> {out}; skipped {info['skipped']}"
            + (f" ({reasons}), listed in {out / 'skipped.jsonl'}" if info["skipped"] else ""),
            file=sys.stderr,
        )
    return out


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
    loader = torch.utils.data.DataLoader(
        _ImageDataset(records, encoder.processor),
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=_collate,
        worker_init_fn=_worker_init if workers else None,
        pin_memory=encoder.device.type == "cuda",
    )
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
