"""`clipcap embed` on hostile sources and outputs, through the real command: a bad item is skipped and listed (its shard
and the rest of the store are written, and a rerun finishes), a bad whole input is one line, never a traceback."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
from PIL import Image

from clipcap.data.store import EmbeddingStore
from tests.hostile import clipcap, leftovers, no_traceback, one_line_error


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    for i in range(4):
        Image.new("RGB", (32, 32), (60 * i, 20, 200 - 40 * i)).save(root / f"{i}.png")
    return root


def embed(source, out, clip_dir, *extra, cwd=None):
    return clipcap("embed", source, "--out", out, "--clip-model", clip_dir, "--workers", 0, "--quiet", *extra, cwd=cwd)


def skipped(store) -> dict[str, str]:
    return {s["key"]: s["reason"] for s in map(json.loads, (store / "skipped.jsonl").read_text().splitlines())}


def test_mis_encoded_and_malformed_entries_are_skipped_and_the_rest_is_stored(tmp_path, images, clip_dir):
    """A caption with a lone surrogate used to fail its whole shard, on every rerun."""
    rows = [
        {"image": "0.png", "caption": "a good caption."},
        {"image": "1.png", "caption": "bad \ud800 surrogate."},  # json.dumps keeps it as a \\ud800 escape
        {"image": "2.png", "caption": 42},
        {"image": ["2.png"], "caption": "an image that is a list."},
        {"image": "3.png", "caption": ["one.", "two."], "meta": {"deep": [1, {"x": None}]}},
    ]
    lines = [json.dumps(r) for r in rows] + ["{not json", "[1, 2]", ""]
    source = images / "data.jsonl"
    source.write_bytes("\n".join(lines).encode() + b"\n\xff\xfe not utf-8 \n")
    store = tmp_path / "store"
    done = embed(source, store, clip_dir, "--shard-size", 2)
    no_traceback(done)
    assert done.returncode == 0, done.stderr
    assert EmbeddingStore(store).keys == ["0.png", "3.png"]
    reasons = skipped(store)
    assert reasons["1.png"].startswith("caption is not valid Unicode") and "captions must be text" in reasons["2.png"]
    assert any("line 6 is not valid JSON" in r for r in reasons.values())
    assert any("line 7 is not a JSON object" in r for r in reasons.values())
    assert any("line 9 is not UTF-8" in r for r in reasons.values())
    assert any("must be non-empty text" in r for r in reasons.values())
    again = embed(source, store, clip_dir, "--shard-size", 2)  # a rerun of the same command finds it complete
    assert again.returncode == 0 and not leftovers(store)


@pytest.mark.parametrize(
    "name, data, fragments",
    [
        ("missing.json", None, ["source not found"]),
        ("latin1.json", '{"images": [{"filename": "é.png"}]}'.encode("latin-1"), ["is not UTF-8 text"]),
        ("list.json", b"[1, 2, 3]", ["unrecognised JSON"]),
        ("truncated.json", b'{"images": [{"filename": ', ["is not valid JSON (line 1"]),
        ("deep.json", b"[" * 100_000 + b"]" * 100_000, ["is nested too deeply"]),
        ("data.bin", b"\x00\x01", ["cannot tell the format"]),
        ("broken.parquet", b"PAR1 not really", ["is not a readable parquet file"]),
        ("empty.csv", b"", ["is empty (no header row)"]),
        ("nul.csv", b"image,caption\x00\n", ["the header line holds a NUL byte"]),
    ],
)
def test_a_bad_whole_source_is_one_line(name, data, fragments, tmp_path, clip_dir):
    source = tmp_path / name
    if data is not None:
        source.write_bytes(data)
    done = embed(source, tmp_path / "store", clip_dir)
    one_line_error(done, "clipcap embed: error:", *fragments)
    assert not (tmp_path / "store" / "info.json").exists()


def test_a_damaged_webdataset_shard_keeps_what_precedes_the_damage(tmp_path, images, clip_dir):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(4):
            for ext, data in ((".png", (images / f"{i}.png").read_bytes()), (".txt", f"image {i}.".encode())):
                info = tarfile.TarInfo(f"{i:04d}{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    whole = buf.getvalue()
    (tmp_path / "shard.tar").write_bytes(whole[: len(whole) * 3 // 4])  # cut inside the last members
    done = embed(tmp_path / "shard.tar", tmp_path / "store", clip_dir)
    no_traceback(done)
    assert done.returncode == 0, done.stderr
    kept = EmbeddingStore(tmp_path / "store").keys
    assert kept and set(kept) < {f"{i:04d}" for i in range(4)}
    assert any("shard damaged after" in r for r in skipped(tmp_path / "store").values())


@pytest.mark.parametrize(
    "kind, fragments",
    [
        ("a-file", ["is a file, not a directory"]),
        ("foreign-dir", ["is not empty (", "clipcap never replaces files it did not write"]),
        ("under-a-file", ["cannot create", "a part of it is a file"]),
        ("other-job", ["holds a store from a different `clipcap embed` command (differs in: normalize"]),
    ],
)
def test_an_unusable_output_is_one_line(kind, fragments, tmp_path, images, clip_dir):
    source = images / "good.jsonl"
    source.write_text("".join(json.dumps({"image": f"{i}.png", "caption": f"c {i}."}) + "\n" for i in range(4)))
    out = tmp_path / "out"
    if kind == "a-file":
        out.write_text("x")
    elif kind == "foreign-dir":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif kind == "under-a-file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "store"
    else:
        assert embed(source, out, clip_dir).returncode == 0
    done = embed(source, out, clip_dir, "--normalize")
    one_line_error(done, "clipcap embed: error:", *fragments)


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--clip-model", "/no/such/clip"], ["/no/such/clip"]),
        (["--device", "cuda:3"], ["device 'cuda:3' is not available here"]),
        (["--batch-size", "0"], ["--batch-size must be at least 1"]),
        (["--workers", "-1"], ["--workers must be at least 0"]),
        (["--format", "tfrecord"], ["argument --format: invalid choice"]),
        (["--split", "nosuch"], ["no records in split 'nosuch'"]),
        (["--image-column", "nope"], ["has no image column 'nope'"]),
    ],
)
def test_bad_options_are_one_line(args, fragments, tmp_path, images, clip_dir):
    source = images / "ok.jsonl"
    source.write_text(json.dumps({"image": "0.png", "caption": "c."}) + "\n")
    done = clipcap("embed", source, "--out", tmp_path / "s", "--quiet", *(["--clip-model", clip_dir] + args))
    one_line_error(done, "clipcap embed: error:", *fragments)
