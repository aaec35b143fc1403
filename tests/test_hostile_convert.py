"""`clipcap convert` on every kind of bad input, through the real CLI: one line on stderr, exit status 2, no
traceback, nothing written where the model dir was to go."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests import tiny
from tests.cli_batch import REPO, assert_one_line_error, run_cli
from tests.test_convert import HOSTILE_PICKLES, hostile_pickles, make_original


def _write(data: bytes):
    return lambda path, good: path.write_bytes(data)


def _from_good(transform):
    return lambda path, good: path.write_bytes(transform(good.read_bytes()))


def _save(obj):
    return lambda path, good: torch.save(obj, path)


def _edited(change):
    def make(path: Path, good: Path) -> None:
        state = torch.load(good, weights_only=True)
        change(state)
        torch.save(state, path)

    return make


def _flip(data: bytes) -> bytes:
    raw = bytearray(data)
    for i in range(len(raw) // 3, len(raw), 97):
        raw[i] ^= 0x5A
    return bytes(raw)


def _zip_without_torch(path: Path, good: Path) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "not a checkpoint")


CHECKPOINTS = {
    "damaged file": {
        "empty": _write(b""),
        "garbage bytes": _write(os.urandom(3000)),
        "text": _write(b"this is not a checkpoint\n" * 20),
        "truncated to half": _from_good(lambda d: d[: len(d) // 2]),
        "truncated to 10 bytes": _from_good(lambda d: d[:10]),
        "bytes flipped": _from_good(_flip),
        "a zip that is not a torch file": _zip_without_torch,
        "a safetensors file": lambda path, good: save_file({"a": torch.zeros(2)}, str(path)),
        "legacy format truncated": lambda path, good: (
            torch.save(torch.load(good, weights_only=True), path, _use_new_zipfile_serialization=False),
            path.write_bytes(path.read_bytes()[:700]),
        ),
    },
    "not a state dict": {
        "a list": _save([1, 2, 3]),
        "a tensor": _save(torch.zeros(3)),
        "values that are not tensors": _save({"clip_project.model.0.weight": 1.5}),
        "keys that are not strings": _save({1: torch.zeros(1)}),
        "empty dict": _save({}),
        "state_dict wrapper around nothing": _save({"state_dict": {}}),
    },
    "not a CLIP_prefix_caption state dict": {
        "no mapper weights": _save({"gpt.lm_head.weight": torch.zeros(300, 32)}),
        "a 1-d prefix_const": _edited(lambda s: s.update({"clip_project.prefix_const": torch.zeros(5)})),
        "a linear layer of the wrong width": _edited(
            lambda s: s.update({"clip_project.linear.weight": torch.zeros(7, 16)})
        ),
        "an empty weight": _edited(lambda s: s.update({"clip_project.linear.weight": torch.zeros(0, 16)})),
        "a missing linear layer": _edited(lambda s: s.pop("clip_project.linear.weight")),
        "an unknown key": _edited(lambda s: s.update({"extra.weight": torch.zeros(1)})),
        "an LM layer of the wrong shape": _edited(
            lambda s: s.update({"gpt.transformer.wte.weight": torch.zeros(301, 32)})
        ),
    },
}


@pytest.fixture(scope="module")
def results(tmp_path_factory, lm_dir, tokenizer):
    root = tmp_path_factory.mktemp("hostile-convert")
    good = root / "good.pt"
    make_original(lm_dir, "transformer", good)
    opt_dir = tiny.save_lm_dir(root / "opt", tiny.tiny_opt(len(tokenizer)), tokenizer)
    lm = ["--lm", str(lm_dir)]
    outs: dict[str, Path] = {}

    def out(case: str) -> str:  # each case writes (or must not write) its own dir
        outs[case] = root / f"out-{len(outs)}"
        return str(outs[case])

    cases = {"good": ["convert", str(good), str(root / "good-out"), *lm]}
    for group, variants in CHECKPOINTS.items():
        for name, make in variants.items():
            path = root / f"{group}-{name}.pt".replace(" ", "_")
            make(path, good)
            case = f"{group}: {name}"
            cases[case] = ["convert", str(path), out(case), *lm]
    for name, (path, _) in hostile_pickles(root).items():
        case = f"code in the pickle: {name}"
        cases[case] = ["convert", str(path), out(case), *lm]
    cases["missing file: nothing there"] = [
        "convert",
        str(root / "missing.pt"),
        out("missing file: nothing there"),
        *lm,
    ]
    cases["missing file: a directory"] = ["convert", str(root), out("missing file: a directory"), *lm]
    flags = {
        "--prefix-length contradicts": ["--prefix-length", "4"],
        "--mapping contradicts": ["--mapping", "mlp"],
        "--clip-length contradicts": ["--clip-length", "9"],
        "--num-layers contradicts": ["--num-layers", "5"],
        "--clip-dim contradicts": ["--clip-dim", "512"],
        "negative --prefix-length": ["--prefix-length", "-1"],
    }
    for name, extra in flags.items():
        cases[f"flags: {name}"] = ["convert", str(good), out(f"flags: {name}"), *lm, *extra]
    bad_lm = root / "bad-lm"
    bad_lm.mkdir()
    (bad_lm / "config.json").write_text("{")
    no_tokenizer = root / "no-tokenizer"
    tiny.tiny_gpt2(len(tokenizer)).save_pretrained(no_tokenizer)
    for name, lm_arg in {
        "another architecture": str(opt_dir),
        "missing dir": str(root / "no-lm"),
        "config not JSON": str(bad_lm),
        "no tokenizer": str(no_tokenizer),
        "Hub id offline": "gpt2",
    }.items():
        case = f"language model: {name}"
        cases[case] = ["convert", str(good), out(case), "--lm", lm_arg]
    (root / "a-file").write_text("x")
    cases["output: an existing file"] = ["convert", str(good), str(root / "a-file"), *lm]
    cases["output: inside a file"] = ["convert", str(good), str(root / "a-file" / "model"), *lm]
    outs["output: an existing file"] = root / "a-file"
    outs["output: inside a file"] = root / "a-file" / "model"
    return root, outs, run_cli(cases)


def test_the_good_checkpoint_converts(results):
    root, _, out = results
    assert out["good"]["rc"] == 0, out["good"]["stderr"]
    assert json.loads((root / "good-out" / "config.json").read_text())["model_type"] == "clipcap"


CASE_NAMES = (
    [f"{group}: {name}" for group, variants in CHECKPOINTS.items() for name in variants]
    + [f"code in the pickle: {name}" for name in HOSTILE_PICKLES]
    + ["missing file: nothing there", "missing file: a directory"]
    + [
        f"flags: {name}"
        for name in (
            "--prefix-length contradicts",
            "--mapping contradicts",
            "--clip-length contradicts",
            "--num-layers contradicts",
            "--clip-dim contradicts",
            "negative --prefix-length",
        )
    ]
    + [
        f"language model: {name}"
        for name in ("another architecture", "missing dir", "config not JSON", "no tokenizer", "Hub id offline")
    ]
    + ["output: an existing file", "output: inside a file"]
)


@pytest.mark.parametrize("case", CASE_NAMES)
def test_bad_input_is_one_line_and_writes_nothing(results, case):
    root, outs, out = results
    message = assert_one_line_error(out[case], "convert")
    target = outs[case]
    assert target.is_file() if case == "output: an existing file" else not target.exists()
    assert not list(target.parent.glob(f".{target.name}*"))  # no half-written dir left beside it
    if case.startswith("damaged file") or case.startswith("not a state dict"):
        assert "would import and run" not in message


def test_code_in_the_pickle_is_refused_saying_why(results):
    _, _, out = results
    cases = [name for name in out if name.startswith("code in the pickle: ")]
    assert len(cases) == len(HOSTILE_PICKLES) == 8
    for name in cases:
        message = assert_one_line_error(out[name], "convert")
        assert "loading it would import and run" in message and "so it was refused" in message, message
        assert "corrupt" not in message, message


def test_the_console_script_itself(tmp_path, lm_dir):
    """One hostile pickle through `python -m clipcap.cli` in its own process, as a user runs it."""
    (path, callable_name), *_ = hostile_pickles(tmp_path).values()
    done = subprocess.run(
        [sys.executable, "-m", "clipcap.cli", "convert", str(path), str(tmp_path / "out"), "--lm", str(lm_dir)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)},
    )
    message = assert_one_line_error({"rc": done.returncode, "stdout": done.stdout, "stderr": done.stderr}, "convert")
    assert f"would import and run {callable_name}" in message
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "out").exists()
