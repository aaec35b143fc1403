"""ClipCapConfig: a transformers config with checked fields, kept unknown fields and clipcap 0.1 compatibility."""

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from transformers import AutoConfig, GPT2Config, PretrainedConfig

from clipcap import ClipCapConfig, ClipCapError

FIXTURES = Path(__file__).parent / "fixtures" / "clipcap-0.1"


def test_defaults_follow_the_original():
    config = ClipCapConfig()
    assert (config.prefix_length, config.mapping, config.num_layers, config.clip_dim) == (10, "mlp", 8, 512)
    assert config.tune_lm is True and config.normalize_prefix is False
    assert isinstance(config, PretrainedConfig) and config.model_type == "clipcap"


def test_json_round_trip_with_nested_text_config(tmp_path):
    config = ClipCapConfig(
        mapping="transformer",
        clip_length=40,
        prefix_length=40,
        clip_dim=640,
        tune_lm=False,
        normalize_prefix=True,
        stop_token_id=13,
        num_heads=4,
        text_config={"model_type": "gpt2", "n_embd": 32, "vocab_size": 300},
    )
    assert isinstance(config.text_config, GPT2Config) and config.text_config.n_embd == 32
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "clipcap" and saved["clip_length"] == 40
    assert saved["text_config"]["model_type"] == "gpt2" and saved["text_config"]["n_embd"] == 32
    assert ClipCapConfig.from_pretrained(tmp_path) == config
    loaded = AutoConfig.from_pretrained(tmp_path)  # registered by `import clipcap`
    assert type(loaded) is ClipCapConfig and loaded.model_type == "clipcap" and loaded == config
    assert ClipCapConfig.from_pretrained(tmp_path) != ClipCapConfig.from_dict({**saved, "clip_length": 41})


def test_unknown_fields_are_kept(tmp_path):
    """A dir written by a newer version loads in this one, and re-saving keeps what it did not understand."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clipcap", "prefix_length": 3, "colour": "red"}))
    config = ClipCapConfig.from_pretrained(tmp_path)
    assert (config.prefix_length, config.colour) == (3, "red")
    config.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["colour"] == "red"


def test_clipcap_0_1_config_loads():
    config = ClipCapConfig.from_pretrained(FIXTURES / "mlp-tuned")
    legacy = json.loads((FIXTURES / "mlp-tuned" / "config.json").read_text())
    assert "model_type" not in legacy and "lm_config" in legacy
    assert not hasattr(config, "lm_config") and config.text_config.to_dict()["n_embd"] == legacy["lm_config"]["n_embd"]
    assert (config.clip_dim, config.prefix_length, config.stop_token_id) == (8, 2, legacy["stop_token_id"])


TEXT = {"model_type": "gpt2", "n_embd": 32, "n_head": 2, "vocab_size": 300}


@pytest.mark.parametrize(
    "fields, message",
    [
        # wrongly typed: strings that look right, numbers as bools and back, floats, containers
        (dict(normalize_prefix="false"), r'normalize_prefix must be true or false \(a JSON boolean\), got "false"'),
        (dict(normalize_prefix=0), "normalize_prefix must be true or false"),
        (dict(tune_lm="true"), 'tune_lm must be true or false .*got "true"'),
        (dict(tune_lm=None), "tune_lm must be true or false .*got null"),
        (dict(clip_dim="512"), 'clip_dim must be a positive integer, got "512"'),
        (dict(clip_dim=True), "clip_dim must be a positive integer, got true"),
        (dict(prefix_length=2.5), "prefix_length must be a positive integer, got 2.5"),
        (dict(prefix_length=0), "prefix_length must be a positive integer, got 0"),
        (dict(num_layers=[8]), "num_layers must be a positive integer, got list"),
        (dict(num_heads=-2), "num_heads must be a positive integer"),
        (dict(mapping="lstm"), "mapping must be one of"),
        (dict(mapping=1), "mapping must be one of .*got 1"),
        (dict(lm=""), "lm must be a non-empty string"),
        (dict(lm=["gpt2"]), "lm must be a non-empty string"),
        (dict(clip_model=5), "clip_model must be a non-empty string or null, got 5"),
        (dict(stop_token_id=-1), "stop_token_id must be a non-negative integer or null, got -1"),
        (dict(stop_token_id="13"), "stop_token_id must be a non-negative integer or null"),
        (dict(pad_token_id=1.0), "pad_token_id must be a non-negative integer or null, got 1.0"),
        (dict(mapping="transformer", clip_length="10"), "clip_length must be a positive integer or null"),
        (dict(text_config="gpt2"), 'text_config must be a JSON object .*got "gpt2"'),
        (dict(text_config={"n_embd": 32}), "text_config must name its model_type"),
        (dict(text_config={"model_type": "no-such-lm"}), "text_config is not a valid 'no-such-lm' config"),
        (dict(text_config={**TEXT, "n_embd": "32"}), "text_config is not a valid 'gpt2' config"),
        (dict(vision_config=[1, 2]), "vision_config must be a JSON object .*got list"),
        (dict(dtype="float99"), 'dtype must name a torch dtype .*got "float99"'),
        (dict(dtype=[]), "dtype must name a torch dtype .*got list"),
        (dict(id2label="x"), 'id2label must be a JSON object or null, got "x"'),
        (dict(architectures="ClipCapModel"), "architectures must be a JSON array or null"),
        (dict(lm="gpt\ud800"), "lm is not valid text"),
        # mutually inconsistent
        (dict(mapping="transformer"), "needs clip_length"),
        (dict(stop_token_id=300, text_config=TEXT), "stop_token_id 300 is outside the language model's vocabulary"),
        (dict(pad_token_id=999, text_config=TEXT), "pad_token_id 999 is outside"),
        (dict(mapping="transformer", clip_length=2, num_heads=3, text_config=TEXT), "num_heads 3 does not divide"),
        (dict(text_config=TEXT, lm_config=TEXT), "both text_config and lm_config"),
        (
            dict(clip_dim=16, vision_config={"model_type": "clip_vision_model", "projection_dim": 8}),
            "vision_config.projection_dim 8 differs from clip_dim 16",
        ),
        # image tokens
        (dict(mapping="transformer", token_shape=[50]), r"token_shape must be \[tokens, width\]"),
        (dict(mapping="transformer", token_shape="50x768"), r"token_shape must be \[tokens, width\]"),
        (dict(mapping="transformer", token_shape=[0, 768]), "two positive integers"),
        (dict(mapping="transformer", token_shape=[50, 7.5]), "two positive integers"),
        (dict(mapping="transformer", token_shape=[50, True]), "two positive integers"),
        (dict(mapping="transformer", token_shape=[50, 768], token_grid=0), "token_grid must be a positive integer"),
        (dict(mapping="transformer", clip_length=10, token_grid=7), r"token_grid is set \(7\) but token_shape is not"),
        (dict(mapping="transformer", token_shape=[50, 768], normalize_prefix=True), "not image tokens"),
    ],
)
def test_every_field_is_checked(fields, message):
    with pytest.raises(ClipCapError, match=message):
        ClipCapConfig(**fields)


def test_bad_files(tmp_path):
    with pytest.raises(ClipCapError, match=r"not a ClipCap model dir \(no config.json\)"):
        ClipCapConfig.from_pretrained(tmp_path)
    with pytest.raises(ClipCapError, match="model directory not found"):
        ClipCapConfig.from_pretrained(tmp_path / "missing")
    config = tmp_path / "config.json"
    for content, message in [
        ("{not json", "not valid JSON"),
        ("", "not valid JSON"),
        ("[1, 2]", "must hold a JSON object, got list"),
        ('"clipcap"', 'must hold a JSON object, got "clipcap"'),
        (json.dumps({"model_type": "gpt2", "n_embd": 32}), 'describes a "gpt2" model, not a ClipCap model'),
        (json.dumps({"model_type": "clipcap", "normalize_prefix": "false"}), "normalize_prefix must be true or false"),
    ]:
        config.write_text(content)
        with pytest.raises(ClipCapError, match=message):
            ClipCapConfig.from_pretrained(tmp_path)
    config.write_text(json.dumps({"model_type": "clipcap", "normalize_prefix": "false"}))
    with pytest.raises(ClipCapError, match=r"config.json: normalize_prefix must be true or false"):
        ClipCapConfig.from_pretrained(tmp_path)  # a field's error names the file it came from
    config.write_bytes(b'{"lm": "\xff\xfe"}')
    with pytest.raises(ClipCapError, match="not valid JSON"):
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


def test_hub_id_offline_is_one_clear_error():
    with pytest.raises(ClipCapError, match=r"'someone/clipcap-coco'.*pass its local directory instead"):
        ClipCapConfig.from_pretrained("someone/clipcap-coco")


# -- property tests: any config.json is a loaded config or one ClipCapError ---------------------------------------
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
FIELDS = [
    "lm",
    "clip_model",
    "clip_dim",
    "prefix_length",
    "clip_length",
    "mapping",
    "num_layers",
    "num_heads",
    "tune_lm",
    "normalize_prefix",
    "stop_token_id",
    "pad_token_id",
    "token_shape",
    "token_grid",
    "text_config",
    "vision_config",
    "lm_config",
    "model_type",
    "dtype",
    "id2label",
    "architectures",
    "auto_map",
]
VALID = ClipCapConfig(clip_dim=16, prefix_length=4, stop_token_id=0, text_config=TEXT).to_dict()


def _load(raw: bytes):
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_bytes(raw)
        try:
            assert isinstance(ClipCapConfig.from_pretrained(tmp), ClipCapConfig)
        except ClipCapError as e:
            assert str(e) and "\n" not in str(e)


@given(JSON)
def test_any_json_document_loads_or_is_refused(value):
    _load(json.dumps(value).encode())


@given(
    st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=10), JSON, max_size=4),
    st.dictionaries(
        st.sampled_from(sorted(TEXT) + ["n_layer", "n_positions", "tie_word_embeddings"]), JSON, max_size=2
    ),
)
def test_valid_config_with_fields_replaced_loads_or_is_refused(changes, text_changes):
    data = {**VALID, **changes}
    if text_changes and isinstance(data.get("text_config"), dict):
        data["text_config"] = {**data["text_config"], **text_changes}
    _load(json.dumps(data).encode())


@given(st.binary(max_size=200))
def test_any_bytes_load_or_are_refused(raw):
    _load(raw)
