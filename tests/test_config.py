import json

import pytest

from clipcap import ClipCapConfig, ClipCapError


def test_defaults_follow_the_original():
    config = ClipCapConfig()
    assert (config.prefix_length, config.mapping, config.num_layers, config.clip_dim) == (10, "mlp", 8, 512)
    assert config.tune_lm is True


def test_json_round_trip(tmp_path):
    config = ClipCapConfig(
        mapping="transformer",
        clip_length=40,
        prefix_length=40,
        clip_dim=640,
        tune_lm=False,
        normalize_prefix=True,
        stop_token_id=13,
        lm_config={"model_type": "gpt2"},
    )
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["clip_length"] == 40
    assert ClipCapConfig.from_pretrained(tmp_path) == config


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(mapping="transformer"), "needs clip_length"),
        (dict(mapping="lstm"), "mapping must be one of"),
        (dict(prefix_length=0), "prefix_length must be a positive integer"),
        (dict(mapping="transformer", clip_length=-1), "clip_length must be a positive integer"),
        (dict(token_shape=[50, 768]), "image tokens need the transformer mapping"),
        (dict(mapping="transformer", token_shape=[50]), r"token_shape must be \[tokens, width\]"),
        (dict(mapping="transformer", token_shape="50x768"), r"token_shape must be \[tokens, width\]"),
        (dict(mapping="transformer", token_shape=[0, 768]), "two positive integers"),
        (dict(mapping="transformer", token_shape=[50, 7.5]), "two positive integers"),
        (dict(mapping="transformer", token_shape=[50, True]), "two positive integers"),
        (dict(mapping="transformer", token_shape=[50, 768], token_grid=0), "token_grid must be a positive integer"),
        (dict(mapping="transformer", clip_length=10, token_grid=7), "token_grid is set but token_shape is not"),
        (dict(mapping="transformer", token_shape=[50, 768], normalize_prefix=True), "not image tokens"),
    ],
)
def test_validation_messages(fields, message):
    with pytest.raises(ClipCapError, match=message):
        ClipCapConfig(**fields)


def test_bad_files(tmp_path):
    with pytest.raises(ClipCapError, match="no config.json"):
        ClipCapConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ClipCapError, match="not valid JSON"):
        ClipCapConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"prefix_length": 3, "colour": "red"}))
    with pytest.raises(ClipCapError, match="unknown ClipCapConfig fields: colour"):
        ClipCapConfig.from_pretrained(tmp_path)


def test_token_fields_round_trip(tmp_path):
    config = ClipCapConfig(mapping="transformer", token_shape=(50, 768), token_grid=7, tune_lm=False)
    assert config.token_shape == [50, 768] and config.clip_length is None  # the tokens replace clip_length
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["token_shape"], saved["token_grid"]) == ([50, 768], 7)
    assert ClipCapConfig.from_pretrained(tmp_path) == config
    assert ClipCapConfig().token_shape is None  # a model that reads the pooled embedding
    assert (config.prefix_tokens, ClipCapConfig(prefix_length=7).prefix_tokens) == (50 + 10, 7)
