"""Captioning at dataset scale (`clipcap.caption_job`, `clipcap caption --out`): every source format and embedding
stores as input, captions equal to the Captioner's, sharded output that resumes after a SIGKILL and splits over
torchrun ranks into the same result as one process."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from clipcap import Captioner
from clipcap.caption_job import CaptionJobConfig, caption_job, caption_stream, detect_input
from clipcap.cli import main
from clipcap.data.sources import open_record_image, read_source
from clipcap.data.store import EmbeddingStore
from clipcap.embed import EmbedConfig, embed
from tests.test_evaluate import TRAINED, trained  # noqa: F401 (the fixture: a tiny model trained to say fixed captions)
from tests.test_sources import (
    TABLE_ROWS,
    cc_fixture,
    coco_json,
    karpathy_json,
    webdataset_shards,
    write_image,
)

REPO = Path(__file__).resolve().parents[1]
TOKENS = 6  # max_new_tokens everywhere: short captions keep the tests fast


def run_job(inputs, out, model, **options):
    """The library call, quietly."""
    inputs = inputs if isinstance(inputs, list) else [inputs]
    cfg = CaptionJobConfig(inputs=[str(i) for i in inputs], model=str(model), out=str(out), **options)
    return caption_job(cfg)


def shard_rows(out: Path, fmt: str = "parquet") -> list[dict]:
    """Every output row, shard by shard."""
    rows = []
    for path in sorted((out / "captions").glob(f"part-*.{fmt}")):
        if fmt == "parquet":
            rows += pq.read_table(path).to_pylist()
        else:
            rows += [json.loads(line) for line in path.read_text().splitlines()]
    return rows


def reference(model, images, **options) -> list:
    """Captions from the Python API."""
    return Captioner.from_pretrained(model).caption(images, max_new_tokens=TOKENS, **options)


@pytest.fixture(scope="module")
def pngs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pngs")
    for i in range(7):
        write_image(root / f"{i}.png", seed=i)
    return root


# -- inputs --------------------------------------------------------------------------------------------------------
def test_detect_input(tmp_path, pngs):
    webdataset_shards(tmp_path / "wds")
    (tmp_path / "store" / "img_emb").mkdir(parents=True)
    (tmp_path / "d.jsonl").write_text("")
    assert detect_input([str(tmp_path / "store")]) == "store"
    assert detect_input([str(tmp_path / "d.jsonl")]) == "jsonl"
    assert detect_input([str(tmp_path / "wds")]) == "webdataset"  # a dir of shards and no images
    assert detect_input([str(tmp_path / "wds" / "shard-{00000..00001}.tar")]) == "webdataset"
    assert detect_input([str(tmp_path / "wds" / "shard-00000.tar")]) == "webdataset"
    # image files, folders and globs stay images, as `clipcap caption` always took them
    assert detect_input([str(pngs)]) == "images"
    assert detect_input([str(pngs / "*.png")]) == "images"
    assert detect_input([str(pngs / "0.png"), str(tmp_path / "d.jsonl")]) == "images"


def _source(kind: str, root: Path) -> tuple[Path, dict]:
    """A small source of `kind` (the test_sources builders) and the options to read it."""
    if kind == "karpathy":
        return karpathy_json(root / "dataset_coco.json", root, n=5), {}
    if kind in ("coco", "nocaps"):
        name = "nocaps_val_4500_captions.json" if kind == "nocaps" else "captions_val2014.json"
        return coco_json(root / name, root / "val", nocaps=kind == "nocaps"), {"image_root": str(root / "val")}
    if kind == "cc":
        tsv, images = cc_fixture(root)
        return tsv, {"image_root": str(images)}
    if kind in ("csv", "jsonl", "parquet"):
        for name in ("a.png", "b.png"):
            write_image(root / name, seed=len(name) + ord(name[0]))
        path = root / f"data.{kind}"
        if kind == "csv":
            with open(path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=["image", "caption", "split"])
                w.writeheader()
                w.writerows(TABLE_ROWS)
        elif kind == "jsonl":
            path.write_text("".join(json.dumps(r) + "\n" for r in TABLE_ROWS))
        else:
            pq.write_table(pa.Table.from_pylist(TABLE_ROWS), path)
        return path, {}
    if kind == "folder":
        write_image(root / "folder" / "cat.png", 1)
        (root / "folder" / "cat.txt").write_text("a cat.\n")
        write_image(root / "folder" / "sub" / "dog.jpg", 2, "JPEG")
        (root / "folder" / "sub" / "dog.json").write_text(json.dumps({"url": "http://x/dog.jpg"}))
        return root / "folder", {"input_format": "folder"}  # a folder of images is taken as images unless named
    webdataset_shards(root / "wds")
    return root / "wds", {}


# A column of the source's own metadata each format must carry over, and its values.
CARRIED = {
    "karpathy": ("cocoid", [100, 101, 102, 103, 104]),
    "coco": ("image_id", [10, 11, 12]),
    "nocaps": ("domain", ["in-domain", "near-domain", "out-domain"]),
    "cc": ("url", [f"http://example.com/{n}.jpg" for n in (0, 2, 3, 4)]),
    "csv": ("split", ["train", "val"]),
    "jsonl": ("source_captions", [["a first.", "a second."], ["b only."]]),
    "parquet": ("split", ["train", "val"]),
    "folder": ("url", [None, "http://x/dog.jpg"]),
    "webdataset": ("source_key", [f"{s:05d}{k:04d}" for s in range(2) for k in range(3)]),  # img2dataset's own `key`
}


@pytest.mark.parametrize("kind", list(CARRIED))
def test_every_source_format_is_captioned_with_its_keys_and_metadata(kind, tmp_path, varied_model_dir, capsys):
    source, options = _source(kind, tmp_path)
    read = {"image_root": "images", "input_format": "format"}
    records = list(
        read_source(source, **{read[k]: v for k, v in options.items() if k in read}, require_captions=False)
    )
    good = [r for r in records if r.image is not None]
    expected = reference(varied_model_dir, [open_record_image(r) for r in good])

    result = run_job(source, tmp_path / "out", varied_model_dir, max_new_tokens=TOKENS, shard_size=2, **options)
    rows = shard_rows(tmp_path / "out")
    assert [(r["key"], r["caption"]) for r in rows] == [(r.key, c) for r, c in zip(good, expected, strict=True)]
    assert [r["image"] for r in rows] == [r.image for r in good]
    column, values = CARRIED[kind]
    assert [r[column] for r in rows] == values
    info = result.info
    assert info["num_items"] == len(records) and info["num_captioned"] == len(good)
    assert info["num_skipped"] == len(records) - len(good) and info["num_shards"] == -(-len(records) // 2)

    # Streamed to stdout (no --out): the same captions, keyed, in the same order.
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    args = ["caption", str(source), "--model", str(varied_model_dir), "--max-new-tokens", str(TOKENS), *flags]
    assert main(args) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["key"], r["image"], r["caption"]) for r in out] == [(r["key"], r["image"], r["caption"]) for r in rows]


def test_cc_rows_without_a_download_are_skipped_and_listed(tmp_path, varied_model_dir, capsys):
    tsv, images = cc_fixture(tmp_path)
    code = main(["caption", str(tsv), "--image-root", str(images), "--model", str(varied_model_dir), "--out",
                 str(tmp_path / "out"), "--max-new-tokens", str(TOKENS), "--shard-size", "2"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0
    assert "captioned 4 of 5 images into 3 parquet shards" in err and "skipped 1 (image not downloaded 1)" in err
    assert "shard 0: skipped 1 of 2 (image not downloaded 1)" in err  # reported per shard as it is written
    skipped = [json.loads(line) for line in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    assert skipped == [{"key": "row1", "image": None, "reason": "image not downloaded", "shard": 0}]
    assert (tmp_path / "out" / "skipped" / "part-00000.jsonl").read_text().strip() == json.dumps(skipped[0])


def test_stdout_for_a_source_is_keyed_and_reports_bad_items_in_place(tmp_path, varied_model_dir, pngs, capsys):
    rows = [{"image": str(pngs / "0.png"), "id": "k0"}, {"image": str(tmp_path / "gone.png"), "id": "k1"}]
    lines = [json.dumps(r) for r in rows] + ["{oops"]
    lines.append(json.dumps({"image": str(pngs / "2.png"), "id": "k2"}))
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    expected = reference(varied_model_dir, [pngs / "0.png", pngs / "2.png"])
    args = ["caption", str(tmp_path / "d.jsonl"), "--model", str(varied_model_dir), "--max-new-tokens", str(TOKENS)]
    assert main([*args, "--batch-size", "2", "--workers", "1"]) == 0
    out, err = capsys.readouterr()
    assert [json.loads(line) for line in out.splitlines()] == [
        {"key": "k0", "image": str(pngs / "0.png"), "caption": expected[0]},
        {"key": "k2", "image": str(pngs / "2.png"), "caption": expected[1]},
    ]
    skipped = [line for line in err.splitlines() if line.startswith("skipped ")]
    assert skipped == [
        f"skipped {tmp_path / 'gone.png'}: file not found",
        "skipped line3: line 3 is not valid JSON (Expecting property name enclosed in double quotes)",
    ]
    assert "captioned 2 images, skipped 2" in err
    assert main([*args, "--format", "csv", "--quiet"]) == 0
    assert list(csv.reader(capsys.readouterr().out.splitlines())) == [
        ["key", "image", "caption"],
        ["k0", str(pngs / "0.png"), expected[0]],
        ["k2", str(pngs / "2.png"), expected[1]],
    ]


def test_image_files_in_shards_and_several_captions_each(tmp_path, varied_model_dir, pngs):
    paths = sorted(pngs.glob("*.png"))
    expected = reference(varied_model_dir, paths, num_beams=3, num_return_sequences=2)
    options = dict(max_new_tokens=TOKENS, num_beams=3, num_captions=2, shard_size=3, batch_size=2, workers=1)
    result = run_job(pngs, tmp_path / "out", varied_model_dir, **options)
    rows = shard_rows(tmp_path / "out")
    assert [(r["key"], r["image"], r["captions"]) for r in rows] == [
        (str(p), str(p), c) for p, c in zip(paths, expected, strict=True)
    ]
    assert result.info["columns"] == ["key", "image", "captions"] and result.info["num_shards"] == 3
    # JSON lines shards hold the same rows
    run_job(pngs, tmp_path / "jsonl", varied_model_dir, **options, shard_format="jsonl")
    assert shard_rows(tmp_path / "jsonl", "jsonl") == rows


# -- embedding stores ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def source_and_store(tmp_path_factory, clip_dir):
    """A JSONL source of 9 images (one missing) and the store `embed` made of it, in shards of 4."""
    root = tmp_path_factory.mktemp("store-src")
    rows = [{"image": f"{i}.png", "caption": f"number {i}.", "width": 40 + i} for i in range(8)]
    for i in range(8):
        write_image(root / f"{i}.png", seed=i)
    rows.insert(3, {"image": "gone.png", "caption": "gone."})
    (root / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    embed(EmbedConfig(source=str(root / "d.jsonl"), out=str(root / "store"), clip_model=str(clip_dir), shard_size=4,
                      workers=0))  # fmt: skip
    return root / "d.jsonl", root / "store"


def test_a_store_is_captioned_from_its_vectors_without_image_io(tmp_path, varied_model_dir, source_and_store,
                                                                monkeypatch):  # fmt: skip
    _, store_path = source_and_store
    store = EmbeddingStore(store_path)
    captioner = Captioner.from_pretrained(varied_model_dir)
    vectors = torch.from_numpy(store.image_embeddings())
    expected = captioner.caption_embeddings(vectors, max_new_tokens=TOKENS)

    def no_images(*args, **kwargs):
        raise AssertionError("a store is captioned without images or an image encoder")

    monkeypatch.setattr("clipcap.encoder.ImageEncoder.from_pretrained", no_images)
    monkeypatch.setattr("clipcap.data.loading.open_record_image", no_images)
    result = run_job(store_path, tmp_path / "out", varied_model_dir, max_new_tokens=TOKENS, shard_size=3)
    rows = shard_rows(tmp_path / "out")
    assert [r["caption"] for r in rows] == expected
    assert [r["key"] for r in rows] == store.keys and [r["image"] for r in rows] == store.image_paths
    # the store's own metadata columns come along as stored (its captions renamed: `caption` is ours)
    columns = ["key", "image", "caption", "split", "source_captions", "source_caption", "extra"]
    assert result.info["columns"] == columns
    assert rows[0]["source_captions"] == ["number 0."] and json.loads(rows[0]["extra"]) == {"width": 40}
    # streamed
    streamed = list(caption_stream(CaptionJobConfig(inputs=[str(store_path)], model=str(varied_model_dir),
                                                    max_new_tokens=TOKENS, batch_size=3)))  # fmt: skip
    assert [(c.key, c.captions) for c in streamed] == [(k, [c]) for k, c in zip(store.keys, expected, strict=True)]


def _third_party_store(path: Path, vectors: np.ndarray, caption: bool, per_shard: int = 3) -> Path:
    """The layout clip-retrieval writes: img_emb/img_emb_{i}.npy float16 + metadata/metadata_{i}.parquet, nothing
    else (a string `caption` column, or none)."""
    (path / "img_emb").mkdir(parents=True)
    (path / "metadata").mkdir()
    for i, start in enumerate(range(0, len(vectors), per_shard)):
        chunk = vectors[start : start + per_shard]
        np.save(path / "img_emb" / f"img_emb_{i}.npy", chunk.astype(np.float16))
        columns = {"url": [f"http://x/{start + j}.jpg" for j in range(len(chunk))]}
        if caption:
            columns["caption"] = [f"alt text {start + j}" for j in range(len(chunk))]
        columns["similarity"] = [0.5] * len(chunk)
        pq.write_table(pa.table(columns), path / "metadata" / f"metadata_{i}.parquet")
    return path


def test_captions_from_a_store_equal_captions_from_its_images(trained, tmp_path, clip_dir, capsys):  # noqa: F811
    """The model is trained to say one caption per colour, so its captions are stable under the float16 rounding a
    store applies; the image path, our store and a clip-retrieval-layout store of the same vectors agree."""
    model_dir, _ = trained
    rng = np.random.default_rng(0)
    colours = [(255, 0, 0), (0, 0, 255), (0, 255, 0)]
    images = tmp_path / "images"
    images.mkdir()
    for i in range(12):  # each colour 4 times, a few levels apart: distinct vectors, one caption per colour
        colour = np.clip(np.array(colours[i % 3]) + rng.integers(-3, 4, 3), 0, 255).astype(np.uint8)
        Image.fromarray(np.tile(colour, (32, 32, 1))).save(images / f"{i:02d}.png")
    said = [s for _, s, _ in TRAINED.values()]
    common = ["--model", str(model_dir), "--max-new-tokens", "30", "--batch-size", "5", "--quiet"]

    assert main(["caption", str(images), *common, "--out", str(tmp_path / "from-images")]) == 0
    from_images = shard_rows(tmp_path / "from-images")
    assert [r["caption"] for r in from_images] == [said[i % 3] for i in range(12)]

    rows = [{"image": f"{i:02d}.png", "caption": "a colour."} for i in range(12)]
    (images / "list.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    embed(EmbedConfig(source=str(images / "list.jsonl"), out=str(tmp_path / "store"), clip_model=str(clip_dir),
                      workers=0, shard_size=5))  # fmt: skip
    assert main(["caption", str(tmp_path / "store"), *common, "--out", str(tmp_path / "from-store")]) == 0
    from_store = shard_rows(tmp_path / "from-store")
    assert [r["caption"] for r in from_store] == [r["caption"] for r in from_images]

    # A third-party store of the same vectors (no info.json, no encoder recorded): accepted for its size, with a
    # warning; with a string caption column and without one.
    vectors = EmbeddingStore(tmp_path / "store").image_embeddings()
    capsys.readouterr()
    for caption in (True, False):
        store = _third_party_store(tmp_path / f"laion-{caption}", vectors, caption)
        out = tmp_path / f"out-{caption}"
        assert main(["caption", str(store), *common, "--out", str(out)]) == 0
        assert f"{store} records no encoder: its 16-d embeddings are taken to come from" in capsys.readouterr().err
        third = shard_rows(out)
        assert [r["caption"] for r in third] == [r["caption"] for r in from_images]
        assert [r["image"] for r in third] == [f"http://x/{i}.jpg" for i in range(12)]
        assert [r["key"] for r in third] == [str(i) for i in range(12)]  # no key column: the row number
        assert json.loads((out / "info.json").read_text())["columns"] == [
            "key", "image", "caption", *(["source_caption"] if caption else []), "similarity"
        ]  # fmt: skip
        assert third[0].get("source_caption", "alt text 0") == "alt text 0"


# -- resuming and ranks ----------------------------------------------------------------------------------------------
def test_a_rerun_redoes_only_missing_shards(tmp_path, varied_model_dir, source_and_store):
    source, _ = source_and_store
    out = tmp_path / "out"
    first = run_job(source, out, varied_model_dir, max_new_tokens=TOKENS, shard_size=2).info
    rows = shard_rows(out)
    parts = sorted((out / "captions").iterdir())
    stamps = {p.name: p.stat().st_mtime_ns for p in parts}
    parts[2].unlink()  # as if killed before its shard was renamed into place, leaving its temporary
    (out / "captions" / f".{parts[2].name}.tmp999-abcd").write_bytes(b"half")
    (out / "info.json").unlink()
    again = run_job(source, out, varied_model_dir, max_new_tokens=TOKENS, shard_size=2).info
    assert again == first and shard_rows(out) == rows
    assert {p.name: p.stat().st_mtime_ns for p in parts if p != parts[2]} == {
        n: t for n, t in stamps.items() if n != parts[2].name
    }
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


def test_ranks_take_every_world_th_shard_and_the_last_one_finishes(tmp_path, varied_model_dir, source_and_store,
                                                                   monkeypatch):  # fmt: skip
    source, store = source_and_store
    for name, data in (("source", source), ("store", store)):
        single = run_job(data, tmp_path / f"one-{name}", varied_model_dir, max_new_tokens=TOKENS, shard_size=2)
        out = tmp_path / f"two-{name}"
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", "1")
        result = run_job(data, out, varied_model_dir, max_new_tokens=TOKENS, shard_size=2)
        assert result.info is None and not (out / "info.json").exists()
        assert sorted(p.name for p in (out / "captions").iterdir()) == ["part-00001.parquet", "part-00003.parquet"]
        monkeypatch.setenv("RANK", "0")
        result = run_job(data, out, varied_model_dir, max_new_tokens=TOKENS, shard_size=2)
        monkeypatch.delenv("RANK")
        monkeypatch.delenv("WORLD_SIZE")
        assert result.info == single.info
        assert shard_rows(out) == shard_rows(tmp_path / f"one-{name}")
        assert (out / "skipped.jsonl").read_text() == (tmp_path / f"one-{name}" / "skipped.jsonl").read_text()


# Installed as sitecustomize in the ranks of a torchrun job: rank HANG_RANK writes its second captions shard to its
# temporary file and then hangs, to be SIGKILLed there (the moment a kill leaves the most behind).
HANG = textwrap.dedent(
    """
    import os, time
    from pathlib import Path

    if "HANG_FLAG" in os.environ and os.environ.get("RANK") == os.environ["HANG_RANK"]:
        import clipcap.data.store as store

        rename, written = store.replace_atomically, []

        def hang_on_the_second_shard(path, write):
            if path.parent.name == "captions":
                written.append(path)
                if len(written) == 2:
                    def write_then_hang(tmp):
                        write(tmp)
                        Path(os.environ["HANG_FLAG"]).write_text(str(os.getpid()))
                        time.sleep(600)

                    return rename(path, write_then_hang)
            return rename(path, write)

        store.replace_atomically = hang_on_the_second_shard
    """
)


@pytest.fixture(scope="module")
def hundreds(tmp_path_factory, clip_dir):
    """A JSONL source of 202 entries (2 of them bad items) and the store `embed` made of it."""
    root = tmp_path_factory.mktemp("hundreds")
    rows = []
    for i in range(200):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / f"{i}.png")
        rows.append(json.dumps({"image": f"{i}.png", "caption": f"image {i}.", "n": i}))
    rows[50:50] = [json.dumps({"image": "gone.png", "caption": "x."}), "{not json"]
    (root / "d.jsonl").write_text("\n".join(rows) + "\n")
    embed(EmbedConfig(source=str(root / "d.jsonl"), out=str(root / "store"), clip_model=str(clip_dir), shard_size=100,
                      workers=0))  # fmt: skip
    return {"source": root / "d.jsonl", "store": root / "store"}


def test_two_ranks_killed_and_rerun_equal_one_process(tmp_path, hundreds, varied_model_dir):
    """A source and a store, each captioned by 2 ranks under torchrun (CPU); in each job one rank is SIGKILLed
    mid-run and torchrun stops the other; the same command rerun finishes: every item exactly once, and the output
    equals a single process's. The two jobs run side by side, so the test waits for the slow starts only twice."""
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(HANG)
    options = dict(max_new_tokens=TOKENS, shard_size=25, batch_size=25, workers=1)
    flags = [a for k, v in options.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO / 'src'}"}
    out = {kind: tmp_path / f"out-{kind}" for kind in hundreds}
    flag = {kind: tmp_path / f"flag-{kind}" for kind in hundreds}

    def start(kind: str, hang: bool) -> subprocess.Popen:
        args = ["caption", str(hundreds[kind]), "--model", str(varied_model_dir), *flags, "--quiet", "--out"]
        hooked = {"PYTHONPATH": f"{tmp_path / 'hook'}:{REPO / 'src'}", "HANG_RANK": "1", "HANG_FLAG": str(flag[kind])}
        return subprocess.Popen([*torchrun, "-m", "clipcap.cli", *args, str(out[kind])],
                                env={**env, **(hooked if hang else {})}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip

    procs = {kind: start(kind, hang=True) for kind in hundreds}
    try:
        deadline = time.monotonic() + 300
        for kind, proc in procs.items():
            while not flag[kind].exists() or not flag[kind].read_text():
                assert proc.poll() is None, proc.communicate()[1][-3000:]
                assert time.monotonic() < deadline, "rank 1 never reached its second shard"
                time.sleep(0.05)
            os.kill(int(flag[kind].read_text()), signal.SIGKILL)
        for proc in procs.values():
            proc.communicate(timeout=120)
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()
    for kind, proc in procs.items():
        assert proc.returncode != 0  # torchrun reports the killed rank
        done = sorted(p.name for p in (out[kind] / "captions").glob("part-*"))
        assert 1 <= len(done) < 9 and not (out[kind] / "info.json").exists()
        assert [p for p in (out[kind] / "captions").iterdir() if ".tmp" in p.name]  # the killed write's temporary

    reruns = {kind: start(kind, hang=False) for kind in hundreds}  # the same commands
    for rerun in reruns.values():
        _, err = rerun.communicate(timeout=600)
        assert rerun.returncode == 0, err[-3000:]
    for kind, data in hundreds.items():
        single = run_job(data, tmp_path / f"single-{kind}", varied_model_dir, **options)
        rows, expected = shard_rows(out[kind]), shard_rows(single.out)
        keys = [r["key"] for r in rows]
        assert len(keys) == len(set(keys)) == 200  # every good item exactly once
        assert [(r["key"], r["caption"]) for r in rows] == [(r["key"], r["caption"]) for r in expected]
        assert rows == expected  # metadata columns too
        for name in ("info.json", "skipped.jsonl", "job.json"):
            assert (out[kind] / name).read_text() == (single.out / name).read_text()
        assert not [p for p in out[kind].rglob("*") if ".tmp" in p.name]
        assert single.info["num_skipped"] == (2 if kind == "source" else 0)
