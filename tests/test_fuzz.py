"""Property tests: arbitrary JSON structures, byte strings and encodings fed to every source reader, to the prediction
and reference loaders and to the embedding store. The only outcomes allowed are well-formed records (bad entries
marked with a `problem`), a loaded object, or one ClipCapError. Bounded in CI; HYPOTHESIS_PROFILE=long runs more."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from clipcap.data.references import load_predictions, load_references
from clipcap.data.sources import FORMATS, Record, read_source
from clipcap.data.store import EmbeddingStore, StoreWriter
from clipcap.errors import ClipCapError

# Text that may hold lone surrogates (what a JSON "\ud800" escape or a mis-decoded file name gives).
TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=12)
SCALARS = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | TEXT
JSON = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4), max_leaves=20
)
KEYS = {
    "karpathy": ("filename", "filepath", "cocoid", "imgid", "split", "sentences", "raw", "tokens"),
    "coco": ("id", "file_name", "image_id", "caption", "domain", "coco_url"),
    "jsonl": ("image", "caption", "captions", "key", "id", "split", "text"),
}


def shaped(keys) -> st.SearchStrategy:
    """Dicts over a format's own field names with arbitrary values: close enough to the format to reach its parser."""
    field = st.sampled_from(keys) | TEXT
    entry = st.dictionaries(field, JSON | st.lists(st.dictionaries(field, JSON, max_size=3), max_size=3), max_size=6)
    return st.lists(entry | JSON, max_size=6)


def dump(obj) -> bytes:
    # ensure_ascii keeps lone surrogates as \\udXXXX escapes, the way they reach us in real files
    return json.dumps(obj, ensure_ascii=True, allow_nan=True).encode()


def check(records) -> list[Record]:
    """Every record is well-formed: text that can be written as UTF-8, a JSON-able `extra`."""
    records = list(records)
    for r in records:
        assert isinstance(r, Record)
        assert isinstance(r.key, str) and (r.key.strip() or r.problem)
        assert r.image is None or isinstance(r.image, str)
        assert r.problem is None or isinstance(r.problem, str)
        assert isinstance(r.captions, list) and all(isinstance(c, str) for c in r.captions)
        if r.problem is None:
            for c in r.captions:
                c.encode("utf-8")  # no lone surrogates left in a usable record
            json.dumps(r.extra, ensure_ascii=False).encode("utf-8")
            assert isinstance(r.extra, dict)
    return records


def read(data: bytes, name: str, fmt: str = "auto", **kwargs):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        try:
            return check(read_source(path, format=fmt, **kwargs))
        except ClipCapError as e:
            assert str(e) and "\n" not in str(e).strip()
            return None


@given(st.one_of(shaped(KEYS["karpathy"]), JSON).map(lambda images: {"images": images}) | JSON)
def test_karpathy_reader(obj):
    read(dump(obj), "dataset_coco.json", "karpathy")
    read(dump(obj), "dataset_coco.json")  # auto-detection too


@given(shaped(KEYS["coco"]), shaped(KEYS["coco"]), JSON)
def test_coco_and_nocaps_readers(images, annotations, info):
    obj = {"images": images, "annotations": annotations, "info": info}
    for fmt in ("coco", "nocaps", "auto"):
        read(dump(obj), "captions_val2014.json", fmt)


@given(st.lists(st.one_of(shaped(KEYS["jsonl"]).map(lambda rows: rows[0] if rows else {}), JSON), max_size=6))
def test_jsonl_reader(rows):
    data = b"\n".join(dump(r) for r in rows)
    read(data, "data.jsonl")
    read(data, "data.jsonl", image_column="image", caption_column="caption")


@given(st.binary(max_size=300))
def test_any_bytes_in_any_text_format(data):
    for name, fmt in (("d.json", "auto"), ("d.jsonl", "jsonl"), ("d.csv", "csv"), ("d.tsv", "cc"), ("d.json", "coco")):
        read(data, name, fmt)


@given(st.lists(st.lists(TEXT, max_size=4), max_size=6), st.sampled_from([",", ";", "\t"]))
def test_csv_reader(rows, delimiter):
    header = "image,caption,split\n"
    body = "\n".join(delimiter.join(cells) for cells in rows)
    read((header + body).encode("utf-8", "surrogatepass"), "d.csv", "csv")


@given(st.lists(st.tuples(TEXT, TEXT), max_size=6))
def test_conceptual_captions_tsv(rows):
    body = "\n".join(f"{caption}\t{url}" for caption, url in rows)
    read(body.encode("utf-8", "surrogatepass"), "Train_GCC-training.tsv", "cc")


MEMBERS = st.sampled_from(["a.jpg", "a.txt", "a.json", "b.png", "b.txt", "c.json"])


@given(st.lists(st.tuples(MEMBERS, st.binary()), max_size=6), st.integers(0, 2000))
def test_webdataset_shards_whole_or_cut(members, cut):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    whole = buf.getvalue()
    read(whole, "shard.tar")
    read(whole[:cut], "shard.tar")  # damaged: cut anywhere


@given(st.binary(max_size=200), st.binary(max_size=200))
def test_folder_with_any_sidecars(txt, meta):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "x.png").write_bytes(b"not checked by the reader")
        (root / "x.txt").write_bytes(txt)
        (root / "x.json").write_bytes(meta)
        check(read_source(root, format="folder"))


@given(JSON)
def test_prediction_loader(obj):
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in (("p.json", dump(obj)), ("p.jsonl", dump(obj) + b"\n" + dump(obj))):
            path = Path(tmp) / name
            path.write_bytes(data)
            try:
                captions, images = load_predictions(path)
            except ClipCapError:
                continue
            assert all(isinstance(k, str) and isinstance(v, str) for k, v in captions.items())
            for k, v in captions.items():
                (k + v).encode("utf-8")
            assert set(images) <= set(captions)


@given(JSON | st.dictionaries(TEXT, st.lists(TEXT, max_size=3), max_size=4))
def test_reference_loader(obj):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "refs.json"
        path.write_bytes(dump(obj))
        with contextlib.suppress(ClipCapError):
            check(load_references(path))


@given(st.binary(max_size=64))
def test_prediction_loader_on_bytes(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.json"
        path.write_bytes(data)
        with contextlib.suppress(ClipCapError):
            load_predictions(path)


# -- the embedding store -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def good_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("store") / "s"
    rng = np.random.default_rng(0)
    with StoreWriter(path, clip_model="clip", clip_dim=8, normalized=False, shard_size=3) as w:
        for i in range(7):
            w.add(rng.normal(size=8), f"k{i}", [f"caption {i}.", "another."], split="train" if i % 2 else "val")
    return path


STORE_FILES = ["info.json", "img_emb/img_emb_0.npy", "img_emb/img_emb_2.npy", "metadata/metadata_1.parquet"]


@given(st.sampled_from(STORE_FILES), st.integers(0, 4000), st.binary(max_size=40), st.booleans())
def test_damaged_store_reads_or_refuses_with_one_error(good_store, name, at, junk, truncate):
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(shutil.copytree(good_store, Path(tmp) / "s"))
        data = (store / name).read_bytes()
        at = min(at, len(data))
        (store / name).write_bytes(data[:at] if truncate else data[:at] + junk + data[at + len(junk) :])
        try:
            s = EmbeddingStore(store, split="train")
            for i in range(len(s)):
                embedding, caption = s[i]
                assert embedding.shape == (s.clip_dim,) and isinstance(caption, str)
            assert len(s.keys) == s.num_images
        except ClipCapError as e:
            assert "\n" not in str(e).strip()


@given(st.sampled_from(sorted(FORMATS)))
def test_a_directory_or_missing_path_is_one_error(fmt):
    with tempfile.TemporaryDirectory() as tmp:
        for source in (Path(tmp), Path(tmp) / "missing"):
            with contextlib.suppress(ClipCapError):
                check(read_source(source, format=fmt))
