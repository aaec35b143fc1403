"""`clipcap embed`: stored vectors equal the encoder's, bad items of every class skipped and reported, resumable after
a SIGKILL, shardable over ranks, and text-only stores for text-only training."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from clipcap.cli import main
from clipcap.data.sources import open_record_image, read_source
from clipcap.data.store import EmbeddingStore
from clipcap.embed import EmbedConfig, embed
from clipcap.encoder import ImageEncoder
from clipcap.errors import ClipCapError
from tests.test_sources import add_to_tar, bad_image_files, image_bytes, karpathy_json, truncated_jpeg

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def encoder(clip_dir):
    return ImageEncoder.from_pretrained(clip_dir)


@pytest.fixture()
def dataset(tmp_path):
    """A Karpathy file of 9 good images plus one record per class of bad item."""
    src = karpathy_json(tmp_path / "dataset_coco.json", tmp_path, n=9)
    obj = json.loads(src.read_text())
    bad = bad_image_files(tmp_path / "bad")
    for n, (cls, path) in enumerate(bad.items()):
        obj["images"].append(
            {
                "filename": str(path.relative_to(tmp_path)),
                "cocoid": 900 + n,
                "split": "train",
                "sentences": [{"raw": f"bad {cls}."}],
            }
        )
    good_path = str(Path("val2014") / "COCO_val2014_000000000000.jpg")
    obj["images"] += [
        {"filename": good_path, "cocoid": 950, "split": "train", "sentences": [{"raw": "  "}, {"raw": ""}]},
        {"filename": good_path, "cocoid": 951, "split": "train", "sentences": []},
        {"filename": good_path, "cocoid": 100, "split": "train", "sentences": [{"raw": "same key again."}]},
    ]
    obj["images"][2]["sentences"].append({"raw": "   "})  # one empty caption on an otherwise good image
    src.write_text(json.dumps(obj))
    return src


EXPECTED_SKIPS = {
    "900": "empty file",
    "901": "not an image",
    "902": "truncated or corrupt image",
    "903": "too many pixels",
    "904": "file not found",
    "950": "empty caption",
    "951": "no captions",
    "100": "duplicate key",
    "102": "empty caption",  # the dropped caption; the image itself is kept
}


def run_embed(source, out, clip_model, **options) -> Path:
    """The library call, quietly: embed `source` into `out` with `clip_model`."""
    cfg = EmbedConfig(source=str(source), out=str(out), clip_model=str(clip_model), **options)
    return embed(cfg).out


def read_store(path: Path):
    store = EmbeddingStore(path)
    return store, store.keys, store.image_embeddings()


def test_embed_equals_the_encoder_and_reports_every_bad_item(tmp_path, dataset, clip_dir, encoder, capsys):
    out = tmp_path / "store"
    argv = ["embed", str(dataset), "--out", str(out), "--clip-model", str(clip_dir), "--batch-size", "4"]
    assert main([*argv, "--workers", "2", "--shard-size", "5"]) == 0
    store, keys, vectors = read_store(out)
    good = [r for r in read_source(dataset)][:9]
    assert keys == [r.key for r in good]
    expected = encoder.encode([r.image for r in good]).numpy()
    np.testing.assert_allclose(vectors, expected, rtol=2e-3, atol=2e-4)  # float16 storage
    assert store.image_captions(2) == ["image 2 caption 0.", "image 2 caption 1."]
    assert store.splits == ["train", "val", "test", "train", "novel", "train", "val", "test", "train"]
    assert len(store) == 18
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert {s["key"]: s["reason"] for s in skipped}.keys() == EXPECTED_SKIPS.keys()
    for s in skipped:
        assert s["reason"].startswith(EXPECTED_SKIPS[s["key"]]), s
    info = json.loads((out / "info.json").read_text())
    assert info["num_images"] == 9 and info["skipped"] == 9 and info["clip_dim"] == encoder.dim
    assert info["clip_model"] == str(clip_dir) and info["normalized"] is False and info["format"] == "karpathy"
    assert info["num_shards"] == 4  # 17 records in shards of 5
    err = capsys.readouterr().err
    assert "clipcap embed: 9 images (18 captions) in 4 shards" in err and "skipped 9" in err


def test_split_normalize_and_resume_when_complete(tmp_path, dataset, clip_dir, encoder):
    out = run_embed(dataset, tmp_path / "s", clip_dir, split="val", normalize=True, workers=0)
    store = EmbeddingStore(out)
    assert store.keys == ["101", "106"] and store.normalized
    np.testing.assert_allclose(np.linalg.norm(store.image_embeddings(), axis=1), 1.0, atol=2e-3)
    before = {p: p.stat().st_mtime_ns for p in (out / "img_emb").iterdir()}
    run_embed(dataset, out, clip_dir, split="val", normalize=True, workers=0)
    assert {p: p.stat().st_mtime_ns for p in (out / "img_emb").iterdir()} == before  # nothing recomputed
    with pytest.raises(
        ClipCapError,
        match=r"different `clipcap embed` command.*differs in: normalize true -> false, num_records 2 -> 17, "
        r"records_sha256 \w{12} -> \w{12}, split \"val\" -> null\)",
    ):
        run_embed(dataset, out, clip_dir, workers=0)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("y")
    with pytest.raises(ClipCapError, match="is not empty"):
        run_embed(dataset, tmp_path / "full", clip_dir)


def test_webdataset_with_bad_members(tmp_path, clip_dir, encoder):
    path = tmp_path / "shard-00000.tar"
    with tarfile.open(path, "w") as tar:
        for k in range(3):
            add_to_tar(tar, f"{k:04d}.jpg", image_bytes(k, "JPEG"))
            add_to_tar(tar, f"{k:04d}.txt", f"good {k}.".encode())
        add_to_tar(tar, "0003.jpg", truncated_jpeg(3))
        add_to_tar(tar, "0003.txt", b"cut.")
        add_to_tar(tar, "0004.txt", b"caption without image.")
        add_to_tar(tar, "0005.jpg", image_bytes(5, "JPEG"))  # image without caption
    out = run_embed(path, tmp_path / "store", clip_dir, workers=0)
    store, keys, vectors = read_store(out)
    assert keys == ["0000", "0001", "0002"] and [store[i][1] for i in range(3)] == ["good 0.", "good 1.", "good 2."]
    expected = encoder.encode([open_record_image(f"{path}::{k:04d}.jpg") for k in range(3)]).numpy()
    np.testing.assert_allclose(vectors, expected, rtol=2e-3, atol=2e-4)
    reasons = {s["key"]: s["reason"] for s in map(json.loads, (out / "skipped.jsonl").read_text().splitlines())}
    assert reasons.keys() == {"0003", "0004", "0005"}
    assert reasons["0003"].startswith("truncated") and reasons["0004"] == "no image"
    assert reasons["0005"] == "no captions"


def test_text_only_store(tmp_path, clip_dir, encoder):
    tsv = tmp_path / "Validation_GCC-1.1.0-Validation.tsv"
    captions = ["a red circle.", "a dog on a beach.", "", "two people riding bikes."]
    tsv.write_text("".join(f"{c}\thttp://x/{n}.jpg\n" for n, c in enumerate(captions)))
    out = run_embed(tsv, tmp_path / "text", clip_dir, text_only=True, batch_size=2)
    store = EmbeddingStore(out)
    assert store.modality == "text" and (out / "text_emb" / "text_emb_0.npy").is_file()
    assert store.keys == ["row0#0", "row1#0", "row3#0"]
    good = [captions[0], captions[1], captions[3]]
    assert [store[i][1] for i in range(len(store))] == good
    expected = np.concatenate([encoder.encode_text(good[:2]).numpy(), encoder.encode_text(good[2:]).numpy()])
    np.testing.assert_allclose(store.image_embeddings(), expected, rtol=2e-3, atol=2e-4)
    assert store.image_extra(0)["image_key"] == "row0" and store.splits == ["val"] * 3
    assert json.loads((out / "skipped.jsonl").read_text())["reason"].startswith("empty caption")


def test_ranks_shard_the_work_and_the_last_one_finalizes(tmp_path, dataset, clip_dir, monkeypatch):
    reference = run_embed(dataset, tmp_path / "one", clip_dir, shard_size=3, workers=0)
    out = tmp_path / "two"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    run_embed(dataset, out, clip_dir, shard_size=3, workers=0)
    assert sorted(p.name for p in (out / "img_emb").iterdir()) == ["img_emb_1.npy", "img_emb_3.npy", "img_emb_5.npy"]
    assert not (out / "info.json").exists()
    monkeypatch.setenv("RANK", "0")
    run_embed(dataset, out, clip_dir, shard_size=3, workers=0)
    _assert_same_store(out, reference)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ClipCapError, match="RANK=2 is outside WORLD_SIZE=2"):
        run_embed(dataset, out, clip_dir, shard_size=3, workers=0)


def _assert_same_store(a: Path, b: Path) -> None:
    sa, ka, va = read_store(a)
    sb, kb, vb = read_store(b)
    assert ka == kb and len(set(ka)) == len(ka)
    np.testing.assert_array_equal(va, vb)
    assert [sa[i][1] for i in range(len(sa))] == [sb[i][1] for i in range(len(sb))]
    assert (a / "skipped.jsonl").read_text() == (b / "skipped.jsonl").read_text()
    info_a, info_b = (json.loads((p / "info.json").read_text()) for p in (a, b))
    assert {k: v for k, v in info_a.items() if k != "source"} == {k: v for k, v in info_b.items() if k != "source"}


# Runs `clipcap embed` with the rename of the 2nd shard's embedding file hanging after its temp file is written:
# the moment a kill does the most damage (metadata of shard 1 renamed, embeddings half-way).
HANGING_EMBED = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import clipcap.data.store as store

    rename = store.replace_atomically

    def hang_on_shard_1(path, write):
        if path.name != "img_emb_1.npy":
            return rename(path, write)

        def write_then_hang(tmp):
            write(tmp)
            Path(sys.argv[1]).write_text("killable")
            time.sleep(300)

        return rename(path, write_then_hang)

    store.replace_atomically = hang_on_shard_1
    from clipcap.cli import main
    sys.exit(main(sys.argv[2:]))
    """
)


def test_resumes_after_sigkill(tmp_path, dataset, clip_dir):
    out, flag = tmp_path / "killed", tmp_path / "flag"
    args = ["embed", str(dataset), "--out", str(out), "--clip-model", str(clip_dir), "--shard-size", "3"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-c", HANGING_EMBED, str(flag), *args, "--workers", "1", "--quiet"], env=env, cwd=tmp_path
    )
    try:
        deadline = time.monotonic() + 120
        while not flag.exists():
            assert proc.poll() is None, "embed exited before reaching the kill point"
            assert time.monotonic() < deadline, "embed never reached the kill point"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert (out / "img_emb" / "img_emb_0.npy").is_file() and (out / "metadata" / "metadata_1.parquet").is_file()
    assert not (out / "img_emb" / "img_emb_1.npy").exists() and list((out / "img_emb").glob(".*tmp*"))
    assert not (out / "info.json").exists()
    with pytest.raises(ClipCapError, match="unfinished: rerun the same `clipcap embed` command"):
        EmbeddingStore(out)

    assert main([*args, "--workers", "0", "--quiet"]) == 0  # the same command resumes
    assert not list(out.rglob(".*tmp*"))
    reference = run_embed(dataset, tmp_path / "uninterrupted", clip_dir, shard_size=3, workers=0)
    _assert_same_store(out, reference)


def test_cli_help_and_errors(tmp_path, capsys, clip_dir):
    with pytest.raises(SystemExit):
        main(["embed", "--help"])
    help_text = capsys.readouterr().out
    for flag in (
        "--out",
        "--clip-model",
        "--format",
        "--images",
        "--split",
        "--batch-size",
        "--workers",
        "--text-only",
    ):
        assert flag in help_text
    assert (
        main(["embed", str(tmp_path / "missing.json"), "--out", str(tmp_path / "o"), "--clip-model", str(clip_dir)])
        == 2
    )
    assert "clipcap embed: error: source not found" in capsys.readouterr().err


def _claim_together(barrier, out: str, job: dict, results) -> None:
    from clipcap.jobs import claim_job

    barrier.wait()
    try:
        claim_job(Path(out), job, "clipcap embed", "store")
        results.put("ok")
    except ClipCapError as e:
        results.put(str(e))


def test_ranks_starting_together_on_a_fresh_out_agree_on_the_job(tmp_path):
    """Several ranks released at the same instant onto a fresh --out: all start the store (one writes job.json, the
    others find it equal); a rank with another command is refused."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")  # the children only touch files: no need to import torch again
    job = {"source": "s.json", "shard_size": 3}
    for attempt, jobs in enumerate(([job] * 4, [job] * 3 + [{**job, "shard_size": 4}])):
        out = tmp_path / f"store{attempt}"
        barrier, results = ctx.Barrier(len(jobs)), ctx.Queue()
        procs = [ctx.Process(target=_claim_together, args=(barrier, str(out), j, results)) for j in jobs]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        outcomes = sorted(results.get(timeout=5) for _ in jobs)
        assert json.loads((out / "job.json").read_text()) in jobs
        assert not [p for p in out.iterdir() if p.name != "job.json"]  # no temporary left behind
        if attempt == 0:
            assert outcomes == ["ok"] * 4
        else:
            refused = [o for o in outcomes if o != "ok"]
            assert len(refused) >= 1 and all("different `clipcap embed` command" in o for o in refused)
