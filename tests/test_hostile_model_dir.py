"""Broken model dirs given to the real CLI (`clipcap caption --model DIR`): each is one line on stderr, exit status 2,
no traceback, nothing on stdout. Every class of damage a model dir can suffer, several ways each."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

from tests import tiny
from tests.cli_batch import REPO, assert_one_line_error, run_cli

TEXT_CONFIG_CHANGES = "text_config."


def _edit(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if key.startswith(TEXT_CONFIG_CHANGES):
            config["text_config"][key.removeprefix(TEXT_CONFIG_CHANGES)] = value
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))


def _write(name: str, content: bytes | str):
    def change(path: Path) -> None:
        target = path / name
        if isinstance(content, str):
            target.write_text(content)
        else:
            target.write_bytes(content)

    return change


def _config(**changes):
    return lambda path: _edit(path, **changes)


def _truncate(name: str, keep: int):
    def change(path: Path) -> None:
        data = (path / name).read_bytes()
        (path / name).write_bytes(data[:keep] if keep >= 0 else data[:keep])

    return change


def _remove(name: str):
    def change(path: Path) -> None:
        target = path / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()

    return change


def _replace_with_dir(name: str):
    def change(path: Path) -> None:
        (path / name).unlink()
        (path / name).mkdir()

    return change


def _index(weight_map):
    def change(path: Path) -> None:
        (path / "model.safetensors").rename(path / "model-00001-of-00001.safetensors")
        index = weight_map if not callable(weight_map) else weight_map(path)
        (path / "model.safetensors.index.json").write_text(json.dumps(index))

    return change


def _mapper_only(path: Path) -> None:
    weights = load_file(path / "model.safetensors")
    save_file({k: v for k, v in weights.items() if k.startswith("mapper.")}, path / "model.safetensors")


DEEP = "[" * 100_000 + "]" * 100_000
TEXT = {"model_type": "gpt2", "n_embd": 32, "n_head": 2, "n_layer": 2, "vocab_size": 300, "n_positions": 128}

# class -> case -> change applied to a copy of a working model dir
CASES = {
    "config.json unreadable": {
        "missing": _remove("config.json"),
        "truncated JSON": _write("config.json", '{"lm": "gpt2", "clip_dim": 1'),
        "empty": _write("config.json", ""),
        "not UTF-8": _write("config.json", b'{"lm": "\xff\xfe\xfd"}'),
        "UTF-16": _write("config.json", '{"lm": "gpt2"}'.encode("utf-16")),
        "nested 100000 deep": _write("config.json", DEEP),
        "a directory": _replace_with_dir("config.json"),
    },
    "config.json not an object": {
        "array": _write("config.json", "[1, 2]"),
        "string": _write("config.json", '"clipcap"'),
        "null": _write("config.json", "null"),
        "number": _write("config.json", "3"),
    },
    "another model type": {
        "gpt2 config": _write("config.json", json.dumps({"model_type": "gpt2", "n_embd": 32})),
        "model_type not a string": _config(model_type=["clipcap"]),
    },
    "wrongly typed field": {
        "normalize_prefix 'false'": _config(normalize_prefix="false"),
        "tune_lm 'yes'": _config(tune_lm="yes"),
        "tune_lm 1": _config(tune_lm=1),
        "prefix_length '4'": _config(prefix_length="4"),
        "prefix_length 4.0": _config(prefix_length=4.0),
        "clip_dim true": _config(clip_dim=True),
        "clip_dim null": _config(clip_dim=None),
        "mapping 5": _config(mapping=5),
        "num_layers list": _config(num_layers=[2]),
        "stop_token_id -1": _config(stop_token_id=-1),
        "stop_token_id '0'": _config(stop_token_id="0"),
        "lm 5": _config(lm=5),
        "lm with a lone surrogate": _config(lm="gpt\ud800"),
        "clip_model {}": _config(clip_model={}),
        "text_config string": _config(text_config="gpt2"),
        "text_config without model_type": _config(text_config={"n_embd": 32}),
        "text_config unknown model_type": _config(text_config={"model_type": "no-such-lm"}),
        "text_config n_embd '32'": _config(**{"text_config.n_embd": "32"}),
        "dtype list": _config(dtype=[]),
        "dtype unknown": _config(dtype="float99"),
        "id2label string": _config(id2label="x"),
    },
    "inconsistent fields": {
        "transformer without clip_length": _config(mapping="transformer", clip_length=None),
        "stop_token_id beyond the vocabulary": _config(stop_token_id=300),
        "pad_token_id beyond the vocabulary": _config(pad_token_id=10**6),
        "num_heads not dividing the LM width": _config(mapping="transformer", clip_length=2, num_heads=3),
        "text_config and lm_config": _config(lm_config=TEXT),
        "vision tower of another width": _config(
            vision_config={"model_type": "clip_vision_model", "projection_dim": 8}
        ),
        "tuned LM without LM weights": lambda path: _mapper_only(path),
    },
    "weights unreadable": {
        "missing": _remove("model.safetensors"),
        "empty": _write("model.safetensors", b""),
        "truncated header": _truncate("model.safetensors", 100),
        "truncated data": _truncate("model.safetensors", -100),
        "garbage": _write("model.safetensors", os.urandom(4096)),
        "a directory": _replace_with_dir("model.safetensors"),
        "index naming a missing shard": _index({"weight_map": {"mapper.model.0.weight": "model-00009.safetensors"}}),
        "index not JSON": lambda path: (_index({})(path), _write("model.safetensors.index.json", "{")(path))[1],
        "index without weight_map": _index({"metadata": {}}),
        "index pointing outside the dir": _index({"weight_map": {"mapper.model.0.weight": "../../etc/passwd"}}),
    },
    "weights that do not match config.json": {
        "prefix_length changed": _config(prefix_length=5),
        "clip_dim changed": _config(clip_dim=8),
        "mapping changed": _config(mapping="transformer", clip_length=2, num_layers=1),
        "LM deeper": _config(**{"text_config.n_layer": 3}),
        "LM shallower": _config(**{"text_config.n_layer": 1}),
        "vocabulary changed": _config(**{"text_config.vocab_size": 301}),
        "huge prefix_length": _config(prefix_length=10**9),
        "huge vocabulary": _config(**{"text_config.vocab_size": 10**10}),
        "huge LM width": _config(**{"text_config.n_embd": 2**20}),
    },
    "tokenizer or encoder damaged": {
        "tokenizer.json garbage": _write("tokenizer.json", "{not a tokenizer"),
        "tokenizer_config.json not JSON": _write("tokenizer_config.json", "["),
        "encoder config garbage": _write("clip/config.json", "{"),
        "encoder weights truncated": _truncate("clip/model.safetensors", 200),
        "encoder missing": _remove("clip"),
    },
}


@pytest.fixture(scope="module")
def results(tmp_path_factory, tokenizer, clip_dir):
    root = tmp_path_factory.mktemp("hostile-model-dirs")
    good = root / "good"
    tiny.tiny_model("mlp", lm=tiny.tiny_gpt2(len(tokenizer))).save_pretrained(good)
    tokenizer.save_pretrained(good)
    shutil.copytree(clip_dir, good / "clip")
    image = root / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(image)
    cases = {"good": ["caption", "--model", str(good), str(image), "--quiet"]}
    for group, variants in CASES.items():
        for name, change in variants.items():
            broken = root / f"{group}-{name}".replace(" ", "_").replace("/", "_")
            shutil.copytree(good, broken)
            change(broken)
            cases[f"{group}: {name}"] = ["caption", "--model", str(broken), str(image)]
    cases["not a directory: missing"] = ["caption", "--model", str(root / "nope"), str(image)]
    cases["not a directory: a file"] = ["caption", "--model", str(image), str(image)]
    cases["not a directory: empty dir"] = ["caption", "--model", str(tmp_path_factory.mktemp("empty")), str(image)]
    cases["not a directory: an LM dir"] = [
        "caption",
        "--model",
        str(tiny.save_lm_dir(root / "lm", tiny.tiny_gpt2(300), tokenizer)),
        str(image),
    ]
    return run_cli(cases)


def test_the_working_dir_captions(results):
    good = results["good"]
    assert good["rc"] == 0, good["stderr"]
    assert json.loads(good["stdout"])["caption"] is not None


@pytest.mark.parametrize(
    "case",
    [f"{group}: {name}" for group, variants in CASES.items() for name in variants]
    + [f"not a directory: {n}" for n in ("missing", "a file", "empty dir", "an LM dir")],
)
def test_broken_model_dir_is_one_line(results, case):
    assert_one_line_error(results[case], "caption")


def test_the_console_script_itself(tmp_path):
    """One case through `python -m clipcap.cli` in its own process, as a user runs it."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "clipcap", "normalize_prefix": "false"}))
    done = subprocess.run(
        [sys.executable, "-m", "clipcap.cli", "caption", "--model", str(model), "x.jpg"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    message = assert_one_line_error({"rc": done.returncode, "stdout": done.stdout, "stderr": done.stderr}, "caption")
    assert 'normalize_prefix must be true or false (a JSON boolean), got "false"' in message
