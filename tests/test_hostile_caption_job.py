"""`clipcap caption` over embedding stores and into output dirs, on hostile input, through the real CLI (one
interpreter for every case): a store from another encoder or of another size, damaged store shards, damaged output
shards and an output dir from another job each end in one line and exit status 2, never a traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from clipcap.caption_job import CaptionJobConfig, caption_job
from clipcap.embed import EmbedConfig, embed
from tests import tiny
from tests.cli_batch import assert_one_line_error, run_cli
from tests.test_sources import write_image

TOKENS = ["--max-new-tokens", "4", "--quiet"]


def _third_party(path: Path, dim: int) -> Path:
    """clip-retrieval's layout and nothing else, with `dim`-d vectors."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (path / "img_emb").mkdir(parents=True)
    (path / "metadata").mkdir()
    np.save(path / "img_emb" / "img_emb_0.npy", np.ones((3, dim), np.float16))
    pq.write_table(pa.table({"url": ["a", "b", "c"]}), path / "metadata" / "metadata_0.parquet")
    return path


def _damaged(store: Path, path: Path, name: str, data: bytes | None) -> Path:
    """A copy of `store` with file `name` replaced by `data` (cut to half its size when None)."""
    shutil.copytree(store, path)
    target = path / name
    target.write_bytes(data if data is not None else target.read_bytes()[: target.stat().st_size // 2])
    return path


@pytest.fixture(scope="module")
def cases(tmp_path_factory, clip_dir, tokenizer, varied_model_dir):
    """{case: (argv, fragments of its one-line error)}, run together in one interpreter."""
    root = tmp_path_factory.mktemp("hostile-caption-job")
    for i in range(4):
        write_image(root / f"{i}.png", seed=i)
    (root / "d.jsonl").write_text("".join(json.dumps({"image": f"{i}.png", "caption": "x."}) + "\n" for i in range(4)))
    store = root / "store"
    embed(EmbedConfig(source=str(root / "d.jsonl"), out=str(store), clip_model=str(clip_dir), shard_size=2, workers=0))
    other_clip = tiny.save_clip_dir(root / "other-clip", tiny.tiny_clip(len(tokenizer), seed=7), tokenizer)
    other = root / "other-store"  # the same size of vectors from another encoder
    embed(EmbedConfig(source=str(root / "d.jsonl"), out=str(other), clip_model=str(other_clip), workers=0))

    model = ["--model", str(varied_model_dir)]
    done = root / "done"  # a finished job, then damaged in copies
    caption_job(CaptionJobConfig(inputs=[str(store)], model=str(varied_model_dir), out=str(done), max_new_tokens=4,
                                 shard_size=2))  # fmt: skip
    for name, change in (
        ("cut-shard", lambda d: _cut(d / "captions" / "part-00001.parquet")),
        ("garbage-shard", lambda d: (d / "captions" / "part-00000.parquet").write_bytes(b"PAR1" + b"\x00" * 50)),
        ("lost-skip-list", lambda d: (d / "skipped" / "part-00001.jsonl").unlink()),
        ("bad-job-record", lambda d: (d / "job.json").write_text("{not json")),
    ):
        shutil.copytree(done, root / name)
        change(root / name)
    (root / "foreign").mkdir()
    (root / "foreign" / "notes.txt").write_text("mine")
    (root / "a-file").write_text("x")

    def job(data, out, *extra):
        return ["caption", str(data), *model, "--shard-size", "2", *TOKENS, "--out", str(out), *extra]

    def read(data, *extra):
        return ["caption", str(data), *model, *TOKENS, *extra]

    return {
        "store from another encoder": (
            read(other),
            [f"{other} was embedded with {other_clip}, but the model expects", "the store's encoder as --clip-model"],
        ),
        "store of another size": (
            read(_third_party(root / "wide", 24)),
            ["holds 24-d embeddings but the model expects 16-d ones"],
        ),
        "store shard cut short": (
            read(_damaged(store, root / "cut", "img_emb/img_emb_1.npy", None)),
            ["img_emb_1.npy is not a readable .npy file"],
        ),
        "store shard of garbage": (
            read(_damaged(store, root / "junk", "img_emb/img_emb_0.npy", b"\x93NUMPY garbage")),
            ["img_emb_0.npy is not a readable .npy file"],
        ),
        "store metadata of garbage": (
            read(_damaged(store, root / "meta", "metadata/metadata_1.parquet", b"nope")),
            ["metadata_1.parquet"],
        ),
        "output shard cut short": (job(store, root / "cut-shard"), ["part-00001.parquet is damaged", "delete it and"]),
        "output shard of garbage": (job(store, root / "garbage-shard"), ["part-00000.parquet is damaged"]),
        "output skip list lost": (job(store, root / "lost-skip-list"), ["part-00001.jsonl is missing", "rerun"]),
        "damaged job record": (job(store, root / "bad-job-record"), ["job.json is damaged", "to start over"]),
        "out from another caption job": (
            job(store, done, "--beams", "2"),
            [
                f"{done} holds a caption job from a different `clipcap caption` command",
                "(differs in: decoding.num_beams 1 -> 2)",
            ],
        ),
        "out from another input": (
            job(root / "d.jsonl", done),
            [
                'from a different `clipcap caption` command (differs in: input_format "store" -> "jsonl", inputs [',
                "items_sha256 null -> ",
            ],
        ),
        "out is a store from embed": (
            job(root / "d.jsonl", other),
            [f"{other} holds an embedding store (written by `clipcap embed`), not a caption job output"],
        ),
        "out of someone else's files": (job(store, root / "foreign"), ["is not empty (", "never replaces files"]),
        "out is a file": (job(store, root / "a-file"), ["a-file is a file, not a directory"]),
        "a folder named as a store": (
            read(root, "--input-format", "store"),
            ["is not an embedding store"],
        ),
    }


def _cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_every_hostile_case_is_one_line(cases):
    results = run_cli({name: argv for name, (argv, _) in cases.items()})
    wrong = []
    for name, (_, fragments) in cases.items():
        try:
            line = assert_one_line_error(results[name], "caption")
        except AssertionError as e:
            wrong.append(f"{name}: {e}")
            continue
        wrong += [f"{name}: {fragment!r} not in {line!r}" for fragment in fragments if fragment not in line]
    assert not wrong, "\n".join(wrong)
