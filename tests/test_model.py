import json
import shutil
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel

from clipcap import ClipCapConfig, ClipCapError, ClipCapModel
from tests import tiny

FIXTURES = Path(__file__).parent / "fixtures" / "clipcap-0.1"

LMS = {"gpt2": tiny.tiny_gpt2, "opt": tiny.tiny_opt, "llama": tiny.tiny_llama}


def batch(vocab=50, b=3, t=5, clip_dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, 3:] = 0  # right padding on the first row
    return torch.randn(b, clip_dim, generator=g), ids, mask


@pytest.mark.parametrize("lm_name", sorted(LMS))
@pytest.mark.parametrize("mapping", ["mlp", "transformer"])
def test_forward_shapes_any_causal_lm(lm_name, mapping):
    model = tiny.tiny_model(mapping, lm=LMS[lm_name](300))
    clip, ids, mask = batch()
    out = model(clip, ids, attention_mask=mask, labels=ids)
    assert out.logits.shape == (3, 4 + 5, 300)
    assert model.prefix(clip).shape == (3, 4, 32)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)


def test_the_loss_is_computed_without_a_notice(hf_warnings):
    """GPT2LMHeadModel's class name names no transformers loss family: without ours, each loss warns (once)."""
    clip, ids, mask = batch()
    loss = tiny.tiny_model("mlp")(clip, ids, attention_mask=mask, labels=ids).loss
    assert torch.isfinite(loss) and [r.getMessage() for r in hf_warnings] == []


def test_loss_ignores_prefix_and_padding():
    model = tiny.tiny_model("mlp")
    clip, ids, mask = batch()
    out = model(clip, ids, attention_mask=mask, labels=ids)
    k = 4
    # position k-1+t predicts token t; padded tokens (row 0, t >= 3) are excluded
    logits = out.logits[:, k - 1 : -1]
    targets = ids.masked_fill(mask == 0, -100)
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    # changing a padded token's id changes nothing in the loss
    ids2 = ids.clone()
    ids2[0, 4] = 7
    assert torch.equal(model(clip, ids2, attention_mask=mask, labels=ids2).loss, out.loss)


def test_frozen_lm_gets_no_grads_but_mapper_does():
    model = tiny.tiny_model("transformer", tune_lm=False).train()
    assert not model.lm.training  # dropout off in a frozen LM
    assert all(not p.requires_grad for p in model.lm.parameters())
    clip, ids, mask = batch()
    model(clip, ids, attention_mask=mask, labels=ids).loss.backward()
    assert all(p.grad is None for p in model.lm.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.mapper.parameters())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if n.startswith("mapper.")}


def test_tuned_lm_gets_grads():
    model = tiny.tiny_model("mlp", tune_lm=True).train()
    clip, ids, mask = batch()
    model(clip, ids, attention_mask=mask, labels=ids).loss.backward()
    assert model.lm.get_input_embeddings().weight.grad is not None


def test_normalize_prefix_is_scale_invariant():
    model = tiny.tiny_model("mlp", normalize_prefix=True)
    clip = torch.randn(2, 16)
    torch.testing.assert_close(model.prefix(clip), model.prefix(clip * 7.5))
    unnormalized = tiny.tiny_model("mlp", normalize_prefix=False)
    assert not torch.allclose(unnormalized.prefix(clip), unnormalized.prefix(clip * 7.5))


@pytest.mark.parametrize("mapping", ["mlp", "transformer"])
@pytest.mark.parametrize("lm_name", ["gpt2", "llama"])
def test_save_load_round_trip_is_bit_exact(tmp_path, mapping, lm_name):
    model = tiny.tiny_model(mapping, lm=LMS[lm_name](300))
    model.save_pretrained(tmp_path)
    loaded = ClipCapModel.from_pretrained(tmp_path)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.config == model.config
    clip, ids, mask = batch()
    assert torch.equal(model(clip, ids, mask).logits, loaded(clip, ids, mask).logits)


@pytest.mark.parametrize("tune_lm", [True, False])
def test_token_model_trains_saves_and_generates(tmp_path, tune_lm):
    model = tiny.tiny_model("transformer", token_shape=[5, 12], tune_lm=tune_lm, clip_length=None).train()
    _, ids, mask = batch()
    tokens = torch.randn(3, 5, 12)
    out = model(tokens, ids, attention_mask=mask, labels=ids)
    assert out.logits.shape == (3, 5 + 4 + 5, 300) and out.prefix.shape == (3, 5 + 4, 32)  # T + k, then the text
    out.loss.backward()
    assert model.mapper.positions.grad is not None and model.mapper.linear.weight.grad.abs().sum() > 0
    model.save_pretrained(tmp_path)
    loaded = ClipCapModel.from_pretrained(tmp_path)
    assert loaded.config.token_shape == [5, 12]
    assert torch.equal(model.eval()(tokens, ids, mask).logits, loaded(tokens, ids, mask).logits)
    assert loaded.generate(tokens, max_new_tokens=3).shape[0] == 3


def test_inputs_of_the_wrong_shape_are_clear_errors():
    with pytest.raises(ClipCapError, match=r"reads image tokens of shape \(B, 5, 12\), got \(3, 16\)"):
        tiny.tiny_model("transformer", token_shape=[5, 12], clip_length=None).prefix(torch.randn(3, 16))
    with pytest.raises(ClipCapError, match=r"reads CLIP embeddings of shape \(B, 16\), got \(3, 5, 12\)"):
        tiny.tiny_model("mlp").generate(torch.randn(3, 5, 12))


def test_frozen_lm_saved_by_reference(tmp_path, lm_dir):
    model = tiny.tiny_model("transformer", tune_lm=False, lm=tiny.load_lm(lm_dir), lm_name=str(lm_dir))
    model.save_pretrained(tmp_path, save_lm=False)
    assert all(k.startswith("mapper.") for k in load_file(tmp_path / "model.safetensors"))
    loaded = ClipCapModel.from_pretrained(tmp_path)
    clip, ids, mask = batch()
    assert torch.equal(model(clip, ids, mask).logits, loaded(clip, ids, mask).logits)
    with pytest.raises(ClipCapError, match="only for a frozen LM"):
        tiny.tiny_model("mlp").save_pretrained(tmp_path / "x", save_lm=False)


def test_missing_and_corrupt_model_dirs(tmp_path):
    with pytest.raises(ClipCapError, match="directory not found"):
        ClipCapModel.from_pretrained(tmp_path / "nope")
    with pytest.raises(ClipCapError, match="not a ClipCap model dir"):
        ClipCapModel.from_pretrained(tmp_path)
    tiny.tiny_model("mlp").save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ClipCapError, match="not a readable safetensors file"):
        ClipCapModel.from_pretrained(tmp_path)
    weights.unlink()
    with pytest.raises(ClipCapError, match="has no model.safetensors"):
        ClipCapModel.from_pretrained(tmp_path)


def test_saved_dir_is_a_transformers_model(tmp_path):
    model = tiny.tiny_model("transformer", tune_lm=False)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "clipcap" and saved["text_config"]["model_type"] == "gpt2"
    assert saved["auto_map"] == {"AutoConfig": "config.ClipCapConfig", "AutoModel": "model.ClipCapModel"}
    assert {"config.py", "model.py", "mapping.py", "hub.py", "errors.py"} <= {p.name for p in tmp_path.iterdir()}
    assert AutoConfig.from_pretrained(tmp_path).model_type == "clipcap"
    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded) is ClipCapModel
    clip, ids, mask = batch()
    assert torch.equal(model(clip, ids, mask).logits, loaded(clip, ids, mask).logits)


def test_sharded_save_loads_back_identical(tmp_path):
    model = tiny.tiny_model("mlp", lm=tiny.tiny_gpt2(300, hidden=128))
    model.save_pretrained(tmp_path, max_shard_size="1MB")
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(shards) >= 2 and sorted(set(index["weight_map"].values())) == shards
    assert not (tmp_path / "model.safetensors").exists()
    loaded = ClipCapModel.from_pretrained(tmp_path)
    clip, ids, mask = batch()
    assert torch.equal(model(clip, ids, mask).logits, loaded(clip, ids, mask).logits)


@pytest.mark.parametrize("argument", ["torch_dtype", "dtype"])
def test_load_in_another_dtype(tmp_path, argument):
    model = tiny.tiny_model("transformer", tune_lm=False)
    model.save_pretrained(tmp_path)
    loaded = ClipCapModel.from_pretrained(tmp_path, **{argument: torch.bfloat16})
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    clip, ids, mask = batch()
    expected = model(clip, ids, mask).logits
    torch.testing.assert_close(loaded(clip, ids, mask).logits.float(), expected, atol=0.05, rtol=0.05)
    assert loaded.generate(clip, max_new_tokens=4).shape[0] == 3


@pytest.mark.parametrize("name", ["mlp-tuned", "transformer-frozen"])
def test_clipcap_0_1_dirs_load_with_the_same_logits_and_resave_in_the_new_format(tmp_path, name):
    """The shipped fixture dirs were written by clipcap 0.1, with what it computed from them."""
    expected = load_file(FIXTURES / name / "expected.safetensors")
    inputs = (expected["clip_embeds"], expected["input_ids"], expected["attention_mask"])
    model = ClipCapModel.from_pretrained(FIXTURES / name)
    assert (model(*inputs).logits - expected["logits"]).abs().max() <= 1e-6
    assert torch.equal(model.generate(expected["clip_embeds"], max_new_tokens=6), expected["generated"])
    model.save_pretrained(tmp_path / "new", save_lm=model.config.tune_lm)
    saved = json.loads((tmp_path / "new" / "config.json").read_text())
    assert saved["model_type"] == "clipcap" and "text_config" in saved and "lm_config" not in saved
    if name == "transformer-frozen":  # still by reference: copy the LM it names beside it
        shutil.copytree(FIXTURES / "lm", tmp_path / "lm")
    again = ClipCapModel.from_pretrained(tmp_path / "new")
    assert torch.equal(again(*inputs).logits, model(*inputs).logits)


def test_frozen_lm_by_reference_resolves_against_the_model_dir(tmp_path, monkeypatch):
    shutil.copytree(FIXTURES / "transformer-frozen", tmp_path / "model")
    monkeypatch.chdir(tmp_path / "model")  # "../lm" must not be read relative to the working directory
    with pytest.raises(ClipCapError, match=r"names language model '\.\./lm' \(lm\), which is not in the model dir"):
        ClipCapModel.from_pretrained(tmp_path / "model")
    shutil.copytree(FIXTURES / "lm", tmp_path / "lm")
    assert isinstance(ClipCapModel.from_pretrained(tmp_path / "model"), ClipCapModel)


def _edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if key.startswith("text_config."):
            config["text_config"][key.removeprefix("text_config.")] = value
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            dict(prefix_length=5),
            r"do not match config.json: shape \(file vs config\) \['mapper.model.0.bias \(64,\) vs \(80,\)",
        ),
        (dict(clip_dim=8), r"do not match config.json: shape .*'mapper.model.0.weight \(64, 16\) vs \(64, 8\)'"),
        (
            dict(mapping="transformer", clip_length=2, num_layers=1),
            r"do not match config.json: missing .*mapper.linear",
        ),
        ({"text_config.n_layer": 3}, r"do not match config.json: missing \['lm.transformer.h.2"),
        ({"text_config.n_layer": 1}, r"do not match config.json: unexpected \['lm.transformer.h.1"),
        ({"text_config.vocab_size": 301}, r"do not match config.json: shape .*'lm.transformer.wte.weight \(300, 32\)"),
        ({"text_config.n_embd": 48}, r"do not match config.json: shape"),
        (dict(prefix_length=10**9), r"cannot be built: RuntimeError: Storage size calculation overflowed"),
        ({"text_config.vocab_size": 10**10, "text_config.n_embd": 10**6}, r"do not match config.json: shape"),
        ({"text_config.n_head": 5}, r"describes a model that cannot be built: ValueError"),
        (dict(tune_lm=True, mapping="transformer", clip_length=3), r"do not match config.json: missing \['mapper"),
    ],
)
def test_weights_that_do_not_match_config_json_are_one_error(tmp_path, changes, message):
    tiny.tiny_model("mlp").save_pretrained(tmp_path)
    _edit_config(tmp_path, **changes)
    start = time.perf_counter()
    with pytest.raises(ClipCapError, match=message):
        ClipCapModel.from_pretrained(tmp_path)
    assert time.perf_counter() - start < 60  # huge configs fail from the shapes, not after trying to allocate


def test_missing_lm_weights_for_a_tuned_lm_is_an_error(tmp_path):
    model = tiny.tiny_model("transformer", tune_lm=False)
    model.save_pretrained(tmp_path, save_lm=False)
    _edit_config(tmp_path, tune_lm=True)
    with pytest.raises(ClipCapError, match="holds no language model weights, but its config says the LM was tuned"):
        ClipCapModel.from_pretrained(tmp_path)


def test_weights_of_another_model_type(tmp_path):
    tiny.tiny_gpt2(300).save_pretrained(tmp_path)
    with pytest.raises(ClipCapError, match='describes a "gpt2" model, not a ClipCap model'):
        ClipCapModel.from_pretrained(tmp_path)
    ClipCapConfig(text_config=tiny.tiny_gpt2(300).config.to_dict(), clip_dim=16, prefix_length=4).save_pretrained(
        tmp_path
    )
    with pytest.raises(ClipCapError, match=r"do not match config.json: missing \['lm.*unexpected \['transformer.h.0"):
        ClipCapModel.from_pretrained(tmp_path)


def test_hub_id_offline_fails_fast_with_hint(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ClipCapError, match=r"'someone/clipcap-coco'.*pass its local directory instead"):
        ClipCapModel.from_pretrained("someone/clipcap-coco")


def test_missing_lm_offline_fails_fast():
    with pytest.raises(ClipCapError, match=r"cannot load language model 'gpt2'.*pass its local directory instead"):
        ClipCapModel(tiny.tiny_config("mlp", lm="gpt2"))


def test_generate_stops_and_pads_per_row():
    model = tiny.tiny_model("mlp")
    clip = torch.randn(6, 16)
    free = model.generate(clip, max_new_tokens=8, stop_token_id=None)
    assert free.shape == (6, 8)  # no stopping: exactly max_new_tokens
    stop = int(free[0, 0])
    ids = model.generate(clip, max_new_tokens=8, stop_token_id=stop)
    ends = [row.index(stop) + 1 if stop in row else 8 for row in free.tolist()]
    assert ids.shape == (6, max(ends))
    for r, end in enumerate(ends):
        assert ids[r, :end].tolist() == free[r, :end].tolist()
        assert all(t == model.pad_token_id for t in ids[r, end:].tolist())


def test_half_precision_round_trip_keeps_dtype(tmp_path):
    model = tiny.tiny_model("mlp").to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    loaded = ClipCapModel.from_pretrained(tmp_path)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    a, b = model.state_dict(), loaded.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
