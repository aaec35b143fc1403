"""The embedding store: clip-retrieval layout written atomically, read memory-mapped, one sample per caption."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipcap.data.store import EmbeddingStore, StoreWriter, is_store
from clipcap.errors import ClipCapError

DIM = 8


def f16(x):
    return np.asarray(x, dtype=np.float16).astype(np.float32)


@pytest.fixture()
def rows():
    rng = np.random.default_rng(0)
    return [
        dict(key="a", emb=rng.normal(size=DIM), captions=["a one.", "a two."], split="train", extra={"image_id": 1}),
        dict(key="b", emb=rng.normal(size=DIM), captions=["b one."], split="val", extra={"domain": "out-domain"}),
        dict(key="c", emb=rng.normal(size=DIM), captions=["c one.", "", "c three."], split="train", extra={}),
        dict(key="d", emb=rng.normal(size=DIM), captions=["d one."], split="novel", extra={}),
        dict(key="e", emb=rng.normal(size=DIM), captions=["e one.", "e two."], split="train", extra={}),
    ]


@pytest.fixture()
def store_dir(tmp_path, rows):
    path = tmp_path / "store"
    with StoreWriter(path, clip_model="tiny-clip", clip_dim=DIM, normalized=False, shard_size=2) as w:
        for r in rows:
            w.add(
                r["emb"], r["key"], r["captions"], image_path=f"/img/{r['key']}.jpg", split=r["split"], extra=r["extra"]
            )
        w.skip("z", "truncated or corrupt image (broken data stream)", image="/img/z.jpg")
        w.skip("y", "file not found", image="/img/y.jpg")
    return path


def test_layout_and_info(store_dir):
    assert sorted(p.name for p in (store_dir / "img_emb").iterdir()) == [
        "img_emb_0.npy",
        "img_emb_1.npy",
        "img_emb_2.npy",
    ]
    assert sorted(p.name for p in (store_dir / "metadata").iterdir()) == [f"metadata_{i}.parquet" for i in range(3)]
    assert np.load(store_dir / "img_emb" / "img_emb_0.npy").dtype == np.float16
    info = json.loads((store_dir / "info.json").read_text())
    assert info["clip_model"] == "tiny-clip" and info["clip_dim"] == DIM and info["normalized"] is False
    assert info["num_images"] == 5 and info["num_captions"] == 9 and info["num_shards"] == 3
    assert info["splits"] == {"novel": 1, "train": 3, "val": 1}
    assert info["skipped"] == 2
    assert info["skipped_by_reason"] == {"file not found": 1, "truncated or corrupt image": 1}
    skipped = [json.loads(line) for line in (store_dir / "skipped.jsonl").read_text().splitlines()]
    assert [(s["key"], s["reason"]) for s in skipped] == [
        ("z", "truncated or corrupt image (broken data stream)"),
        ("y", "file not found"),
    ]
    table = pq.read_table(store_dir / "metadata" / "metadata_0.parquet")
    assert table.column_names == ["key", "image_path", "split", "captions", "caption", "extra"]
    assert table.column("captions").to_pylist() == [["a one.", "a two."], ["b one."]]
    assert not list(store_dir.rglob(".*tmp*"))  # atomic writes leave no temporaries


def test_pairs_one_per_nonempty_caption(store_dir, rows):
    store = EmbeddingStore(store_dir)
    assert store.num_images == 5 and store.clip_dim == DIM and store.clip_model == "tiny-clip"
    assert not store.normalized and store.modality == "image"
    expected = [(r["emb"], c) for r in rows for c in r["captions"] if c]
    assert len(store) == len(expected) == 8
    for i, (emb, caption) in enumerate(expected):
        got_emb, got_caption = store[i]
        assert got_emb.dtype == np.float32 and got_emb.shape == (DIM,)
        np.testing.assert_array_equal(got_emb, f16(emb))
        assert got_caption == caption
    assert [store.pair_image_index(i) for i in range(len(store))] == [0, 0, 1, 2, 2, 3, 4, 4]
    assert store.image_captions(2) == ["c one.", "c three."]
    assert store.keys == ["a", "b", "c", "d", "e"]
    assert store.image_paths[1] == "/img/b.jpg"
    assert store.splits == ["train", "val", "train", "novel", "train"]
    assert store.image_extra(1) == {"domain": "out-domain"} and store.image_extra(2) == {}
    np.testing.assert_array_equal(store.image_embeddings([3, 0]), f16([rows[3]["emb"], rows[0]["emb"]]))
    np.testing.assert_array_equal(store[-1][0], f16(rows[4]["emb"]))
    with pytest.raises(IndexError):
        store[len(store)]
    assert len(list(store)) == len(store)  # the sequence protocol stops at the end


def test_split_filter(store_dir, rows):
    train = EmbeddingStore(store_dir, split="train")
    assert train.num_images == 3 and len(train) == 6
    assert train.keys == ["a", "c", "e"]
    assert [train[i][1] for i in range(len(train))] == ["a one.", "a two.", "c one.", "c three.", "e one.", "e two."]
    np.testing.assert_array_equal(train.image_embedding(2), f16(rows[4]["emb"]))
    novel = EmbeddingStore(store_dir, split="novel")
    assert novel.keys == ["d"] and novel[0][1] == "d one."
    with pytest.raises(ClipCapError, match=r"no images in split 'test'.*novel"):
        EmbeddingStore(store_dir, split="test")


def test_pickles_without_the_embeddings(store_dir):
    store = EmbeddingStore(store_dir)
    store[0]
    blob = pickle.dumps(store)
    assert len(blob) < 20_000
    clone = pickle.loads(blob)
    np.testing.assert_array_equal(clone[3][0], store[3][0])
    assert clone[3][1] == store[3][1]


def test_write_shard_and_finalize(tmp_path):
    w = StoreWriter(tmp_path / "s", clip_model="m", clip_dim=4, normalized=True, modality="text")
    w.write_shard(
        1, np.ones((1, 4)) / 2, ["k1"], [["one."]], skipped=[{"key": "x", "image": None, "reason": "no captions"}]
    )
    assert w.shard_done(1) and not w.shard_done(0)
    with pytest.raises(ClipCapError, match=r"shards \[0\] are not written"):
        w.finalize(2)
    w.write_shard(0, np.zeros((0, 4)), [], [])
    info = w.finalize(2)
    assert info["modality"] == "text" and info["num_images"] == 1 and info["skipped"] == 1
    assert (tmp_path / "s" / "text_emb" / "text_emb_1.npy").is_file()
    store = EmbeddingStore(tmp_path / "s")
    assert store.modality == "text" and store.normalized and len(store) == 1
    np.testing.assert_array_equal(store[0][0], np.full(4, 0.5, np.float32))
    assert json.loads((tmp_path / "s" / "skipped.jsonl").read_text())["shard"] == 1


def _clip_retrieval_store(path, n_per_shard=(3, 2)):
    """The layout clip-retrieval's `clip_inference` writes: normalised float16, string `caption`, no info.json."""
    rng = np.random.default_rng(1)
    (path / "img_emb").mkdir(parents=True)
    (path / "metadata").mkdir()
    all_emb, all_caps = [], []
    for i, n in enumerate(n_per_shard):
        emb = rng.normal(size=(n, DIM))
        emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float16)
        caps = [f"laion caption {i}-{j}" for j in range(n)]
        np.save(path / "img_emb" / f"img_emb_{i}.npy", emb)
        pq.write_table(
            pa.table({"image_path": [f"{i:05d}{j:04d}.jpg" for j in range(n)], "caption": caps, "url": ["u"] * n}),
            path / "metadata" / f"metadata_{i}.parquet",
        )
        all_emb.append(emb.astype(np.float32))
        all_caps += caps
    return np.concatenate(all_emb), all_caps


@pytest.mark.parametrize("column", ["captions", "caption"])
def test_reads_clip_retrieval_stores(tmp_path, column):
    emb, caps = _clip_retrieval_store(tmp_path / "cr")
    store = EmbeddingStore(tmp_path / "cr", caption_column=column)
    assert store.caption_column == "caption"
    assert len(store) == store.num_images == 5
    assert store.normalized and store.clip_model is None and store.clip_dim == DIM
    for i in range(5):
        np.testing.assert_array_equal(store[i][0], emb[i])
        assert store[i][1] == caps[i]
    assert store.image_paths[3] == "000010000.jpg"
    assert store.keys == ["0", "1", "2", "3", "4"]


def test_bad_stores_are_user_errors(tmp_path, store_dir):
    with pytest.raises(ClipCapError, match="not found"):
        EmbeddingStore(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ClipCapError, match="not an embedding store"):
        EmbeddingStore(tmp_path / "empty")
    with pytest.raises(ClipCapError, match=r"no caption column 'text'.*key, image_path"):
        EmbeddingStore(store_dir, caption_column="text")
    _clip_retrieval_store(tmp_path / "nosplit")
    with pytest.raises(ClipCapError, match="no split column"):
        EmbeddingStore(tmp_path / "nosplit", split="train")
    np.save(store_dir / "img_emb" / "img_emb_1.npy", np.zeros((5, DIM), np.float16))
    with pytest.raises(ClipCapError, match="metadata_1.parquet has 2 rows but its embedding file has 5"):
        EmbeddingStore(store_dir)
    (store_dir / "metadata" / "metadata_2.parquet").unlink()
    with pytest.raises(ClipCapError, match="incomplete"):
        EmbeddingStore(store_dir)


def test_opened_without_captions_it_reads_embeddings_and_every_metadata_row(tmp_path, store_dir, rows):
    emb, _ = _clip_retrieval_store(tmp_path / "cr")
    for f in (tmp_path / "cr" / "metadata").glob("*.parquet"):  # a store with no caption column at all
        pq.write_table(pq.read_table(f).drop_columns(["caption"]), f)
    with pytest.raises(ClipCapError, match="no caption column 'captions'"):
        EmbeddingStore(tmp_path / "cr")
    store = EmbeddingStore(tmp_path / "cr", caption_column=None)
    assert store.num_images == 5 and len(store) == 0 and store.caption_column is None
    assert store.metadata_schema.names == ["image_path", "url"]
    table = store.metadata([4, 0, 3])  # across shards, in the order asked
    assert table.column("image_path").to_pylist() == ["000010001.jpg", "000000000.jpg", "000010000.jpg"]
    np.testing.assert_array_equal(store.image_embeddings([4, 0]), emb[[4, 0]])
    assert store.metadata([]).num_rows == 0 and store.metadata([]).schema == store.metadata_schema
    # ours, with a split filter: rows are the kept images, metadata as stored
    ours = EmbeddingStore(store_dir, caption_column=None, split="train")
    assert ours.num_images == 3 and ours.metadata([2]).column("key").to_pylist() == ["e"]
    assert ours.metadata([0]).column("captions").to_pylist() == [["a one.", "a two."]]
    # shards must carry the same columns to be read as the rows of one table
    pq.write_table(pa.table({"image_path": ["a", "b"]}), tmp_path / "cr" / "metadata" / "metadata_1.parquet")
    with pytest.raises(ClipCapError, match="metadata_1.parquet has other columns than the first shard"):
        EmbeddingStore(tmp_path / "cr", caption_column=None)
    assert is_store(tmp_path / "cr") and is_store(store_dir)
    assert not is_store(tmp_path / "cr" / "img_emb") and not is_store(tmp_path / "missing")


# -- image tokens ------------------------------------------------------------------------------------------------
TOKENS = (3, 5)  # T tokens of width D per image


@pytest.fixture()
def token_store(tmp_path, rows):
    rng = np.random.default_rng(7)
    tokens = [rng.normal(size=TOKENS) * 50 for _ in rows]  # hidden states are not unit-scale
    path = tmp_path / "tokens"
    w = StoreWriter(path, "tiny-clip", DIM, normalized=False, shard_size=2, token_shape=TOKENS, token_grid=4)
    with w:
        for r, t in zip(rows, tokens, strict=True):
            w.add(r["emb"], r["key"], r["captions"], split=r["split"], tokens=t)
    return path, tokens


def test_token_store_round_trip(token_store, rows):
    path, tokens = token_store
    assert sorted(p.name for p in (path / "tok_emb").iterdir()) == [f"tok_emb_{i}.npy" for i in range(3)]
    first = np.load(path / "tok_emb" / "tok_emb_0.npy")
    assert first.dtype == np.float16 and first.shape == (2, 15)  # 2-D, one row per image: flat reads stay possible
    assert json.loads((path / "info.json").read_text())["tokens"] == {"count": 3, "dim": 5, "grid": 4}
    store = EmbeddingStore(path, split="train")
    assert store.token_shape == TOKENS and store.token_grid == 4
    got = store.image_tokens([2, 0])
    assert got.dtype == np.float32 and got.shape == (2, *TOKENS)
    np.testing.assert_array_equal(got, f16([tokens[4], tokens[0]]))
    np.testing.assert_array_equal(store.image_embeddings([2]), f16([rows[4]["emb"]]))  # pooled rows unchanged
    clone = pickle.loads(pickle.dumps(store))  # what a DataLoader worker gets: it opens its own files
    np.testing.assert_array_equal(clone.image_tokens([1]), f16([tokens[2]]))


def test_token_rows_are_read_without_mapping_the_file(token_store, monkeypatch):
    path, tokens = token_store
    store = EmbeddingStore(path)
    monkeypatch.setattr(np, "load", lambda *a, **k: pytest.fail("rows must be read with pread, not np.load"))
    np.testing.assert_array_equal(store.image_tokens([4])[0], f16(tokens[4]))


def test_store_without_tokens_says_so(store_dir):
    store = EmbeddingStore(store_dir)
    assert store.token_shape is None and store.token_grid is None
    with pytest.raises(ClipCapError, match="holds no image tokens"):
        store.image_tokens([0])


def test_token_writer_checks_shapes(tmp_path):
    w = StoreWriter(tmp_path / "s", "m", 4, normalized=False, token_shape=(2, 3))
    with pytest.raises(ValueError, match="tokens of shape"):
        w.write_shard(0, np.zeros((1, 4)), ["k"], [["c."]], tokens=np.zeros((1, 3, 2)))
    with pytest.raises(ValueError, match="store with tokens"):
        w.write_shard(0, np.zeros((1, 4)), ["k"], [["c."]])
    plain = StoreWriter(tmp_path / "p", "m", 4, normalized=False)
    with pytest.raises(ValueError, match="store without tokens"):
        plain.write_shard(0, np.zeros((1, 4)), ["k"], [["c."]], tokens=np.zeros((1, 2, 3)))
    with pytest.raises(ClipCapError, match="image tokens go with image embeddings"):
        StoreWriter(tmp_path / "t", "m", 4, normalized=False, modality="text", token_shape=(2, 3))


def test_damaged_token_shards_are_user_errors(token_store):
    path, _ = token_store
    np.save(path / "tok_emb" / "tok_emb_1.npy", np.zeros((2, 14), np.float16))  # one value short per row
    with pytest.raises(ClipCapError, match=r"tok_emb_1.npy holds 2 x 14 values, expected 2 x 15"):
        EmbeddingStore(path)
    (path / "tok_emb" / "tok_emb_1.npy").write_bytes(b"not an npy file")
    with pytest.raises(ClipCapError, match="not a readable .npy"):
        EmbeddingStore(path)
    (path / "tok_emb" / "tok_emb_1.npy").unlink()
    with pytest.raises(ClipCapError, match="incomplete.*tok_emb_1.npy"):
        EmbeddingStore(path)
