import io
import json
import os
import pickle
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from clipcap import ClipCapError, ClipCapModel
from clipcap.cli import main
from clipcap.convert import convert_original, load_original_state_dict
from tests import original_clipcap as original
from tests import tiny


@pytest.fixture(scope="module")
def opt_dir(tmp_path_factory, tokenizer):
    return tiny.save_lm_dir(tmp_path_factory.mktemp("opt"), tiny.tiny_opt(len(tokenizer)), tokenizer)


def make_original(lm_dir, mapping, path, seed=0):
    torch.manual_seed(seed)
    gpt = tiny.load_lm(lm_dir)
    if mapping == "mlp":
        model = original.ClipCaptionModel(gpt, prefix_length=4, prefix_size=16)
    else:
        model = original.ClipCaptionModel(
            gpt,
            prefix_length=5,
            clip_length=3,
            prefix_size=16,
            num_layers=2,
            mapping="transformer",
            num_heads=8,
        )
    torch.nn.init.normal_(next(iter(model.clip_project.parameters())), std=0.5)
    torch.save(original.original_state_dict(model), path)
    return model.eval()


@pytest.mark.parametrize("lm", ["gpt2", "opt"])
@pytest.mark.parametrize("mapping", ["mlp", "transformer"])
def test_converted_logits_match_original(tmp_path, lm_dir, opt_dir, mapping, lm):
    lm_path = lm_dir if lm == "gpt2" else opt_dir
    ckpt = tmp_path / "orig.pt"
    ref = make_original(lm_path, mapping, ckpt)
    if lm == "gpt2":
        assert "gpt.transformer.h.0.attn.masked_bias" in torch.load(ckpt, weights_only=True)
    out = convert_original(ckpt, tmp_path / "converted", lm=str(lm_path))
    model = ClipCapModel.from_pretrained(out)
    assert model.config.mapping == mapping
    assert model.config.prefix_length == (4 if mapping == "mlp" else 5)
    assert model.config.tune_lm is (mapping == "mlp")
    if mapping == "transformer":
        assert (model.config.clip_length, model.config.num_layers) == (3, 2)
    g = torch.Generator().manual_seed(1)
    clip = torch.randn(3, 16, generator=g)
    ids = torch.randint(1, 300, (3, 6), generator=g)
    mask = torch.ones(3, 6 + model.config.prefix_length, dtype=torch.long)
    with torch.no_grad():
        expected = ref(ids, clip, mask)
        got = model(clip, ids).logits
    assert (got - expected).abs().max() <= 1e-4
    # converted checkpoints stop at ".": the originals never learned an end token
    assert model.config.stop_token_id == tiny.tiny_tokenizer().convert_tokens_to_ids(".")
    assert (out / "tokenizer.json").is_file()


def test_cli_convert_and_flag_contradictions(tmp_path, lm_dir, capsys):
    ckpt = tmp_path / "orig.pt"
    make_original(lm_dir, "mlp", ckpt)
    assert main(["convert", str(ckpt), str(tmp_path / "ok"), "--lm", str(lm_dir), "--prefix-length", "4"]) == 0
    assert json.loads((tmp_path / "ok" / "config.json").read_text())["clip_dim"] == 16
    assert main(["convert", str(ckpt), str(tmp_path / "bad"), "--lm", str(lm_dir), "--prefix-length", "10"]) == 2
    err = capsys.readouterr().err
    assert "--prefix-length 10 contradicts the checkpoint, which has 4" in err
    assert main(["convert", str(ckpt), str(tmp_path / "bad"), "--lm", str(lm_dir), "--mapping", "transformer"]) == 2
    assert "--mapping transformer contradicts" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_checkpoint_for_another_lm_is_a_clear_error(tmp_path, lm_dir, opt_dir):
    ckpt = tmp_path / "orig.pt"
    make_original(opt_dir, "mlp", ckpt)
    with pytest.raises(ClipCapError, match="does not fit the LM"):
        convert_original(ckpt, tmp_path / "out", lm=str(lm_dir))


class Exploit:
    def __reduce__(self):
        return (subprocess.call, ([sys.executable, "-c", "open('PWNED', 'w').close()"],))


class SystemExploit:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


class EvalExploit:
    def __reduce__(self):
        return (eval, ("open('PWNED', 'w').close()",))


WEIGHTS = {"clip_project.model.0.weight": torch.zeros(2, 2)}
# Checkpoints that would run code if unpickled: how each is written, and the callable its refusal must name.
HOSTILE_PICKLES = {
    "torch.save zip, subprocess.call": (lambda p: torch.save({**WEIGHTS, "x": Exploit()}, p), "subprocess.call"),
    "torch.save zip, os.system": (lambda p: torch.save({**WEIGHTS, "x": SystemExploit()}, p), f"{os.name}.system"),
    "torch.save zip, eval": (lambda p: torch.save({"x": EvalExploit()}, p), "builtins.eval"),
    "torch.save legacy format": (
        lambda p: torch.save({"x": SystemExploit()}, p, _use_new_zipfile_serialization=False),
        f"{os.name}.system",
    ),
    **{
        f"plain pickle, protocol {protocol}": (
            lambda p, proto=protocol: p.write_bytes(pickle.dumps({"x": SystemExploit()}, protocol=proto)),
            f"{os.name}.system",
        )
        for protocol in (0, 2, 4, 5)
    },
}


def hostile_pickles(folder: Path) -> dict[str, tuple[Path, str]]:
    """Write HOSTILE_PICKLES into `folder`: {name: (path, callable the refusal must name)}."""
    out = {}
    for i, (name, (write, callable_name)) in enumerate(HOSTILE_PICKLES.items()):
        path = folder / f"hostile-{i}.pt"
        write(path)
        out[name] = (path, callable_name)
    return out


def test_pickle_with_code_is_refused_saying_why(tmp_path, lm_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, (ckpt, callable_name) in hostile_pickles(tmp_path).items():
        with pytest.raises(ClipCapError) as caught:
            convert_original(ckpt, tmp_path / "out", lm=str(lm_dir))
        message = str(caught.value)
        assert f"would import and run {callable_name}" in message, (name, message)
        assert "a pickle can run any program when loaded" in message and "corrupt" not in message, name
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "out").exists()


def test_corrupt_truncated_and_missing_checkpoints(tmp_path, lm_dir, capsys):
    good = tmp_path / "good.pt"
    make_original(lm_dir, "mlp", good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00\x01not a checkpoint" * 50)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    for bad in (truncated, garbage, empty):
        with pytest.raises(ClipCapError, match="corrupt or truncated"):
            convert_original(bad, tmp_path / "out", lm=str(lm_dir))
    for name, content in {"list": [1, 2, 3], "tensors": {"a": 1}, "int keys": {1: torch.zeros(1)}, "empty": {}}.items():
        path = tmp_path / f"{name}.pt"
        torch.save(content, path)
        with pytest.raises(ClipCapError, match="does not hold a state dict of named tensors"):
            convert_original(path, tmp_path / "out", lm=str(lm_dir))
    with pytest.raises(ClipCapError, match="is a directory, not a checkpoint file"):
        convert_original(tmp_path, tmp_path / "out", lm=str(lm_dir))
    assert main(["convert", str(tmp_path / "missing.pt"), str(tmp_path / "out"), "--lm", str(lm_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "checkpoint not found" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s.update({"clip_project.prefix_const": torch.zeros(5)}), "prefix_const has shape \\(5,\\)"),
        (lambda s: s.update({"clip_project.linear.weight": torch.zeros(7, 16)}), "not a multiple of the prefix width"),
        (lambda s: s.update({"clip_project.linear.weight": torch.zeros(0, 16)}), "not that of a 2-d weight"),
        (lambda s: s.pop("clip_project.linear.weight"), "has no clip_project.linear.weight"),
        (lambda s: [s.pop(k) for k in list(s) if k.startswith("clip_project")], "no clip_project.* mapper weights"),
        (lambda s: s.update({"extra.weight": torch.zeros(1)}), "unexpected key in checkpoint: extra.weight"),
    ],
)
def test_wrongly_shaped_state_dicts_are_one_error(tmp_path, lm_dir, change, message):
    ckpt = tmp_path / "orig.pt"
    make_original(lm_dir, "transformer", ckpt)
    state = torch.load(ckpt, weights_only=True)
    change(state)
    torch.save(state, ckpt)
    with pytest.raises(ClipCapError, match=message):
        convert_original(ckpt, tmp_path / "out", lm=str(lm_dir))
    assert not (tmp_path / "out").exists()


def test_output_path_that_is_a_file(tmp_path, lm_dir):
    ckpt = tmp_path / "orig.pt"
    make_original(lm_dir, "mlp", ckpt)
    (tmp_path / "out").write_text("x")
    with pytest.raises(ClipCapError, match="is a file, not a directory"):
        convert_original(ckpt, tmp_path / "out", lm=str(lm_dir))


def test_converted_dir_is_in_the_current_format(tmp_path, lm_dir):
    ckpt = tmp_path / "orig.pt"
    make_original(lm_dir, "mlp", ckpt)
    out = convert_original(ckpt, tmp_path / "converted", lm=str(lm_dir))
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "clipcap" and "text_config" in config and "lm_config" not in config
    assert not list(out.glob(".clipcap-partial-*"))  # written inside the target, then renamed into place


# -- property tests: the loader gives a state dict or one ClipCapError, whatever the bytes ------------------------
@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("good") / "orig.pt"
    torch.manual_seed(0)
    torch.save({"clip_project.model.0.weight": torch.randn(4, 3), "gpt.lm_head.weight": torch.randn(2, 4)}, path)
    return path.read_bytes()


def _outcome(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ckpt.pt"
        path.write_bytes(raw)
        try:
            state = load_original_state_dict(path)
        except ClipCapError as e:
            assert str(e) and "\n" not in str(e)
        else:
            assert state and all(isinstance(v, torch.Tensor) for v in state.values())


@given(st.binary(max_size=600))
def test_any_bytes_load_or_are_refused(raw):
    _outcome(raw)


@given(st.data())
def test_damaged_checkpoints_load_or_are_refused(good_checkpoint, data):
    raw = bytearray(good_checkpoint)
    cut = data.draw(st.integers(0, len(raw)), label="truncate at")
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(0, 255)), max_size=6))
    for position, value in flips:
        raw[position] = value
    _outcome(bytes(raw[:cut]))


PICKLE_OPS = st.sampled_from(
    [
        b"\x80\x02",
        b"}",
        b"]",
        b"(",
        b"t",
        b"s",
        b"u",
        b"e",
        b"a",
        b"N",
        b"\x88",
        b"K\x01",
        b"X\x01\x00\x00\x00a",
        b"\x8c\x01b",
    ]
    + [b"c__builtin__\neval\n", b"cposix\nsystem\n", b"ctorch._utils\n_rebuild_tensor_v2\n", b"\x93", b"R", b"b"]
    + [b"q\x00", b"h\x00", b"\x94", b"\x81", b"0", b"2", b"."]
)


@given(st.lists(PICKLE_OPS, max_size=25))
def test_arbitrary_pickle_programs_load_or_are_refused(ops):
    raw = b"".join(ops) + b"."
    _outcome(raw)
    buffer = io.BytesIO()  # the same program as the data.pkl of a torch zip checkpoint
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", raw)
        archive.writestr("archive/version", "3\n")
    _outcome(buffer.getvalue())
