"""`clipcap.outputs` on its own: what is refused, what is replaced, what a failed write leaves (property tests over
arbitrary user files, inputs and failures)."""

from __future__ import annotations

import errno
import json
import os
import stat
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clipcap.errors import ClipCapError
from clipcap.outputs import (
    MANIFEST,
    MODEL_DIR,
    PARTIAL,
    STORE,
    check_file,
    check_inputs,
    claim_dir,
    disk_full,
    kind_of,
    read_manifest,
    replace_atomically,
    write_dir,
    write_file,
)

NAMES = st.text(alphabet="abcdefghij._-", min_size=1, max_size=8).filter(lambda n: n not in (".", ".."))
FILES = st.dictionaries(NAMES.filter(lambda n: not n.startswith(".")), st.binary(max_size=64), min_size=1, max_size=6)


def writer(files: dict[str, bytes]):
    def write(stage: Path) -> None:
        for name, data in files.items():
            (stage / name).write_bytes(data)

    return write


def snapshot(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}


@settings(max_examples=40, deadline=None)
@given(user=FILES, first=FILES, second=FILES)
def test_an_overwrite_replaces_only_its_own_files_and_never_the_users(user, first, second):
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        write_dir(out, MODEL_DIR, "clipcap convert", writer(first))
        assert {n: (out / n).read_bytes() for n in first} == first
        for name, data in user.items():  # the user adds files beside the output (not over it)
            if name not in first:
                (out / name).write_bytes(data)
        theirs = {n: d for n, d in user.items() if n not in first}
        with pytest.raises(ClipCapError, match="`overwrite`"):
            write_dir(out, MODEL_DIR, "clipcap convert", writer(second))
        clash = sorted(set(second) & set(theirs))
        if clash:
            with pytest.raises(ClipCapError, match="would be replaced"):
                write_dir(out, MODEL_DIR, "clipcap convert", writer(second), overwrite=True)
            assert {n: (out / n).read_bytes() for n in first} == first  # the earlier output is still whole
        else:
            write_dir(out, MODEL_DIR, "clipcap convert", writer(second), overwrite=True)
            assert {n: (out / n).read_bytes() for n in second} == second
            assert not (set(first) - set(second)) & {p.name for p in out.iterdir()}  # the earlier output is gone
        assert {n: (out / n).read_bytes() for n in theirs} == theirs
        assert not list(out.glob(f"{PARTIAL}*")) and not list(out.glob("*.tmp*"))


@settings(max_examples=40, deadline=None)
@given(user=FILES)
def test_a_dir_of_the_users_is_refused_whatever_it_holds(user):
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for name, data in user.items():
            (out / name).write_bytes(data)
        for overwrite in (False, True):
            with pytest.raises(ClipCapError, match="not empty|is a (model dir|embedding store|training run)"):
                write_dir(out, MODEL_DIR, "clipcap convert", writer({"x": b"1"}), overwrite=overwrite)
            with pytest.raises(ClipCapError):
                claim_dir(out, STORE, "clipcap embed", ("img_emb",), overwrite=overwrite)
        assert snapshot(out) == user


@settings(max_examples=60, deadline=None)
@given(
    parts=st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=3),
    other=st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=3),
)
def test_an_output_related_to_an_input_is_refused_exactly_when_it_is_one_contains_one_or_lies_in_one(parts, other):
    with tempfile.TemporaryDirectory() as tmp:
        source, out = Path(tmp).joinpath(*parts), Path(tmp).joinpath(*other)
        source.mkdir(parents=True)
        related = source == out or source in out.parents or out in source.parents
        if related:
            with pytest.raises(ClipCapError, match="write the output elsewhere"):
                check_inputs(out, [source])
        else:
            check_inputs(out, [source])
        if out in source.parents or out == source:
            with pytest.raises(ClipCapError):
                check_inputs(out, [], hosts=[source])
        else:
            check_inputs(out, [], hosts=[source])  # may be written into a host


def test_inputs_that_are_not_paths_here_are_not_compared(tmp_path):
    check_inputs(tmp_path / "out", ["gpt2", "openai/clip-vit-base-patch32", None, "*.jpg", "x" * 5000])


def test_the_current_dir_is_an_input_relation_like_any_other(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt.pt").write_bytes(b"x")
    with pytest.raises(ClipCapError, match="contains the input ckpt.pt"):
        check_inputs(".", ["ckpt.pt"])


@pytest.mark.parametrize(
    "error, full",
    [
        (OSError(errno.ENOSPC, "No space left on device"), True),
        (OSError(errno.EFBIG, "File too large"), True),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), True),
        (RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "..." })'), True),
        (OSError(errno.EACCES, "Permission denied"), False),
        (ValueError("bad value"), False),
    ],
)
def test_disk_full_is_told_by_errno_or_by_a_libraries_message_also_when_wrapped(error, full):
    assert disk_full(error) is full
    try:
        try:
            raise error
        except Exception as inner:
            raise ClipCapError("cannot export") from inner
    except ClipCapError as outer:
        assert disk_full(outer) is full


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG])
def test_a_write_that_fails_for_space_leaves_the_old_file_and_no_temporary(tmp_path, code):
    path = tmp_path / "f.json"
    path.write_text("old")

    def write(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError(code, os.strerror(code))

    with pytest.raises(ClipCapError, match="no space left writing .*f.json"):
        replace_atomically(path, write)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


def test_a_failed_dir_write_leaves_a_new_dir_absent_and_an_empty_dir_empty(tmp_path):
    def write(stage: Path) -> None:
        (stage / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(ClipCapError, match="no space left"):
        write_dir(tmp_path / "new", MODEL_DIR, "clipcap convert", write)
    assert not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ClipCapError, match="no space left"):
        write_dir(tmp_path / "empty", MODEL_DIR, "clipcap convert", write)
    assert list((tmp_path / "empty").iterdir()) == []


def test_a_failed_overwrite_keeps_the_earlier_output(tmp_path):
    out = write_dir(tmp_path / "m", MODEL_DIR, "clipcap convert", writer({"a": b"1"}))

    def write(stage: Path) -> None:
        raise OSError(errno.EFBIG, "File too large")

    with pytest.raises(ClipCapError, match="no space left"):
        write_dir(out, MODEL_DIR, "clipcap convert", write, overwrite=True)
    assert (out / "a").read_bytes() == b"1" and read_manifest(out)["entries"]["a"]["command"] == "clipcap convert"


def test_another_kind_in_the_manifest_is_refused_and_named(tmp_path):
    claim_dir(tmp_path / "s", STORE, "clipcap embed", ("img_emb",))
    with pytest.raises(ClipCapError, match="holds an embedding store .written by `clipcap embed`., not a model dir"):
        write_dir(tmp_path / "s", MODEL_DIR, "clipcap convert", writer({"a": b"1"}), overwrite=True)


def test_a_resumable_claim_continues_and_overwrite_deletes_only_its_entries(tmp_path):
    out = claim_dir(tmp_path / "s", STORE, "clipcap embed", ("img_emb", "info.json"), resume=True)
    (out / "img_emb").mkdir()
    (out / "img_emb" / "0.npy").write_bytes(b"0")
    (out / "notes.txt").write_text("mine")
    claim_dir(out, STORE, "clipcap embed", ("img_emb", "info.json"), resume=True)
    assert (out / "img_emb" / "0.npy").exists()
    claim_dir(out, STORE, "clipcap embed", ("img_emb", "info.json"), resume=True, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "notes.txt"]


def test_a_legacy_dir_is_adopted_only_by_its_own_resumable_command(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "train_config.json").write_text("{}")
    with pytest.raises(ClipCapError, match="is a training run"):
        claim_dir(tmp_path / "run", "training run", "clipcap train", ("checkpoints",))
    claim_dir(
        tmp_path / "run", "training run", "clipcap train", ("checkpoints",), resume=True, legacy="train_config.json"
    )
    assert kind_of(tmp_path / "run") == "training run"


def test_file_outputs_are_recorded_with_their_digest(tmp_path):
    path = write_file(tmp_path / "metrics.json", "clipcap evaluate", lambda tmp: tmp.write_text("{}"))
    entry = read_manifest(tmp_path)["entries"]["metrics.json"]
    assert entry["command"] == "clipcap evaluate" and len(entry["sha256"]) == 64
    with pytest.raises(ClipCapError, match="`overwrite`"):
        check_file(path, "clipcap evaluate")
    assert check_file(path, "clipcap evaluate", overwrite=True) == path
    path.write_text('{"edited": true}')
    with pytest.raises(ClipCapError, match="was changed after `clipcap evaluate` wrote it"):
        check_file(path, "clipcap evaluate", overwrite=True)


@pytest.mark.parametrize("content", [b"{oops", b"[]", b'{"entries": 3}', b"\xff\xfe"])
def test_a_damaged_manifest_is_one_error(tmp_path, content):
    (tmp_path / MANIFEST).write_bytes(content)
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(ClipCapError, match="is damaged"):
        check_file(tmp_path / "metrics.json", "clipcap evaluate", overwrite=True)
    assert json.loads((tmp_path / "metrics.json").read_text()) == {}


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_dirs_and_files_take_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        out = write_dir(tmp_path / "a" / "b", MODEL_DIR, "clipcap convert", writer({"w": b"1"}))
    finally:
        os.umask(old)
    for path in (tmp_path / "a", out):
        assert stat.S_IMODE(path.stat().st_mode) == 0o777 & ~mask
    assert stat.S_IMODE((out / "w").stat().st_mode) == 0o666 & ~mask
