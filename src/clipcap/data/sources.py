"""Dataset readers: every captioning source becomes the same stream of `Record`s.

Formats: karpathy (COCO / Flickr8k / Flickr30k `dataset_*.json`), coco (`captions_*.json`), nocaps, cc (Conceptual
Captions TSV + images downloaded by img2dataset), csv, jsonl, parquet, folder (images with sidecar `.txt` captions,
e.g. img2dataset's `files` output), webdataset (`.tar` shards: KEY.jpg + KEY.txt [+ KEY.json]); and plain image
files, directories and globs without captions (`read_images`), the images `clipcap caption` takes.

Readers only parse: images are opened later (`open_record_image`), so a bad image is a per-item error for the caller.
A malformed entry (a field missing or of the wrong type, text that is not valid Unicode, an unreadable line, a damaged
shard tail) becomes a Record with `problem` set, which callers skip and report; only an unusable whole input (missing,
not decodable, not the format) raises ClipCapError.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ClipCapError
from ..images import IMAGE_EXTENSIONS, MISSING, TOO_LARGE, ImageLoadError, is_image_file, open_image

FORMATS = ("karpathy", "coco", "nocaps", "cc", "csv", "jsonl", "parquet", "folder", "webdataset")
TAR_SEP = "::"
IMAGE_COLUMNS = ("image", "image_path", "filepath", "file_name", "filename", "path", "img")
CAPTION_COLUMNS = ("captions", "caption", "text", "sentence", "sentences")
MAX_MEMBER_BYTES = 256 * 1024 * 1024  # a tar member is read whole into memory: refuse absurd ones


@dataclass
class Record:
    """One image and its captions. `image` is a path, or "SHARD.tar::MEMBER" for a tar member, or None when the
    source names an image that is not on disk (e.g. a Conceptual Captions URL img2dataset failed to download).
    `problem` says why the entry cannot be used (it is then skipped and reported, never guessed at)."""

    key: str
    image: str | None
    captions: list[str]
    split: str | None = None
    extra: dict = field(default_factory=dict)
    problem: str | None = None


def is_text(value) -> bool:
    """A str that can be written as UTF-8 (no lone surrogates from a mis-decoded file name or JSON escape)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _caption_list(value) -> tuple[list[str], str | None]:
    """Captions from a string or a list of strings, or ([], problem)."""
    values = [value] if isinstance(value, str) else value if isinstance(value, (list, tuple)) else None
    if values is None:
        return [], f"captions must be text or a list of text, got {type(value).__name__}"
    if not all(isinstance(v, str) for v in values):
        return [], "captions must be text"
    if not all(is_text(v) for v in values):
        return [], "caption is not valid Unicode (lone surrogate)"
    return list(values), None


def as_key(value) -> str | None:
    """An id as a string key; None for anything that is not a scalar id."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None
    key = str(value)
    return key if key.strip() and is_text(key) else None


def _bad(key, problem: str, image: str | None = None) -> Record:
    return Record(key=str(key), image=image, captions=[], problem=problem)


def printable(text: str) -> str:
    """`text` as valid Unicode for output: bytes of a file name that were not UTF-8 (which Python keeps as lone
    surrogates) become U+FFFD."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # a lone surrogate from a JSON escape rather than from a file name
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def path_key(path: str | Path) -> str:
    """A file path as valid Unicode text, distinct for distinct paths: on POSIX, bytes of the name that are not
    UTF-8 become `\\xNN` and a backslash becomes two, so the key reads back to the exact bytes; a UTF-8 name
    without a backslash is its own key. (Windows names are Unicode already.)"""
    if os.name != "posix":
        return printable(str(path))
    try:
        raw = os.fsencode(path)
    except UnicodeEncodeError:  # a lone surrogate from a JSON escape, not from a file name
        return printable(str(path))
    return raw.replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")


def walk_files(root: Path) -> list[Path]:
    """Every entry under the directory `root` that is not a directory, sorted, following symlinked directories; a
    directory reached a second time (a symlink cycle, or two links to one folder) is listed once, where it is first
    met. Entries that are not regular files (a broken link, a FIFO) are listed too, for the reader to report."""
    seen: set[tuple[int, int]] = set()
    found = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs.sort()
        found.extend(Path(folder, f) for f in files)
    return sorted(found)


# -- plain images ------------------------------------------------------------------------------------------------
def find_images(inputs: Iterable[str | Path]) -> list[Path]:
    """Expand image files, directories (recursively) and glob patterns, in the order given, without duplicates.

    Directories and globs contribute the files with an image extension (a directory's symlinked folders included,
    each folder once: `walk_files`); a file named explicitly is always kept (even a missing one, so that it is
    reported). Raises ClipCapError when nothing at all is found."""
    inputs = [str(item) for item in inputs]
    found: dict[Path, None] = {}
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            matches = [p for p in walk_files(path) if is_image_file(p)]
        elif path.exists() or not any(c in item for c in "*?["):
            matches = [path]
        else:
            hits = (Path(p) for p in glob.glob(str(path), recursive=True))
            matches = sorted(p for p in hits if is_image_file(p) and p.is_file())
        found.update(dict.fromkeys(matches))
    if not found:
        raise ClipCapError(f"no images found in {', '.join(inputs)}")
    return list(found)


def read_images(inputs: Iterable[str | Path]) -> Iterator[Record]:
    """Image files, directories and globs (`find_images`) as records without captions, keyed by their path
    (`path_key`: distinct for any file name)."""
    for path in find_images(inputs):
        yield Record(key=path_key(path), image=str(path), captions=[])


# -- format detection --------------------------------------------------------------------------------------------
def _tar_paths(source: str) -> list[Path]:
    """Shards named by a directory, one .tar, a glob, or a webdataset brace pattern (shard-{000..009}.tar)."""
    brace = re.search(r"\{(\d+)\.\.(\d+)\}", source)
    if brace:
        lo, hi = brace.groups()
        if int(hi) - int(lo) > 10_000_000:
            raise ClipCapError(f"{source}: the brace range names more than 10 million shards")
        head, tail = source[: brace.start()], source[brace.end() :]
        return [Path(f"{head}{n:0{len(lo)}d}{tail}") for n in range(int(lo), int(hi) + 1)]
    if any(c in source for c in "*?["):
        return sorted(Path(p) for p in glob.glob(source))
    path = Path(source)
    return sorted(path.rglob("*.tar")) if path.is_dir() else [path]


def is_shard_pattern(source: str) -> bool:
    """Whether `source` names webdataset shards by itself: a .tar file or a brace range (shard-{000..009}.tar)."""
    return source.endswith(".tar") or bool(re.search(r"\{\d+\.\.\d+\}", source))


def json_kind(obj) -> str:
    """ "karpathy", "coco" or "nocaps" for a parsed JSON dataset file; ClipCapError for anything else."""
    if isinstance(obj, dict) and isinstance(obj.get("images"), list):
        first = next((im for im in obj["images"] if isinstance(im, dict)), {})
        if "sentences" in first:
            return "karpathy"
        info = obj.get("info")
        if "domain" in first or (isinstance(info, (dict, str)) and "nocaps" in json.dumps(info).lower()):
            return "nocaps"
        return "coco"
    raise ClipCapError(
        "unrecognised JSON: expected a Karpathy dataset_*.json or a COCO/nocaps captions file "
        "(an object with an `images` list)"
    )


def read_text(path: Path) -> str:
    """A whole text file as UTF-8 (a BOM is dropped), or one ClipCapError saying why it cannot be read."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ClipCapError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    except IsADirectoryError:
        raise ClipCapError(f"{path} is a directory, not a file") from None
    except OSError as e:
        raise ClipCapError(f"cannot read {path}: {e.strerror or e}") from None


def load_json(path: Path):
    """A JSON file, or one ClipCapError naming the line and column of the first problem."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ClipCapError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except RecursionError:
        raise ClipCapError(f"{path} is nested too deeply to be a dataset file") from None


def _detect(source: str) -> tuple[str, object]:
    if is_shard_pattern(source):
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
        obj = load_json(path)
        return json_kind(obj), obj
    kinds = {".tsv": "cc", ".csv": "csv", ".jsonl": "jsonl", ".parquet": "parquet"}
    if suffix in kinds:
        return kinds[suffix], None
    raise ClipCapError(f"cannot tell the format of {source}: name it (one of {', '.join(FORMATS)})")


def detect_format(source: str | Path) -> str:
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


def _images_list(obj, source: Path, kind: str) -> list:
    if not isinstance(obj, dict) or not isinstance(obj.get("images"), list):
        raise ClipCapError(f"{source} is not a {kind} file: it has no `images` list")
    return obj["images"]


def read_karpathy(source: Path, images=None, obj=None) -> Iterator[Record]:
    """Karpathy's dataset_{coco,flickr8k,flickr30k}.json: splits kept as given, except restval -> train."""
    entries = _images_list(obj if obj is not None else load_json(source), source, "Karpathy")
    root = _root(source, images)
    for n, im in enumerate(entries):
        if not isinstance(im, dict):
            yield _bad(f"images[{n}]", f"entry is {type(im).__name__}, not an object")
            continue
        filename, filepath = im.get("filename"), im.get("filepath", "")
        key = as_key(im["cocoid"]) if "cocoid" in im else as_key(Path(filename).stem) if is_text(filename) else None
        if key is None:
            yield _bad(f"images[{n}]", "no usable `filename` / `cocoid`")
            continue
        if not is_text(filename) or not filename or not is_text(filepath):
            yield _bad(key, "`filename` / `filepath` must be non-empty text")
            continue
        sentences = im.get("sentences", [])
        if not isinstance(sentences, list) or not all(isinstance(s, dict) for s in sentences):
            yield _bad(key, "`sentences` must be a list of objects")
            continue
        raw = [s["raw"] if "raw" in s else " ".join(map(str, s.get("tokens", []))) for s in sentences]
        captions, problem = _caption_list(raw)
        split = im.get("split")
        yield Record(
            key=key,
            image=str(root / filepath / filename),
            captions=captions,
            split="train" if split == "restval" else split if is_text(split) else None,
            extra={k: im[k] for k in ("cocoid", "imgid") if k in im and as_key(im[k]) is not None},
            problem=problem,
        )


def read_coco(source: Path, images=None, obj=None) -> Iterator[Record]:
    """COCO captions_*.json and nocaps_*.json (images + annotations). nocaps keeps `domain` in `extra`. Image entries
    without `file_name` (as LAVIS/BLIP publish Karpathy test references) give records without an image path."""
    obj = obj if obj is not None else load_json(source)
    entries = _images_list(obj, source, "COCO")
    annotations = obj.get("annotations", [])
    if not isinstance(annotations, list):
        raise ClipCapError(f"{source}: `annotations` must be a list")
    root = _root(source, images)
    captions: dict[str, list[str]] = {}
    for ann in annotations:
        if isinstance(ann, dict) and as_key(ann.get("image_id")) is not None and is_text(ann.get("caption")):
            captions.setdefault(as_key(ann["image_id"]), []).append(ann["caption"])
    split = _split_from_name(source.name)
    for n, im in enumerate(entries):
        key = as_key(im.get("id")) if isinstance(im, dict) else None
        if key is None:
            yield _bad(f"images[{n}]", "entry has no usable `id`")
            continue
        file_name = im.get("file_name")
        if file_name is not None and not (is_text(file_name) and file_name):
            yield _bad(key, "`file_name` must be non-empty text")
            continue
        extra = {"image_id": im["id"]}
        extra.update({k: im[k] for k in ("domain", "open_images_id", "coco_url") if is_text(im.get(k))})
        yield Record(
            key=key,
            image=str(root / file_name) if file_name else None,
            captions=captions.get(key, []),
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
    elif is_shard_pattern(str(root)):
        records.extend(read_webdataset(str(root)))
    return {
        r.extra["url"]: (str(r.extra.get("key", r.key)), r.image)
        for r in records
        if r.problem is None and is_text(r.extra.get("url")) and r.image
    }


def _lines(path: Path) -> Iterator[tuple[int, str | None]]:
    """(line number, text with its line ending) of a text file read as UTF-8 line by line; text is None for a line
    that is not UTF-8. A BOM on the first line is dropped."""
    try:
        f = open(path, "rb")  # noqa: SIM115 (closed below; a generator cannot use `with` across yields cleanly)
    except OSError as e:
        raise ClipCapError(f"cannot read {path}: {e.strerror or e}") from None
    with f:
        for n, raw in enumerate(f, 1):
            if n == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            try:
                yield n, raw.decode("utf-8")
            except UnicodeDecodeError:
                yield n, None


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
    for n, line in _lines(source):
        row = n - 1
        if line is None:
            yield _bad(f"row{row}", f"line {n} is not UTF-8 text")
            continue
        if not line.strip():
            continue
        caption, _, url = line.rstrip("\r\n").partition("\t")
        url = url.split("\t", 1)[0]
        if "\x00" in line:
            yield _bad(f"row{row}", f"line {n} holds a NUL byte")
            continue
        key, image = (index or {}).get(url, (f"row{row}", None))
        yield Record(key=key, image=image, captions=[caption], split=split, extra={"url": url, "row": row})


def _pick(columns, wanted: str | None, candidates, what: str, source) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise ClipCapError(f"{source} has no {what} column {wanted!r} (columns: {', '.join(map(str, columns))})")
        return wanted
    for c in candidates:
        if c in columns:
            return c
    option = "image_column" if what == "image" else "caption_column"
    raise ClipCapError(
        f"{source}: no {what} column among {', '.join(map(str, columns)) or 'none'}; name it with `{option}`"
    )


def _jsonable(value) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError, UnicodeEncodeError, RecursionError):
        return False
    return True


def _table_records(
    rows, columns, source: Path, images, image_column, caption_column, require_captions: bool = True
) -> Iterator[Record]:
    """Rows (dicts, or Records already marked bad) of a CSV/JSONL/parquet table -> one Record per image (rows sharing
    an image merge their captions). Without `require_captions`, a table with no caption column gives records
    without captions (images to be captioned)."""
    image_col = _pick(columns, image_column, IMAGE_COLUMNS, "image", source)
    if caption_column is None and not require_captions and not any(c in columns for c in CAPTION_COLUMNS):
        caption_col = None
    else:
        caption_col = _pick(columns, caption_column, CAPTION_COLUMNS, "caption", source)
    key_col = next((c for c in ("key", "id", "image_id") if c in columns and c != image_col), None)
    root = _root(source, images)
    out: list[Record] = []  # in source order; rows sharing a key merge into the first one's record
    by_key: dict[str, Record] = {}
    for n, row in enumerate(rows, 1):
        if isinstance(row, Record):
            out.append(row)
            continue
        image = row.get(image_col)
        if image is not None and not (is_text(image) and image.strip()):
            out.append(_bad(f"row{n}", f"`{image_col}` must be non-empty text"))
            continue
        key = as_key(row[key_col]) if key_col and row.get(key_col) is not None else image
        if key is None:
            out.append(_bad(f"row{n}", f"no usable key (`{key_col or image_col}`)"))
            continue
        value = row.get(caption_col) if caption_col is not None else None
        caps, problem = ([], None) if value is None else _caption_list(value)
        if problem is not None:
            out.append(_bad(key, problem, str(root / image) if image else None))
            continue
        if key in by_key:
            by_key[key].captions.extend(caps)
            continue
        extra = {
            k: v
            for k, v in row.items()
            if k not in (image_col, caption_col, key_col, "split") and v is not None and is_text(k) and _jsonable(v)
        }
        split = row.get("split")
        by_key[key] = Record(
            key=key,
            image=str(root / image) if image else None,
            captions=caps,
            split=split if is_text(split) else None,
            extra=extra,
        )
        out.append(by_key[key])
    yield from out


def read_csv(
    source: Path, images=None, image_column=None, caption_column=None, require_captions: bool = True
) -> Iterator[Record]:
    """A CSV file with a header row; a row that is not UTF-8 or holds a NUL byte is a bad item."""
    lines = _lines(source)
    first = next(lines, (1, ""))
    if first[1] is None:
        raise ClipCapError(f"{source}: the header line is not UTF-8 text")
    if "\x00" in first[1]:
        raise ClipCapError(f"{source}: the header line holds a NUL byte (not a CSV text file?)")
    try:
        columns = next(csv.reader([first[1]]), [])
    except csv.Error as e:
        raise ClipCapError(f"{source}: unreadable CSV header ({e})") from None
    if not columns:
        raise ClipCapError(f"{source} is empty (no header row)")

    def rows():
        # Records span lines (quoted newlines), so parse the remaining text with one reader.
        good = []
        for n, line in lines:
            if line is None:
                yield _bad(f"line{n}", f"line {n} is not UTF-8 text")
            elif "\x00" in line:
                yield _bad(f"line{n}", f"line {n} holds a NUL byte")
            else:
                good.append(line)
        reader = csv.reader(good, strict=True)
        while True:
            try:
                values = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                yield _bad(f"line{reader.line_num + 1}", f"unreadable CSV row ({e})")
                continue
            if values:
                yield dict(zip(columns, values, strict=False))

    yield from _table_records(rows(), columns, source, images, image_column, caption_column, require_captions)


def read_jsonl(
    source: Path, images=None, image_column=None, caption_column=None, require_captions: bool = True
) -> Iterator[Record]:
    """JSON lines, one object per line; a line that is not a JSON object is a bad item."""
    rows: list = []
    for n, line in _lines(source):
        if line is None:
            rows.append(_bad(f"line{n}", f"line {n} is not UTF-8 text"))
        elif line.strip():
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as e:
                rows.append(_bad(f"line{n}", f"line {n} is not valid JSON ({getattr(e, 'msg', e)})"))
                continue
            rows.append(row if isinstance(row, dict) else _bad(f"line{n}", f"line {n} is not a JSON object"))
    columns = list(dict.fromkeys(k for r in rows if isinstance(r, dict) for k in r))
    yield from _table_records(rows, columns, source, images, image_column, caption_column, require_captions)


def read_parquet(
    source: Path, images=None, image_column=None, caption_column=None, require_captions: bool = True
) -> Iterator[Record]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ClipCapError("reading parquet needs pyarrow: pip install 'clipcap-hf[train]'") from None
    try:
        table = pq.read_table(source)
    except (pa.ArrowException, OSError) as e:
        raise ClipCapError(f"{source} is not a readable parquet file ({str(e).splitlines()[0]})") from None
    yield from _table_records(
        table.to_pylist(), table.column_names, source, images, image_column, caption_column, require_captions
    )


def _caption_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def _sidecar_text(data: bytes) -> tuple[list[str], str | None]:
    try:
        return _caption_lines(data.decode("utf-8-sig")), None
    except UnicodeDecodeError:
        return [], "caption file is not UTF-8 text"


def _sidecar_json(data: bytes) -> dict:
    try:
        obj = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return {}
    return obj if isinstance(obj, dict) and _jsonable(obj) else {}


def read_folder(source: Path) -> Iterator[Record]:
    """Images under `source` (recursively, symlinked folders included: `walk_files`) with a sidecar STEM.txt (one
    caption per line) and optional STEM.json."""
    for path in (p for p in walk_files(source) if p.suffix.lower() in IMAGE_EXTENSIONS):
        key = path.relative_to(source).with_suffix("").as_posix()
        if not is_text(key):
            yield _bad(key.encode("utf-8", "replace").decode("utf-8"), "file name is not valid Unicode")
            continue
        txt, meta = path.with_suffix(".txt"), path.with_suffix(".json")
        captions, problem = _sidecar_text(txt.read_bytes()) if txt.is_file() else ([], None)
        extra = _sidecar_json(meta.read_bytes()) if meta.is_file() else {}
        yield Record(key=key, image=str(path), captions=captions, extra=extra, problem=problem)


def read_webdataset(source: str) -> Iterator[Record]:
    """webdataset / img2dataset .tar shards. Members are grouped by key (the name up to its first dot); the image is
    any image extension, captions come from KEY.txt (one per line), `extra` from KEY.json. A damaged shard keeps the
    records read before the damage and reports the rest as one bad item."""
    shards = _tar_paths(source)
    if not shards:
        raise ClipCapError(f"no .tar shards in {source}")
    for shard in shards:
        if not shard.is_file():
            raise ClipCapError(f"shard not found: {shard}")
        groups: dict[str, dict] = {}
        damage = None
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
                    elif ext in (".txt", ".json") and member.size <= MAX_MEMBER_BYTES:
                        group[ext] = tar.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError) as e:
            if not groups:
                raise ClipCapError(f"cannot read shard {shard}: {e}") from None
            damage = f"shard damaged after {len(groups)} records ({e})"
        for key, group in groups.items():
            if not is_text(key):
                yield _bad(f"{shard}{TAR_SEP}?", "member name is not valid Unicode")
                continue
            captions, problem = _sidecar_text(group.get(".txt", b""))
            image = f"{shard}{TAR_SEP}{group['image']}" if "image" in group else None
            extra = _sidecar_json(group[".json"]) if ".json" in group else {}
            yield Record(key=key, image=image, captions=captions, extra=extra, problem=problem)
        if damage:
            yield _bad(f"{shard}{TAR_SEP}*", damage)


def read_source(
    source: str | Path,
    format: str = "auto",
    images: str | Path | None = None,
    split: str | None = None,
    image_column: str | None = None,
    caption_column: str | None = None,
    require_captions: bool = True,
) -> Iterator[Record]:
    """Records of `source` in a stable order. `images` is the image root for formats whose files name images by
    relative path (default: the source file's folder); `split` keeps only that split and fails when none match.
    Records with `problem` set are yielded too (whatever their split), for the caller to skip and report. Without
    `require_captions` a table (CSV/JSONL/parquet) may have no caption column (images to be captioned)."""
    source = str(source)
    obj = None
    if format == "auto":
        format, obj = _detect(source)
    elif format not in FORMATS:
        raise ClipCapError(f"unknown format {format!r}: one of auto, {', '.join(FORMATS)}")
    elif format != "webdataset" and not Path(source).exists():
        raise ClipCapError(f"source not found: {source}")
    path = Path(source)
    if format not in ("webdataset", "folder") and path.is_dir():
        raise ClipCapError(f"{source} is a directory, not a {format} file")
    if format == "folder" and not path.is_dir():
        raise ClipCapError(f"{source} is not a directory of images")
    # what only some formats read would otherwise be dropped without a word
    if images is not None and format in ("folder", "webdataset"):
        raise ClipCapError(f"a {format} source holds its images: an image root ({images}) does nothing for it")
    columns = [c for c in (image_column, caption_column) if c is not None]
    if columns and format not in ("csv", "jsonl", "parquet"):
        raise ClipCapError(f"a column name ({columns[0]}) applies to CSV, JSONL and parquet sources, not to {format}")
    readers = {
        "karpathy": lambda: read_karpathy(path, images, obj),
        "coco": lambda: read_coco(path, images, obj),
        "nocaps": lambda: read_coco(path, images, obj),
        "cc": lambda: read_cc(path, images),
        "csv": lambda: read_csv(path, images, image_column, caption_column, require_captions),
        "jsonl": lambda: read_jsonl(path, images, image_column, caption_column, require_captions),
        "parquet": lambda: read_parquet(path, images, image_column, caption_column, require_captions),
        "folder": lambda: read_folder(path),
        "webdataset": lambda: read_webdataset(source),
    }
    seen_splits: set = set()
    matched = 0
    for record in readers[format]():
        if record.problem is None and split is not None and record.split != split:
            seen_splits.add(record.split)
            continue
        matched += record.problem is None
        yield record
    if split is not None and matched == 0:
        present = ", ".join(sorted(str(s) for s in seen_splits)) or "none"
        raise ClipCapError(f"no records in split {split!r} of {source} (splits present: {present})")


# -- opening images ------------------------------------------------------------------------------------------------
_open_tars: dict[tuple[int, str], tuple[tarfile.TarFile, dict[str, tarfile.TarInfo]]] = {}


def _tar_member_bytes(shard: str, member: str) -> bytes:
    # One open TarFile and member index per shard and process (DataLoader workers must not share a file offset with
    # their parent). The index is built by walking the members, keeping those before any damage to the shard.
    handle = (os.getpid(), shard)
    if handle not in _open_tars:
        tar = tarfile.open(shard)  # noqa: SIM115 (kept open: one per shard, reused)
        index: dict[str, tarfile.TarInfo] = {}
        try:
            for info in tar:
                index[info.name] = info
        except (tarfile.TarError, OSError, EOFError):
            pass  # a damaged tail: the members before it stay readable
        _open_tars[handle] = (tar, index)
    tar, index = _open_tars[handle]
    info = index.get(member)
    if info is None:
        raise FileNotFoundError(member)
    if info.size > MAX_MEMBER_BYTES:
        raise ImageLoadError(f"{shard}{TAR_SEP}{member}", f"member of {info.size} bytes is too large", TOO_LARGE)
    data = tar.extractfile(info)
    if data is None:
        raise FileNotFoundError(member)
    return data.read()


def open_record_image(record: Record | str):
    """The record's image (a path or a "SHARD.tar::MEMBER" reference) as an RGB PIL image, or ImageLoadError."""
    image = record.image if isinstance(record, Record) else record
    if image is None:
        url = record.extra.get("url") if isinstance(record, Record) else None
        raise ImageLoadError(url or "<none>", "image not downloaded" if url else "no image", MISSING)
    if TAR_SEP not in image:
        return open_image(image)
    shard, member = image.split(TAR_SEP, 1)
    try:
        data = _tar_member_bytes(shard, member)
    except (FileNotFoundError, tarfile.TarError, OSError):
        raise ImageLoadError(image, "file not found", MISSING) from None
    return open_image(data, name=image)
