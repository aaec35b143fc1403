"""Predictions and reference captions to score, read from files, and matched to each other.

Predictions: the COCO results format `[{"image_id", "caption"}]`, `clipcap caption` JSONL (`{"image", "caption"}` per
line) or `{id: caption}`. References: `{id: [captions]}` JSON, or any dataset source `read_source` reads (COCO and
nocaps annotation files, Karpathy splits, JSONL, CSV, ...), as `Record`s.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ClipCapError
from .sources import Record, as_key, is_text, load_json, read_source, read_text


def _read_json_or_jsonl(path: Path):
    if not path.is_file():
        raise ClipCapError(f"file not found: {path}")
    if path.suffix.lower() != ".jsonl":
        return load_json(path)
    rows = []
    for n, line in enumerate(read_text(path).splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except (json.JSONDecodeError, RecursionError) as e:
                raise ClipCapError(f"{path}:{n} is not valid JSON ({getattr(e, 'msg', e)})") from None
    return rows


def load_predictions(path: str | Path) -> tuple[dict[str, str], dict[str, str]]:
    """Predictions as (id -> caption, id -> image path where the file names one)."""
    path = Path(path)
    data = _read_json_or_jsonl(path)
    shape = (
        f"{path}: predictions must be a COCO results list [{{'image_id', 'caption'}}], JSONL rows "
        "{'image', 'caption'} or a JSON object {id: caption}"
    )
    if isinstance(data, dict):
        if not data or not all(is_text(v) for v in data.values()) or not all(is_text(k) for k in data):
            raise ClipCapError(shape)
        return dict(data), {}
    if not isinstance(data, list) or not data or not all(isinstance(row, dict) for row in data):
        raise ClipCapError(shape)
    captions: dict[str, str] = {}
    images: dict[str, str] = {}
    for n, row in enumerate(data, 1):
        key = next((as_key(row[k]) for k in ("image_id", "key", "image") if row.get(k) is not None), None)
        caption = row.get("caption", row.get("captions"))
        if isinstance(caption, list) and len(caption) == 1:
            caption = caption[0]
        if key is None:
            raise ClipCapError(f"{path}: entry {n} needs an image id ('image_id' or 'image': text or a number)")
        if not is_text(caption):
            raise ClipCapError(f"{path}: entry {n} needs one caption string (valid Unicode text)")
        if key in captions:
            raise ClipCapError(f"{path}: image {key} has more than one prediction (entry {n})")
        captions[key] = caption
        if is_text(row.get("image")):
            images[key] = row["image"]
    return captions, images


def _is_id_to_captions(data) -> bool:
    """{id: [captions]}, and not a COCO-style file (whose `images` / `annotations` values are lists too)."""
    return (
        isinstance(data, dict)
        and bool(data)
        and not isinstance(data.get("images"), list)
        and all(isinstance(v, list) and all(isinstance(c, str) for c in v) for v in data.values())
    )


def load_references(
    path: str | Path, format: str = "auto", images: str | Path | None = None, split: str | None = None
) -> list[Record]:
    """Reference captions per image, as Records (those with `problem` set are the caller's to skip and report)."""
    path = Path(path)
    if path.suffix.lower() == ".json" and format == "auto" and path.is_file():
        data = load_json(path)
        if _is_id_to_captions(data):
            records = []
            for k, captions in data.items():
                problem = None
                if not k.strip():
                    problem = "empty image id"
                elif not (is_text(k) and all(is_text(c) for c in captions)):
                    problem = "reference is not valid Unicode (lone surrogate)"
                records.append(Record(k if is_text(k) else ascii(k), None, list(captions), problem=problem))
            return records
    return list(read_source(path, format=format, images=images, split=split))


def _aliases(record: Record) -> set[str]:
    names = {record.key}
    if record.image:
        names |= {record.image, Path(record.image).name, Path(record.image).stem}
    return names


def match_predictions(
    predictions: dict[str, str], pred_images: dict[str, str], references: list[Record]
) -> dict[str, Record]:
    """Prediction id -> reference record: by id, else by image path, file name or stem (unambiguous ones only)."""
    by_name: dict[str, Record | None] = {}
    for record in references:
        for name in _aliases(record):
            by_name[name] = record if by_name.get(name, record) is record else None
    matched: dict[str, Record] = {}
    claimed: dict[str, str] = {}
    unmatched = []
    for key in predictions:
        image = pred_images.get(key, key)
        candidates = (key, image, Path(image).name, Path(image).stem)
        record = next((by_name[c] for c in candidates if by_name.get(c) is not None), None)
        if record is None:
            unmatched.append(key)
        elif record.key in claimed:
            raise ClipCapError(f"predictions {claimed[record.key]!r} and {key!r} are for the same image {record.key!r}")
        else:
            matched[key] = record
            claimed[record.key] = key
    if unmatched:
        raise ClipCapError(
            f"{len(unmatched)} of {len(predictions)} predictions match no reference image, e.g. {unmatched[:3]} "
            "(ids are matched by image id, then by image path, file name or file stem)"
        )
    return matched
