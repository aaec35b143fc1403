"""The embedding store: clip-retrieval's on-disk layout, written shard by shard, read without loading it.

```
STORE/img_emb/img_emb_{i}.npy        float16 [n_i, clip_dim]   (text_emb/text_emb_{i}.npy for text-only stores)
STORE/tok_emb/tok_emb_{i}.npy        float16 [n_i, T * D]      only with image tokens: the vision tower's last hidden
                                                               states (T tokens of width D), row-major per image
STORE/metadata/metadata_{i}.parquet  same row order: key, image_path, split, captions list<string>, caption, extra
STORE/info.json                      clip_model, clip_dim, normalized, modality, counts, skipped,
                                     tokens ({"count": T, "dim": D, "grid": G or null} when stored)
STORE/skipped.jsonl                  one line per bad item: {"key", "image", "reason", "shard"}
STORE/job.json                       the `clipcap embed` parameters, checked when it resumes
```
Rows are read on demand at offsets taken from the .npy headers (numpy's memmap parses them), so memory stays flat
whatever the store size. Every file is written to a temporary name and renamed, so a killed job leaves whole shards
or none; the embedding file is renamed last and marks its shard complete (what `clipcap embed` resumes from).
Token rows are read the same way as embedding rows (one positioned read each), so a token store is as flat in
memory as a pooled one; it is larger on disk by T * D / clip_dim.
Stores made by clip-retrieval (no info.json, a string `caption` column) read the same way.
"""

from __future__ import annotations

import io
import json
import os
import re
from functools import cached_property
from pathlib import Path

import numpy as np

from ..errors import ClipCapError
from ..jobs import JOB
from ..outputs import replace_atomically

INFO = "info.json"
SKIPPED = "skipped.jsonl"
_EMB_DIRS = {"image": "img_emb", "text": "text_emb"}
TOKENS_DIR = "tok_emb"


def arrow(needed_for: str = "the embedding store"):
    """pyarrow, pyarrow.compute and pyarrow.parquet, or one ClipCapError saying how to install them."""
    try:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq
    except ImportError:
        raise ClipCapError(f"{needed_for} needs pyarrow: pip install 'clipcap-hf[train]'") from None
    return pa, pc, pq


def utf8(text: str | None) -> str | None:
    """`text` as a str that can be written as UTF-8: a lone surrogate (from a mis-decoded file name) becomes U+FFFD."""
    if text is None:
        return None
    return str(text).encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def write_json(path: Path, obj) -> None:
    replace_atomically(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def reason_class(reason: str) -> str:
    """'truncated or corrupt image (broken data stream)' -> 'truncated or corrupt image': the countable part."""
    return reason.split(" (", 1)[0].strip()


class StoreWriter:
    """Writes a store. Either stream rows with `add(...)` / `skip(...)` and `close()` (or use it as a context
    manager), or write numbered shards yourself with `write_shard(i, ...)` and `finalize(num_shards)` — the
    resumable path `clipcap embed` takes."""

    def __init__(
        self,
        path: str | Path,
        clip_model: str | None,
        clip_dim: int,
        normalized: bool,
        modality: str = "image",
        shard_size: int = 10_000,
        extra_info: dict | None = None,
        token_shape: tuple[int, int] | None = None,
        token_grid: int | None = None,
    ):
        if modality not in _EMB_DIRS:
            raise ClipCapError(f"modality must be one of {sorted(_EMB_DIRS)}, got {modality!r}")
        if token_shape is not None and modality != "image":
            raise ClipCapError("image tokens go with image embeddings, not text ones")
        self.path = Path(path)
        self.clip_model = clip_model
        self.clip_dim = int(clip_dim)
        self.normalized = bool(normalized)
        self.modality = modality
        self.shard_size = int(shard_size)
        self.extra_info = dict(extra_info or {})
        self.token_shape = tuple(int(v) for v in token_shape) if token_shape is not None else None
        self.token_grid = token_grid
        self.emb_dir = self.path / _EMB_DIRS[modality]
        self.meta_dir = self.path / "metadata"
        self.skip_dir = self.path / "skipped"
        self.tok_dir = self.path / TOKENS_DIR if self.token_shape else None
        for d in (self.emb_dir, self.meta_dir, self.skip_dir, self.tok_dir):
            if d is not None:
                d.mkdir(parents=True, exist_ok=True)
        self._rows: list[tuple] = []
        self._skipped: list[dict] = []
        self._next_shard = 0

    # -- paths -------------------------------------------------------------------------------------------------
    def emb_file(self, i: int) -> Path:
        return self.emb_dir / f"{self.emb_dir.name}_{i}.npy"

    def meta_file(self, i: int) -> Path:
        return self.meta_dir / f"metadata_{i}.parquet"

    def skip_file(self, i: int) -> Path:
        return self.skip_dir / f"skipped_{i}.jsonl"

    def token_file(self, i: int) -> Path:
        return self.tok_dir / f"{TOKENS_DIR}_{i}.npy"

    def shard_done(self, i: int) -> bool:
        return self.emb_file(i).is_file()

    # -- shard-level API ---------------------------------------------------------------------------------------
    def write_shard(
        self,
        i: int,
        embeddings,
        keys: list[str],
        captions: list[list[str]],
        image_paths: list[str | None] | None = None,
        splits: list[str | None] | None = None,
        extras: list[dict] | None = None,
        skipped: list[dict] | None = None,
        tokens=None,
    ) -> None:
        """Write shard `i` atomically: skipped list, metadata, the tokens (a token store: (n, T, D)), then the
        embeddings (whose presence marks it done)."""
        pa, _, pq = arrow()
        emb = np.asarray(embeddings, dtype=np.float32).reshape(-1, self.clip_dim)
        n = len(keys)
        if len(emb) != n or len(captions) != n:
            raise ValueError(f"shard {i}: {len(emb)} embeddings, {n} keys, {len(captions)} caption lists")
        if (tokens is None) != (self.token_shape is None):
            raise ValueError(f"shard {i}: tokens given to a store {'with' if tokens is None else 'without'} tokens")
        if tokens is not None:
            tokens = np.asarray(tokens, dtype=np.float32)
            if tokens.shape != (n, *self.token_shape):
                raise ValueError(f"shard {i}: tokens of shape {tokens.shape}, expected {(n, *self.token_shape)}")
        image_paths = image_paths if image_paths is not None else [None] * n
        splits = splits if splits is not None else [None] * n
        extras = extras if extras is not None else [{}] * n
        table = pa.table(
            {
                "key": pa.array([utf8(k) for k in keys], pa.string()),
                "image_path": pa.array([utf8(p) for p in image_paths], pa.string()),
                "split": pa.array([utf8(s) for s in splits], pa.string()),
                "captions": pa.array([[utf8(c) for c in caps] for caps in captions], pa.list_(pa.string())),
                "caption": pa.array([utf8(c[0]) if c else None for c in captions], pa.string()),
                "extra": pa.array([utf8(json.dumps(e, sort_keys=True)) if e else None for e in extras], pa.string()),
            }
        )
        lines = "".join(utf8(json.dumps({**s, "shard": i}, ensure_ascii=False)) + "\n" for s in (skipped or []))
        replace_atomically(self.skip_file(i), lambda tmp: tmp.write_text(lines, encoding="utf-8"))
        replace_atomically(self.meta_file(i), lambda tmp: pq.write_table(table, tmp))

        def saver(array: np.ndarray):
            def save(tmp):
                with open(tmp, "wb") as f:
                    np.save(f, array.astype(np.float16))

            return save

        if tokens is not None:  # one row per image: its T tokens of width D, flattened
            replace_atomically(self.token_file(i), saver(tokens.reshape(n, -1)))
        replace_atomically(self.emb_file(i), saver(emb))

    def finalize(self, num_shards: int) -> dict:
        """Merge the per-shard skip lists into skipped.jsonl and write info.json for shards 0..num_shards-1."""
        _, _, pq = arrow()
        missing = [i for i in range(num_shards) if not self.shard_done(i)]
        if missing:
            raise ClipCapError(f"{self.path}: shards {missing[:5]} are not written yet")
        num_images = num_captions = 0
        splits: dict[str, int] = {}
        for i in range(num_shards):
            table = pq.read_table(self.meta_file(i), columns=["split", "captions"])
            num_images += table.num_rows
            num_captions += sum(len(c) for c in table.column("captions").to_pylist())
            for s in table.column("split").to_pylist():
                splits[str(s)] = splits.get(str(s), 0) + 1
        skipped_lines = []
        for i in range(num_shards):
            f = self.skip_file(i)
            if f.is_file():
                skipped_lines.extend(line for line in f.read_text(encoding="utf-8").splitlines() if line.strip())
        by_reason: dict[str, int] = {}
        for line in skipped_lines:
            cls = reason_class(json.loads(line)["reason"])
            by_reason[cls] = by_reason.get(cls, 0) + 1
        text = "".join(line + "\n" for line in skipped_lines)
        replace_atomically(self.path / SKIPPED, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        info = {
            "format": "clipcap-store",
            "version": 1,
            "clip_model": self.clip_model,
            "clip_dim": self.clip_dim,
            "normalized": self.normalized,
            "modality": self.modality,
            "dtype": "float16",
            "num_shards": num_shards,
            "num_images": num_images,
            "num_captions": num_captions,
            "splits": dict(sorted(splits.items())),
            "skipped": len(skipped_lines),
            "skipped_by_reason": dict(sorted(by_reason.items())),
            **self.extra_info,
        }
        if self.token_shape is not None:
            info["tokens"] = {"count": self.token_shape[0], "dim": self.token_shape[1], "grid": self.token_grid}
        write_json(self.path / INFO, info)
        return info

    # -- streaming API -----------------------------------------------------------------------------------------
    def add(
        self, embedding, key: str, captions: list[str], image_path=None, split=None, extra=None, tokens=None
    ) -> None:
        """Buffer one row (with its (T, D) tokens in a token store); a shard is written every `shard_size` rows."""
        self._rows.append(
            (np.asarray(embedding, dtype=np.float32), key, list(captions), image_path, split, extra, tokens)
        )
        if len(self._rows) >= self.shard_size:
            self._flush()

    def skip(self, key: str, reason: str, image: str | None = None) -> None:
        """Record a bad item; it lands in the current shard's skip list and in skipped.jsonl."""
        self._skipped.append({"key": key, "image": image, "reason": reason})

    def _flush(self) -> None:
        emb, keys, caps, paths, splits, extras, tokens = (
            zip(*self._rows, strict=True) if self._rows else ([], [], [], [], [], [], [])
        )
        self.write_shard(
            self._next_shard,
            np.stack(emb) if emb else np.zeros((0, self.clip_dim), np.float32),
            list(keys),
            list(caps),
            list(paths),
            list(splits),
            [e or {} for e in extras],
            self._skipped,
            tokens=None if self.token_shape is None else np.asarray(tokens, np.float32).reshape(-1, *self.token_shape),
        )
        self._next_shard += 1
        self._rows, self._skipped = [], []

    def close(self) -> dict:
        if self._rows or self._skipped or self._next_shard == 0:
            self._flush()
        return self.finalize(self._next_shard)

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()


def _concat(pa, tables, column: str):
    # Chunks, not columns: a shard with no rows has a column with no chunks.
    return pa.chunked_array(
        [c for t in tables for c in t.column(column).chunks], type=tables[0].schema.field(column).type
    )


def is_store(path: str | Path) -> bool:
    """Whether `path` is a directory laid out as an embedding store (img_emb/ or text_emb/ inside)."""
    path = Path(path)
    return path.is_dir() and any((path / d).is_dir() for d in _EMB_DIRS.values())


def _npy_layout(path: Path) -> tuple[int, int, np.dtype, int]:
    """(rows, dim, dtype, byte offset of the data) of a 2-D C-order .npy file, from its header alone."""
    try:
        mm = np.load(path, mmap_mode="r")
    except Exception as e:  # numpy parses the header with ast/tokenize: a damaged one raises many kinds of error
        raise ClipCapError(f"{path} is not a readable .npy file ({type(e).__name__}: {e})") from None
    if mm.ndim != 2 or not mm.flags.c_contiguous or mm.dtype.kind != "f":
        raise ClipCapError(f"{path} is not a 2-D row-major float array of embeddings ({mm.dtype}, shape {mm.shape})")
    return mm.shape[0], mm.shape[1], mm.dtype, mm.offset


def _read_info(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ClipCapError(f"{path} is damaged (not valid JSON: {e})") from None
    if not isinstance(info, dict):
        raise ClipCapError(f"{path} is damaged (not a JSON object)")
    if "num_shards" in info and (not isinstance(info["num_shards"], int) or info["num_shards"] < 0):
        raise ClipCapError(f"{path} is damaged (num_shards {info['num_shards']!r})")
    if info.get("modality", "image") not in _EMB_DIRS:
        raise ClipCapError(f"{path} is damaged (modality {info.get('modality')!r})")
    return info


def _arrow_call(pa, path: Path, fn, *args, **kwargs):
    """A pyarrow read, with a damaged file reported as one ClipCapError naming it."""
    try:
        return fn(*args, **kwargs)
    except (pa.ArrowException, OSError) as e:
        raise ClipCapError(f"{path} is damaged ({str(e).splitlines()[0]})") from None


def _read_table(pa, pq, path: Path, columns: list[str]):
    """Columns of a metadata shard, checked whole (parquet pages carry no checksum: damaged bytes can decode into
    invalid UTF-8 that would only fail later, row by row)."""
    table = _arrow_call(pa, path, pq.read_table, path, columns=columns)
    _arrow_call(pa, path, table.validate, full=True)
    return table


def _shard_number(path: Path) -> int:
    return int(re.search(r"_(\d+)\.\w+$", path.name).group(1))


class EmbeddingStore:
    """A store read row by row from disk: `store[i]` -> (float32 embedding, caption) for the i-th (image, caption) pair.

    `split` keeps only images of that split; `caption_column` names the metadata column holding the captions
    (a list<string> column gives several pairs per image; a string column, as clip-retrieval writes, one); None
    reads no captions (no pairs), for a store used for its embeddings and metadata rows alone.
    Memory stays flat in the store size: embeddings stay on disk and are read row by row, captions sit in one Arrow
    buffer.
    """

    def __init__(self, path: str | Path, caption_column: str | None = "captions", split: str | None = None):
        pa, pc, pq = arrow()
        self.path = Path(path)
        self.split = split
        if not self.path.is_dir():
            raise ClipCapError(f"embedding store not found: {self.path}")
        self._info = _read_info(self.path / INFO)
        if self._info is None and (self.path / JOB).is_file():
            raise ClipCapError(
                f"embedding store {self.path} is unfinished: rerun the same `clipcap embed` command to complete it"
            )
        modality = (self._info or {}).get("modality", "image")
        emb_dir = self.path / _EMB_DIRS.get(modality, "img_emb")
        if not emb_dir.is_dir() and (self.path / "text_emb").is_dir():
            emb_dir = self.path / "text_emb"
        if self._info is not None and "num_shards" in self._info:
            self._emb_files = [emb_dir / f"{emb_dir.name}_{i}.npy" for i in range(self._info["num_shards"])]
        else:
            self._emb_files = sorted(emb_dir.glob(f"{emb_dir.name}_*.npy"), key=_shard_number)
        if not self._emb_files:
            raise ClipCapError(f"{self.path} is not an embedding store (no {emb_dir.name}/*.npy files)")
        self._meta_files = [self.path / "metadata" / f"metadata_{_shard_number(f)}.parquet" for f in self._emb_files]
        for f in self._emb_files + self._meta_files:
            if not f.is_file():
                raise ClipCapError(f"embedding store {self.path} is incomplete: {f} is missing")

        self._files: dict[tuple[int, bool], io.FileIO] = {}  # (shard, tokens?) -> handle
        self._shard_table = None  # (shard, its whole metadata table): the last one `metadata` read
        self._layout = [_npy_layout(f) for f in self._emb_files]  # (rows, dim, dtype, data offset)
        lengths = [rows for rows, *_ in self._layout]
        dims = {dim for _, dim, *_ in self._layout}
        if len(dims) != 1:
            raise ClipCapError(f"embedding store {self.path}: shards disagree on the embedding size {sorted(dims)}")
        self._dim = dims.pop()
        self._starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self._token_files, self._token_layout = self._open_tokens(lengths)

        schema = _arrow_call(pa, self._meta_files[0], pq.read_schema, self._meta_files[0])
        if caption_column is not None and caption_column not in schema.names:
            if caption_column == "captions" and "caption" in schema.names:
                caption_column = "caption"  # a clip-retrieval store
            else:
                raise ClipCapError(
                    f"embedding store {self.path} has no caption column {caption_column!r} "
                    f"(columns: {', '.join(schema.names)})"
                )
        self.caption_column = caption_column
        self._schema = schema
        self._columns = [c for c in ("key", "image_path", "url", "split", "extra") if c in schema.names]
        tables = []
        columns = [c for c in (caption_column, "split" if "split" in schema.names else None) if c is not None]
        for f, n in zip(self._meta_files, lengths, strict=True):
            # Read for embeddings and metadata rows, every shard must carry the same columns (rows of several shards
            # form one table).
            if caption_column is None and _arrow_call(pa, f, pq.read_schema, f) != schema:
                raise ClipCapError(f"embedding store {self.path}: {f.name} has other columns than the first shard")
            t = _read_table(pa, pq, f, columns)
            if tables and t.schema != tables[0].schema:
                raise ClipCapError(f"embedding store {self.path}: {f.name} has other column types than the first shard")
            if t.num_rows != n:
                raise ClipCapError(
                    f"embedding store {self.path}: {f.name} has {t.num_rows} rows but its embedding file has {n}"
                )
            tables.append(t)
        if caption_column is None:
            counts = np.zeros(int(self._starts[-1]), dtype=np.int64)
            values = pa.array([], pa.string())
        else:
            caps = _concat(pa, tables, caption_column).combine_chunks()
            text = (pa.types.is_string, pa.types.is_large_string)
            is_list = pa.types.is_list(caps.type) or pa.types.is_large_list(caps.type)
            item = caps.type.value_type if is_list else caps.type
            if not any(is_type(item) for is_type in text):
                raise ClipCapError(
                    f"embedding store {self.path}: column {caption_column!r} holds {caps.type}, not text"
                )
            if is_list:
                counts = np.asarray(pc.list_value_length(caps).fill_null(0), dtype=np.int64)
                values = pc.list_flatten(caps)
            else:  # one caption per row
                counts = np.asarray(caps.is_valid(), dtype=np.int64)
                values = caps.drop_null()
        # Empty captions are not training pairs.
        keep = np.asarray(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(values)), 0).fill_null(False))
        cum = np.concatenate([[0], np.cumsum(keep)])
        offsets = np.concatenate([[0], np.cumsum(counts)])
        counts = cum[offsets[1:]] - cum[offsets[:-1]]
        self._captions = values.filter(pa.array(keep))
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

        if split is not None:
            if "split" not in schema.names:
                raise ClipCapError(f"embedding store {self.path} has no split column; drop the split filter")
            splits = _concat(pa, tables, "split")
            rows = np.flatnonzero(np.asarray(pc.equal(splits, split).fill_null(False)))
            if len(rows) == 0:
                present = sorted(str(s) for s in pc.unique(splits).to_pylist())
                raise ClipCapError(f"embedding store {self.path} has no images in split {split!r} (splits: {present})")
        else:
            rows = np.arange(len(counts), dtype=np.int64)
        self._rows = rows.astype(np.int64)
        kept = counts[self._rows]
        ends = np.cumsum(kept)
        self._pair_image = np.repeat(np.arange(len(self._rows), dtype=np.int64), kept)
        within = np.arange(int(ends[-1]) if len(ends) else 0, dtype=np.int64) - np.repeat(ends - kept, kept)
        self._pair_caption = np.repeat(offsets[self._rows], kept) + within
        self._image_caption_start = offsets[self._rows]
        self._image_caption_count = kept

    def _open_tokens(self, lengths: list[int]) -> tuple[list[Path], list[tuple]]:
        """The token shards' paths and layouts (none for a store without tokens), checked against info.json."""
        tokens = (self._info or {}).get("tokens")
        if not tokens:
            return [], []
        files = [self.path / TOKENS_DIR / f"{TOKENS_DIR}_{_shard_number(f)}.npy" for f in self._emb_files]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise ClipCapError(f"embedding store {self.path} is incomplete: {missing[0]} is missing")
        layout = [_npy_layout(f) for f in files]
        width = tokens["count"] * tokens["dim"]
        for f, n, (rows, dim, *_) in zip(files, lengths, layout, strict=True):
            if rows != n or dim != width:
                raise ClipCapError(
                    f"embedding store {self.path}: {f.name} holds {rows} x {dim} values, expected {n} x {width} "
                    f"({tokens['count']} tokens of {tokens['dim']})"
                )
        return files, layout

    # -- reading rows --------------------------------------------------------------------------------------------
    def _read_row(self, shard: int, local: int, tokens: bool = False) -> np.ndarray:
        # A positioned read per row, not a slice of a mapping: random reads through a mapping pull whole page-cache
        # folios (~1-2 MiB each, measured) into RSS until unmapped, so an epoch over a mapped store grows RSS to the
        # store's size. pread leaves the caching to the kernel and keeps the process flat.
        key = (shard, tokens)
        fh = self._files.get(key)
        if fh is None:
            path = (self._token_files if tokens else self._emb_files)[shard]
            fh = self._files[key] = open(path, "rb", buffering=0)  # noqa: SIM115 (kept open)
        _, dim, dtype, offset = (self._token_layout if tokens else self._layout)[shard]
        size = dim * dtype.itemsize
        return np.frombuffer(os.pread(fh.fileno(), size, offset + local * size), dtype=dtype).astype(np.float32)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_files"] = {}  # each DataLoader worker opens its own file handles
        state["_shard_table"] = None
        return state

    # -- metadata ----------------------------------------------------------------------------------------------
    @property
    def info(self) -> dict:
        """info.json; for a clip-retrieval store (which has none) the same fields, inferred."""
        if self._info is not None:
            return self._info
        return {
            "clip_model": None,
            "clip_dim": self._dim,
            "normalized": self._looks_normalized(),
            "modality": "image",
            "num_shards": len(self._emb_files),
            "num_images": int(self._starts[-1]),
        }

    def _looks_normalized(self) -> bool:
        sample = np.stack([self._read_row(0, n) for n in range(min(100, self._layout[0][0]))] or [np.ones(1)])
        return bool(len(sample)) and bool(np.allclose(np.linalg.norm(sample, axis=1), 1.0, atol=1e-2))

    @property
    def clip_fingerprint(self) -> str | None:
        """Content hash of the encoder's weights recorded at embedding time (None for older or foreign stores)."""
        return self.info.get("clip_fingerprint")

    @property
    def clip_dim(self) -> int:
        return int(self._dim)

    @property
    def token_shape(self) -> tuple[int, int] | None:
        """(T, D) of the stored image tokens, or None when the store holds pooled embeddings only."""
        tokens = (self._info or {}).get("tokens")
        return (int(tokens["count"]), int(tokens["dim"])) if tokens else None

    @property
    def token_grid(self) -> int | None:
        """The grid the patch tokens were pooled to when embedded (None: every token kept)."""
        return ((self._info or {}).get("tokens") or {}).get("grid")

    @property
    def clip_model(self) -> str | None:
        return self.info.get("clip_model")

    @property
    def normalized(self) -> bool:
        return bool(self.info.get("normalized", False))

    @property
    def modality(self) -> str:
        return self.info.get("modality", "image")

    @property
    def num_images(self) -> int:
        return len(self._rows)

    def __len__(self) -> int:
        return len(self._pair_image)

    def __getitem__(self, i: int) -> tuple[np.ndarray, str]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"pair {i} out of range for a store of {len(self)} pairs")
        i = int(i) % len(self)
        return self.image_embedding(int(self._pair_image[i])), self._captions[int(self._pair_caption[i])].as_py()

    def pair_image_index(self, i: int) -> int:
        """The image (0..num_images-1) that pair `i` belongs to."""
        return int(self._pair_image[i])

    def _locate(self, j: int) -> tuple[int, int]:
        row = int(self._rows[j])
        shard = int(np.searchsorted(self._starts, row, side="right")) - 1
        return shard, row - int(self._starts[shard])

    def image_embedding(self, j: int) -> np.ndarray:
        """Embedding of image `j` as float32 (clip_dim,)."""
        return self._read_row(*self._locate(j))

    def image_embeddings(self, indices=None) -> np.ndarray:
        """Embeddings of the given images (default: all kept images) as one float32 array (n, clip_dim)."""
        indices = range(self.num_images) if indices is None else indices
        out = np.empty((len(indices), self._dim), dtype=np.float32)
        for n, j in enumerate(indices):
            out[n] = self.image_embedding(j)
        return out

    def image_tokens(self, indices=None) -> np.ndarray:
        """Image tokens of the given images (default: all kept images) as one float32 array (n, T, D)."""
        shape = self.token_shape
        if shape is None:
            raise ClipCapError(f"embedding store {self.path} holds no image tokens (embed it with tokens)")
        indices = range(self.num_images) if indices is None else indices
        out = np.empty((len(indices), *shape), dtype=np.float32)
        for n, j in enumerate(indices):
            out[n] = self._read_row(*self._locate(j), tokens=True).reshape(shape)
        return out

    def image_captions(self, j: int) -> list[str]:
        start, count = int(self._image_caption_start[j]), int(self._image_caption_count[j])
        return self._captions.slice(start, count).to_pylist()

    def _column(self, name: str) -> list | None:
        if name not in self._columns:
            return None
        pa, _, pq = arrow()
        values = []
        for f in self._meta_files:
            values.extend(_read_table(pa, pq, f, [name]).column(name).to_pylist())
        if len(values) != int(self._starts[-1]):
            expected = int(self._starts[-1])
            raise ClipCapError(f"embedding store {self.path}: column {name!r} has {len(values)} rows, not {expected}")
        return [values[r] for r in self._rows]

    @cached_property
    def keys(self) -> list[str]:
        keys = self._column("key")
        return [str(k) for k in keys] if keys is not None else [str(r) for r in self._rows]

    @cached_property
    def image_paths(self) -> list[str]:
        paths = self._column("image_path") or self._column("url") or [None] * self.num_images
        return ["" if p is None else str(p) for p in paths]

    @cached_property
    def splits(self) -> list[str | None]:
        return self._column("split") or [None] * self.num_images

    @cached_property
    def extras(self) -> list[dict]:
        """Per-image extra fields (e.g. nocaps {"domain": "out-domain"}, COCO {"image_id": ...})."""
        return [json.loads(e) if e else {} for e in (self._column("extra") or [None] * self.num_images)]

    def image_extra(self, j: int) -> dict:
        return self.extras[j]

    @property
    def metadata_schema(self):
        """The Arrow schema of the metadata shards: every column, as stored."""
        return self._schema

    def metadata(self, indices):
        """Every metadata column of the given images (indices into 0..num_images-1), in that order, as one Arrow
        table. Each shard is read whole (and checked) when first needed and kept while the indices stay in it."""
        pa, _, pq = arrow()
        located = [self._locate(int(j)) for j in indices]
        parts = []
        start = 0
        while start < len(located):
            shard = located[start][0]
            end = start
            while end < len(located) and located[end][0] == shard:
                end += 1
            if self._shard_table is None or self._shard_table[0] != shard:
                f = self._meta_files[shard]
                self._shard_table = (shard, _read_table(pa, pq, f, self._schema.names))
            rows = pa.array([local for _, local in located[start:end]], pa.int64())
            parts.append(self._shard_table[1].take(rows))
            start = end
        return pa.concat_tables(parts) if parts else self._schema.empty_table()

    def __repr__(self) -> str:
        split = f", split={self.split!r}" if self.split else ""
        return f"EmbeddingStore({str(self.path)!r}{split}: {self.num_images} images, {len(self)} pairs)"
