"""`clipcap train` on hostile stores, outputs and checkpoints, through the real command: one line each, and a damaged
newest checkpoint is passed over for the newest intact one (and named)."""

from __future__ import annotations

import json

import pytest

from tests import tiny
from tests.hostile import clipcap, no_traceback, one_line_error

SMALL = ["--prefix-length", 2, "--batch-size", 4, "--warmup-steps", 0, "--num-samples", 0, "--lr", "1e-3"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tiny.make_store(tmp_path_factory.mktemp("store") / "s")


def train(data, out, lm_dir, *extra):
    return clipcap("train", "--data", data, "--out", out, "--lm", lm_dir, "--quiet", *SMALL, *extra)


@pytest.mark.parametrize(
    "damage, fragments",
    [
        ("a-plain-dir", ["is not an embedding store"]),
        ("a-file", ["embedding store not found"]),
        ("info-not-json", ["info.json is damaged"]),
        ("info-bad-shards", ["info.json is damaged (num_shards"]),
        ("npy-truncated", ["img_emb_1.npy is not a readable .npy file"]),
        ("npy-of-text", ["img_emb_0.npy"]),
        ("parquet-damaged", ["metadata_2.parquet is damaged"]),
        ("parquet-missing", ["is incomplete: ", "metadata_0.parquet is missing"]),
    ],
)
def test_a_damaged_store_is_one_line(damage, fragments, tmp_path, lm_dir):
    data = tmp_path / "s"
    if damage == "a-plain-dir":
        data.mkdir()
        (data / "x.txt").write_text("x")
    elif damage == "a-file":
        data.write_text("x")
    else:
        tiny.make_store(data)
        if damage == "info-not-json":
            (data / "info.json").write_text("{oops")
        elif damage == "info-bad-shards":
            info = json.loads((data / "info.json").read_text())
            (data / "info.json").write_text(json.dumps({**info, "num_shards": "three"}))
        elif damage == "npy-truncated":
            f = data / "img_emb" / "img_emb_1.npy"
            f.write_bytes(f.read_bytes()[:100])
        elif damage == "npy-of-text":
            (data / "img_emb" / "img_emb_0.npy").write_text("not numpy at all")
        elif damage == "parquet-damaged":
            f = data / "metadata" / "metadata_2.parquet"
            f.write_bytes(b"PAR1" + f.read_bytes()[20:])
        else:
            (data / "metadata" / "metadata_0.parquet").unlink()
    one_line_error(train(data, tmp_path / "run", lm_dir), "clipcap train: error:", *fragments)


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--lm", "/no/such/lm"], ["/no/such/lm"]),
        (["--epochs", "0"], ["--epochs must be at least 1, got 0"]),
        (["--mapping", "lstm"], ["argument --mapping: invalid choice"]),
        (["--tune-lm", "--frozen-lm"], ["not allowed with argument"]),
        (["--lm-text", "FILE", "--lm-text-weight", "1"], ["cannot read the LM text file"]),
        (["--val-split", "nosuch"], ["has no images in split 'nosuch'"]),
        (["--prefix-length", "500"], ["leaves no room in the LM's 128 positions"]),
        (["--mixed-precision", "fp8"], ["argument --mixed-precision: invalid choice"]),
    ],
)
def test_bad_options_are_one_line(args, fragments, store, tmp_path, lm_dir):
    args = [str(tmp_path / "lm.txt") if a == "FILE" else a for a in args]
    (tmp_path / "lm.txt").write_bytes(b"\xff\xfe not utf-8")
    one_line_error(train(store, tmp_path / "run", lm_dir, *args), "clipcap train: error:", *fragments)


def test_an_unusable_output_is_one_line(store, tmp_path, lm_dir):
    (tmp_path / "file").write_text("x")
    one_line_error(train(store, tmp_path / "file", lm_dir), "is a file, not a directory")
    assert train(store, tmp_path / "run", lm_dir, "--epochs", 1).returncode == 0
    one_line_error(train(store, tmp_path / "run", lm_dir, "--epochs", 1), "already holds a training run")


def test_resume_passes_over_a_damaged_newest_checkpoint(store, tmp_path, lm_dir):
    run = tmp_path / "run"
    keep = ["--save-every", 1, "--keep-checkpoints", 10]
    assert train(store, run, lm_dir, "--epochs", 2, *keep).returncode == 0
    checkpoints = sorted((run / "checkpoints").iterdir())
    newest, intact = checkpoints[-1], checkpoints[-2]
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])  # a save cut short on a full disk, say
    done = clipcap("train", "--data", store, "--out", run, "--lm", lm_dir, *SMALL, "--epochs", 3, *keep, "--resume")
    no_traceback(done)
    assert done.returncode == 0, done.stderr
    assert f"skipped damaged checkpoint {newest}: model.safetensors is damaged" in done.stderr
    assert f"resumed from {intact} " in done.stderr
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # the steps after the intact checkpoint were redone once, not logged twice
