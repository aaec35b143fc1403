import json
import subprocess
import sys

import pytest
import torch

from clipcap import ClipCapError, ClipCapModel
from clipcap.cli import main
from clipcap.convert import convert_original
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


def test_pickle_with_code_is_refused_not_run(tmp_path, lm_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "evil.pt"
    torch.save({"clip_project.model.0.weight": torch.zeros(2, 2), "payload": Exploit()}, ckpt)
    with pytest.raises(ClipCapError, match=r"would run arbitrary code \(.*call\), so it was refused"):
        convert_original(ckpt, tmp_path / "out", lm=str(lm_dir))
    assert not (tmp_path / "PWNED").exists()


def test_corrupt_truncated_and_missing_checkpoints(tmp_path, lm_dir, capsys):
    good = tmp_path / "good.pt"
    make_original(lm_dir, "mlp", good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00\x01not a checkpoint" * 50)
    for bad in (truncated, garbage):
        with pytest.raises(ClipCapError, match="corrupt or truncated"):
            convert_original(bad, tmp_path / "out", lm=str(lm_dir))
    not_state = tmp_path / "list.pt"
    torch.save([1, 2, 3], not_state)
    with pytest.raises(ClipCapError, match="does not hold a state dict"):
        convert_original(not_state, tmp_path / "out", lm=str(lm_dir))
    assert main(["convert", str(tmp_path / "missing.pt"), str(tmp_path / "out"), "--lm", str(lm_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "checkpoint not found" in err and "Traceback" not in err
