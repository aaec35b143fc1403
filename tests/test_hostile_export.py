"""Hostile inputs to `clipcap export` and to exported model dirs: one-line errors through the CLI, never a traceback,
and no half-written exported dir left behind."""

import json
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import MambaConfig, MambaForCausalLM

from clipcap import ClipCapError, ClipCapModel
from clipcap.cli import main
from clipcap.exported import ExportedModel
from tests import tiny
from tests.test_images import REAL_IMAGES

PHOTO = sorted(REAL_IMAGES.glob("*.jpg"))[0]


@pytest.fixture(scope="module")
def exported(exported_dir):
    return exported_dir


def one_line_error(capsys, argv: list, command: str, *words: str) -> str:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"clipcap {command}: error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def damaged_copy(exported, tmp_path, name="damaged"):
    path = tmp_path / name
    shutil.copytree(exported, path)
    return path


@pytest.mark.parametrize("command", ["caption", "serve"])
def test_a_damaged_decoder_is_named(capsys, exported, tmp_path, command):
    path = damaged_copy(exported, tmp_path)
    data = (path / "decoder.onnx").read_bytes()
    (path / "decoder.onnx").write_bytes(data[: len(data) // 2])  # truncated in the middle of the weights
    argv = ["caption", PHOTO, "--model", path, "--quiet"] if command == "caption" else ["serve", "--model", path]
    one_line_error(capsys, argv, command, "decoder.onnx", "not a loadable ONNX model")


def test_garbage_in_place_of_the_mapper(capsys, exported, tmp_path):
    path = damaged_copy(exported, tmp_path)
    (path / "mapper.onnx").write_bytes(b"\x00\xff not protobuf " * 100)
    one_line_error(capsys, ["caption", PHOTO, "--model", path], "caption", "mapper.onnx")


@pytest.mark.parametrize("missing", ["mapper.onnx", "decoder.onnx"])
def test_a_missing_graph_makes_an_incomplete_dir(capsys, exported, tmp_path, missing):
    path = damaged_copy(exported, tmp_path)
    (path / missing).unlink()
    one_line_error(capsys, ["caption", PHOTO, "--model", path], "caption", "incomplete", missing)


def test_a_dir_claiming_to_be_exported_with_nothing_else(capsys, exported, tmp_path):
    path = tmp_path / "claims"
    path.mkdir()
    shutil.copy(exported / "config.json", path / "config.json")
    one_line_error(capsys, ["caption", PHOTO, "--model", path], "caption", "incomplete", "mapper.onnx")


def test_graphs_swapped(capsys, exported, tmp_path):
    path = damaged_copy(exported, tmp_path)
    shutil.copy(exported / "mapper.onnx", path / "decoder.onnx")
    one_line_error(capsys, ["caption", PHOTO, "--model", path], "caption", "decoder.onnx", "not those of a clipcap")


def test_a_pooled_export_whose_config_claims_image_tokens(capsys, exported, tmp_path):
    """config.json edited to say the model reads image tokens: the mapper graph takes pooled embeddings."""
    path = damaged_copy(exported, tmp_path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"token_shape": [5, 32], "normalize_prefix": False}))
    one_line_error(capsys, ["caption", PHOTO, "--model", path], "caption", "mapper.onnx takes inputs ['clip_embeds']")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
entry_fields = st.fixed_dictionaries(
    {},
    optional={
        "format": st.sampled_from(["onnx", "ONNX", "tflite", ""]) | json_values,
        "mapper": st.sampled_from(["mapper.onnx", "../mapper.onnx", "/etc/passwd", "mapper.txt"]) | json_values,
        "decoder": st.sampled_from(["decoder.onnx", "sub/decoder.onnx", "x.onnx"]) | json_values,
        "num_layers": st.integers(-2, 4) | json_values,
    },
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entry=json_values | entry_fields)
def test_any_export_entry_is_read_or_refused_cleanly(tmp_path_factory, model_dir, entry):
    """Whatever the "export" entry holds, loading either works or raises ClipCapError (no files: never works)."""
    path = tmp_path_factory.mktemp("entry")
    data = json.loads((model_dir / "config.json").read_text())
    data["export"] = entry
    (path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ClipCapError):
        ExportedModel.from_pretrained(path)


def test_unreadable_config_json_is_left_to_the_model_loader(capsys, tmp_path):
    path = tmp_path / "model"
    path.mkdir()
    (path / "config.json").write_text('{"export": ')
    one_line_error(capsys, ["caption", PHOTO, "--model", path], "caption", "not valid JSON")


def test_export_of_a_missing_dir(capsys, tmp_path):
    one_line_error(capsys, ["export", tmp_path / "nope", tmp_path / "out", "--quiet"], "export", "not found")


def test_export_of_an_exported_dir(capsys, exported, tmp_path):
    one_line_error(
        capsys, ["export", exported, tmp_path / "out", "--int8", "--quiet"], "export", "already an exported model"
    )
    assert not (tmp_path / "out").exists()


def test_export_never_overwrites(capsys, model_dir, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    one_line_error(capsys, ["export", model_dir, tmp_path / "full", "--quiet"], "export", "is not empty (keep.txt)")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    one_line_error(capsys, ["export", model_dir, tmp_path / "file", "--quiet"], "export", "is a file, not a directory")


def test_export_of_a_damaged_model_dir(capsys, model_dir, tmp_path):
    path = tmp_path / "model"
    shutil.copytree(model_dir, path)
    (path / "model.safetensors").write_bytes(b"garbage")
    one_line_error(capsys, ["export", path, tmp_path / "out", "--quiet"], "export", "model.safetensors")
    assert not (tmp_path / "out").exists()


def test_int8_on_an_lm_without_a_key_value_cache(capsys, tmp_path, tokenizer):
    """A state-space LM (Mamba) captions in PyTorch but has no key/value cache to export."""
    config = MambaConfig(vocab_size=len(tokenizer), hidden_size=32, state_size=4, num_hidden_layers=2, conv_kernel=2)
    model = ClipCapModel(tiny.tiny_config("mlp"), lm=MambaForCausalLM(config).eval())
    assert model.generate(torch.zeros(1, 16), max_new_tokens=2).shape == (1, 2)
    model.save_pretrained(tmp_path / "mamba")
    tokenizer.save_pretrained(tmp_path / "mamba")
    one_line_error(
        capsys, ["export", tmp_path / "mamba", tmp_path / "out", "--int8", "--quiet"], "export", "MambaForCausalLM"
    )
    assert list(tmp_path.iterdir()) == [tmp_path / "mamba"]  # no output dir, no temporary dir left


def test_an_lm_the_exporter_rejects(capsys, monkeypatch, model_dir, tmp_path):
    def refuse(*args, **kwargs):
        raise RuntimeError("Unsupported operator aten::weird\n\nlong exporter report\n...")

    monkeypatch.setattr(torch.onnx, "export", refuse)
    line = one_line_error(capsys, ["export", model_dir, tmp_path / "out", "--int8", "--quiet"], "export", "aten::weird")
    assert "long exporter report" not in line
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_frozen_lm_saved_by_reference_offline(capsys, tmp_path, tokenizer):
    model = tiny.tiny_model("transformer", lm=tiny.tiny_gpt2(len(tokenizer)), lm_name="gpt2")
    model.save_pretrained(tmp_path / "ref", save_lm=False)  # the LM is "gpt2" from the Hub, unreachable here
    tokenizer.save_pretrained(tmp_path / "ref")
    one_line_error(capsys, ["export", tmp_path / "ref", tmp_path / "out", "--quiet"], "export", "gpt2")
