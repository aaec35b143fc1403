"""Dataset readers: every captioning source becomes the same stream of `Record`s.

Formats (`--format`): karpathy (COCO / Flickr8k / Flickr30k `dataset_*.json`), coco (`captions_*.json`), nocaps,
cc (Conceptual Captions TSV + images downloaded by img2dataset), csv, jsonl, parquet, folder (images with sidecar
`.txt` captions, e.g. img2dataset's `files` output), webdataset (`.tar` shards: KEY.jpg + KEY.txt [+ KEY.json]).
Readers only parse: images are opened later (`open_record_image`), so a bad image is a per-item error for the caller.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import re
import tarfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..errors import ClipCapError

FORMATS = ("karpathy", "coco", "nocaps", "cc", "csv", "jsonl", "parquet", "folder", "webdataset")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TAR_SEP = "::"
IMAGE_COLUMNS = ("image", "image_path", "filepath", "file_name", "filename", "path", "img")
CAPTION_COLUMNS = ("captions", "caption", "text", "sentence", "sentences")


@dataclass
class Record:
    """One image and its captions. `image` is a path, or "SHARD.tar::MEMBER" for a tar member, or None when the
    source names an image that is not on disk (e.g. a Conceptual Captions URL img2dataset failed to download)."""

    key: str
    image: str | None
    captions: list[str]
    split: str | None = None
    extra: dict = field(default_factory=dict)


# -- format detection --------------------------------------------------------------------------------------------
def _tar_paths(source: str) -> list[Path]:
    """Shards named by a directory, one .tar, a glob, or a webdataset brace pattern (shard-{000..009}.tar)."""
    brace = re.search(r"\{(\d+)\.\.(\d+)\}", source)
    if brace:
        lo, hi = brace.groups()
        head, tail = source[: brace.start()], source[brace.end() :]
        return [Path(f"{head}{n:0{len(lo)}d}{tail}") for n in range(int(lo), int(hi) + 1)]
    if any(c in source for c in "*?["):
        return sorted(Path(p) for p in glob.glob(source))
    path = Path(source)
    return sorted(path.rglob("*.tar")) if path.is_dir() else [path]


def _is_shard_pattern(source: str) -> bool:
    return source.endswith(".tar") or bool(re.search(r"\{\d+\.\.\d+\}", source))


def _json_kind(obj) -> str:
    if isinstance(obj, dict) and isinstance(obj.get("images"), list):
        first = obj["images"][0] if obj["images"] else {}
        if "sentences" in first:
            return "karpathy"
        if "domain" in first or "nocaps" in json.dumps(obj.get("info", "")).lower():
            return "nocaps"
        return "coco"
    raise ClipCapError("unrecognised JSON: expected a Karpathy dataset_*.json or a COCO/nocaps captions file")


def _load_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ClipCapError(f"{path} is not valid JSON ({e})") from None


def _detect(source: str) -> tuple[str, object]:
    if _is_shard_pattern(source):
        return "webdataset", None
    path = Path(source)
    if not path.exists():
        raise ClipCapError(f"source not found: {source}")
    if path.is_dir():
        if next(path.rglob("*.tar"), None) is not None:
            return "webdataset", None
        if any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.rglob("*")):
            return "folder", None
        raise ClipCapError(f"{source} holds neither images nor .tar shards")
    suffix = path.suffix.lower()
    if suffix == ".json":
        obj = _load_json(path)
        return _json_kind(obj), obj
    kinds = {".tsv": "cc", ".csv": "csv", ".jsonl": "jsonl", ".parquet": "parquet"}
    if suffix in kinds:
        return kinds[suffix], None
    raise ClipCapError(f"cannot tell the format of {source}: pass --format ({'|'.join(FORMATS)})")


def detect_format(source: str | Path, images: str | Path | None = None) -> str:
    """The format name of `source` (see FORMATS), from its extension, or its content for JSON files."""
    return _detect(str(source))[0]


# -- readers -----------------------------------------------------------------------------------------------------
def _root(source: Path, images) -> Path:
    return Path(images) if images is not None else source.parent


def _split_from_name(name: str) -> str | None:
    for word, split in (("train", "train"), ("val", "val"), ("test", "test")):
        if word in name.lower():
            return split
    return None


def read_karpathy(source: Path, images=None, obj=None) -> Iterator[Record]:
    """Karpathy's dataset_{coco,flickr8k,flickr30k}.json: splits kept as given, except restval -> train."""
    obj = obj if obj is not None else _load_json(source)
    root = _root(source, images)
    for im in obj["images"]:
        filename = im["filename"]
        rel = Path(im.get("filepath", "")) / filename
        key = str(im["cocoid"]) if "cocoid" in im else Path(filename).stem
        extra = {k: im[k] for k in ("cocoid", "imgid") if k in im}
        split = im.get("split")
        yield Record(
            key=key,
            image=str(root / rel),
            captions=[s.get("raw", " ".join(s.get("tokens", []))) for s in im.get("sentences", [])],
            split="train" if split == "restval" else split,
            extra=extra,
        )


def read_coco(source: Path, images=None, obj=None) -> Iterator[Record]:
    """COCO captions_*.json and nocaps_*.json (images + annotations). nocaps keeps `domain` in `extra`."""
    obj = obj if obj is not None else _load_json(source)
    root = _root(source, images)
    captions: dict[int, list[str]] = {}
    for ann in obj.get("annotations", []):
        captions.setdefault(ann["image_id"], []).append(ann["caption"])
    split = _split_from_name(source.name)
    for im in obj["images"]:
        extra = {"image_id": im["id"]}
        extra.update({k: im[k] for k in ("domain", "open_images_id", "coco_url") if k in im})
        yield Record(
            key=str(im["id"]),
            image=str(root / im["file_name"]),
            captions=captions.get(im["id"], []),
            split=split,
            extra=extra,
        )


def _img2dataset_index(root: Path) -> dict[str, tuple[str, str]]:
    """url -> (img2dataset key, image reference), from the KEY.json sidecars img2dataset writes next to each image
    (in folders or inside .tar shards)."""
    records = []
    if root.is_dir():
        records.extend(read_folder(root))
        if next(root.rglob("*.tar"), None) is not None:
            records.extend(read_webdataset(str(root)))
    elif _is_shard_pattern(str(root)):
        records.extend(read_webdataset(str(root)))
    return {
        r.extra["url"]: (str(r.extra.get("key", r.key)), r.image) for r in records if r.extra.get("url") and r.image
    }


def read_cc(source: Path, images=None) -> Iterator[Record]:
    """Conceptual Captions TSV (caption<TAB>url, no header). Rows are matched to images downloaded by img2dataset
    through the URL recorded in each image's .json sidecar — never by position, which drifts as soon as one download
    fails. With `images=None` (text-only use) no image is looked up."""
    index = None
    if images is not None:
        root = Path(images)
        if not root.exists():
            raise ClipCapError(f"images not found: {images}")
        index = _img2dataset_index(root)
        if not index:
            raise ClipCapError(
                f"no img2dataset .json sidecars (with a url) under {images}: Conceptual Captions rows are matched to "
                "images by URL; download with img2dataset (its default output writes KEY.json next to KEY.jpg)"
            )
    split = _split_from_name(source.name.replace("valid", "val"))
    with open(source, encoding="utf-8", newline="") as f:
        for n, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)):
            if not row:
                continue
            caption, url = row[0], (row[1] if len(row) > 1 else "")
            key, image = (index or {}).get(url, (f"row{n}", None))
            yield Record(key=key, image=image, captions=[caption], split=split, extra={"url": url, "row": n})


def _pick(columns, wanted: str | None, candidates, what: str, source) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise ClipCapError(f"{source} has no {what} column {wanted!r} (columns: {', '.join(columns)})")
        return wanted
    for c in candidates:
        if c in columns:
            return c
    flag = "--image-column" if what == "image" else "--caption-column"
    raise ClipCapError(f"{source}: no {what} column among {', '.join(columns)}; name it with {flag}")


def _table_records(rows, columns, source: Path, images, image_column, caption_column) -> Iterator[Record]:
    """Rows of a CSV/JSONL/parquet table -> one Record per image (rows sharing an image merge their captions)."""
    image_col = _pick(columns, image_column, IMAGE_COLUMNS, "image", source)
    caption_col = _pick(columns, caption_column, CAPTION_COLUMNS, "caption", source)
    key_col = next((c for c in ("key", "id", "image_id") if c in columns and c != image_col), None)
    root = _root(source, images)
    records: dict[str, Record] = {}
    for row in rows:
        image = row.get(image_col)
        value = row.get(caption_col)
        caps = [] if value is None else list(value) if isinstance(value, (list, tuple)) else [str(value)]
        ref = str(root / str(image)) if image not in (None, "") else None
        key = str(row[key_col]) if key_col and row.get(key_col) is not None else str(image)
        if key in records:
            records[key].captions.extend(caps)
            continue
        extra = {k: v for k, v in row.items() if k not in (image_col, caption_col, key_col, "split") and v is not None}
        records[key] = Record(key=key, image=ref, captions=caps, split=row.get("split"), extra=extra)
    yield from records.values()


def read_csv(source: Path, images=None, image_column=None, caption_column=None) -> Iterator[Record]:
    with open(source, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        yield from _table_records(reader, reader.fieldnames or [], source, images, image_column, caption_column)


def read_jsonl(source: Path, images=None, image_column=None, caption_column=None) -> Iterator[Record]:
    rows = []
    with open(source, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ClipCapError(f"{source}:{n} is not valid JSON ({e})") from None
    columns = list(dict.fromkeys(k for r in rows for k in r))
    yield from _table_records(rows, columns, source, images, image_column, caption_column)


def read_parquet(source: Path, images=None, image_column=None, caption_column=None) -> Iterator[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ClipCapError("reading parquet needs pyarrow: pip install 'clipcap[train]'") from None
    table = pq.read_table(source)
    yield from _table_records(table.to_pylist(), table.column_names, source, images, image_column, caption_column)


def _caption_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_folder(source: Path) -> Iterator[Record]:
    """Images under `source` (recursively) with a sidecar STEM.txt (one caption per line) and optional STEM.json."""
    for path in sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()):
        txt, meta = path.with_suffix(".txt"), path.with_suffix(".json")
        captions = _caption_lines(txt.read_text(encoding="utf-8", errors="replace")) if txt.is_file() else []
        extra = {}
        if meta.is_file():
            try:
                extra = json.loads(meta.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                extra = {}
        yield Record(
            key=path.relative_to(source).with_suffix("").as_posix(), image=str(path), captions=captions, extra=extra
        )


def read_webdataset(source: str) -> Iterator[Record]:
    """webdataset / img2dataset .tar shards. Members are grouped by key (the name up to its first dot); the image is
    any image extension, captions come from KEY.txt (one per line), `extra` from KEY.json."""
    shards = _tar_paths(source)
    if not shards:
        raise ClipCapError(f"no .tar shards in {source}")
    for shard in shards:
        if not shard.is_file():
            raise ClipCapError(f"shard not found: {shard}")
        groups: dict[str, dict] = {}
        try:
            with tarfile.open(shard) as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    base = member.name.rsplit("/", 1)[-1]
                    prefix = member.name[: len(member.name) - len(base)]
                    key, _, ext = base.partition(".")
                    group = groups.setdefault(prefix + key, {})
                    ext = "." + ext.lower()
                    if ext in IMAGE_EXTENSIONS:
                        group["image"] = member.name
                    elif ext in (".txt", ".json"):
                        group[ext] = tar.extractfile(member).read().decode("utf-8", errors="replace")
        except (tarfile.TarError, OSError) as e:
            raise ClipCapError(f"cannot read shard {shard}: {e}") from None
        for key, group in groups.items():
            extra = {}
            if ".json" in group:
                try:
                    extra = json.loads(group[".json"])
                except json.JSONDecodeError:
                    extra = {}
            image = f"{shard}{TAR_SEP}{group['image']}" if "image" in group else None
            yield Record(key=key, image=image, captions=_caption_lines(group.get(".txt", "")), extra=extra)


def read_source(
    source: str | Path,
    format: str = "auto",
    images: str | Path | None = None,
    split: str | None = None,
    image_column: str | None = None,
    caption_column: str | None = None,
) -> Iterator[Record]:
    """Records of `source` in a stable order. `images` is the image root for formats whose files name images by
    relative path (default: the source file's folder); `split` keeps only that split and fails when none match."""
    source = str(source)
    obj = None
    if format == "auto":
        format, obj = _detect(source)
    elif format not in FORMATS:
        raise ClipCapError(f"unknown format {format!r}: one of auto, {', '.join(FORMATS)}")
    elif format != "webdataset" and not Path(source).exists():
        raise ClipCapError(f"source not found: {source}")
    path = Path(source)
    readers = {
        "karpathy": lambda: read_karpathy(path, images, obj),
        "coco": lambda: read_coco(path, images, obj),
        "nocaps": lambda: read_coco(path, images, obj),
        "cc": lambda: read_cc(path, images),
        "csv": lambda: read_csv(path, images, image_column, caption_column),
        "jsonl": lambda: read_jsonl(path, images, image_column, caption_column),
        "parquet": lambda: read_parquet(path, images, image_column, caption_column),
        "folder": lambda: read_folder(path),
        "webdataset": lambda: read_webdataset(source),
    }
    seen_splits: set = set()
    matched = 0
    for record in readers[format]():
        if split is not None and record.split != split:
            seen_splits.add(record.split)
            continue
        matched += 1
        yield record
    if split is not None and matched == 0:
        present = ", ".join(sorted(str(s) for s in seen_splits)) or "none"
        raise ClipCapError(f"no records in split {split!r} of {source} (splits present: {present})")


# -- opening images ------------------------------------------------------------------------------------------------
_open_tars: dict[tuple[int, str], tarfile.TarFile] = {}


def _tar_member_bytes(shard: str, member: str) -> bytes:
    # One open TarFile per shard and process: DataLoader workers must not share a file offset with their parent.
    handle = (os.getpid(), shard)
    tar = _open_tars.get(handle)
    if tar is None:
        tar = _open_tars[handle] = tarfile.open(shard)  # noqa: SIM115 (kept open: one per shard, reused)
    try:
        data = tar.extractfile(member)
    except KeyError:
        data = None
    if data is None:
        raise FileNotFoundError(member)
    return data.read()


def open_record_image(record: Record | str) -> Image.Image:
    """The record's image as an RGB PIL image (clipcap.encoder.load_image rules), or ImageLoadError with a reason."""
    from ..encoder import ImageLoadError, load_image

    image = record.image if isinstance(record, Record) else record
    if image is None:
        url = record.extra.get("url") if isinstance(record, Record) else None
        raise ImageLoadError(url or "<none>", "image not downloaded" if url else "no image")
    if TAR_SEP not in image:
        return load_image(image)
    shard, member = image.split(TAR_SEP, 1)
    try:
        data = _tar_member_bytes(shard, member)
    except (FileNotFoundError, tarfile.TarError, OSError):
        raise ImageLoadError(image, "file not found") from None
    if not data:
        raise ImageLoadError(image, "empty file (0 bytes)")
    try:  # the same checks load_image makes on a path, for bytes in memory
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise ImageLoadError(image, "too many pixels (decompression bomb)") from None
    except UnidentifiedImageError:
        raise ImageLoadError(image, "not an image (unrecognised format)") from None
    except OSError as e:
        raise ImageLoadError(image, f"unreadable ({e})") from None
    try:
        return load_image(opened)
    except ImageLoadError as e:
        raise ImageLoadError(image, e.reason) from None
