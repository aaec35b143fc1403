"""ClipCapConfig: the description of a ClipCap model, a transformers config (`model_type = "clipcap"`).

The causal LM's config is nested as `text_config` and, in a complete captioning model, the image encoder's vision
config as `vision_config`, the way composite transformers models nest theirs. Every field is type-checked when the
config is built or loaded, and inconsistent fields are refused, with one ClipCapError naming the field and value.
Fields this version does not know are kept (a dir saved by a newer version still loads). config.json files written
by clipcap 0.1 (no `model_type`, the LM's config as `lm_config`) load as well.

This file is copied into every saved model dir (with model.py, mapping.py, hub.py, errors.py and processing.py) so
that `trust_remote_code=True` loads it with only transformers installed: it imports nothing from clipcap by name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import AutoConfig, PretrainedConfig

from .errors import ClipCapError
from .hub import looks_like_path, offline_hint

CONFIG_NAME = "config.json"
MODEL_TYPE = "clipcap"
MAPPINGS = ("mlp", "transformer")
DEFAULT_CLIP = "openai/clip-vit-base-patch32"
# Called (then dropped) when the first ClipCapConfig is built: clipcap registers its model classes with the Auto
# classes here (auto.py). Empty in a copy loaded with trust_remote_code.
ON_FIRST_CONFIG: list = []
# Keys that describe a file rather than the model: ignored when two configs are compared.
_BOOKKEEPING = frozenset({"transformers_version", "_name_or_path", "auto_map", "architectures", "dtype"})


def _describe(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def _sub_config(name: str, value: Any) -> PretrainedConfig | None:
    """A nested config from a dict with `model_type` (as saved in config.json) or a config object."""
    if value is None or isinstance(value, PretrainedConfig):
        return value
    if not isinstance(value, dict):
        raise ClipCapError(f"{name} must be a JSON object (a transformers config), got {_describe(value)}")
    model_type = value.get("model_type")
    if not isinstance(model_type, str):
        raise ClipCapError(f'{name} must name its model_type (e.g. "gpt2"), got {_describe(model_type)}')
    fields = {k: v for k, v in value.items() if k != "model_type"}
    try:
        return AutoConfig.for_model(model_type, **fields)
    except Exception as e:  # noqa: BLE001 - any config class may reject untrusted values in its own way
        raise ClipCapError(f"{name} is not a valid {model_type!r} config: {_reason(e)}") from None


def _reason(error: Exception) -> str:
    """An exception as one short line (some span several, or list every model type transformers knows)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _check_text(name: str, value: Any) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ClipCapError(f"{name} is not valid text (it holds a lone surrogate): {_describe(value)}") from None


# transformers' own fields a config.json may carry, and the JSON type each must have
GENERIC_FIELDS = {
    "id2label": dict,
    "label2id": dict,
    "architectures": list,
    "auto_map": dict,
    "transformers_version": str,
}


def _check_generic(kwargs: dict[str, Any]) -> None:
    for name, kind in GENERIC_FIELDS.items():
        value = kwargs.get(name)
        if value is not None and not isinstance(value, kind):
            raise ClipCapError(f"{name} must be a JSON {_JSON_KIND[kind]} or null, got {_describe(value)}")
    for name in ("dtype", "torch_dtype"):
        value = kwargs.get(name)
        if value is None or type(value).__module__ == "torch":
            continue
        import torch

        if not isinstance(value, str) or not isinstance(getattr(torch, value, None), torch.dtype):
            raise ClipCapError(f'{name} must name a torch dtype (e.g. "float32") or be null, got {_describe(value)}')


_JSON_KIND = {dict: "object", list: "array", str: "string"}


def _check_int(name: str, value: Any, minimum: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        kind = "a positive integer" if minimum == 1 else "a non-negative integer"
        raise ClipCapError(f"{name} must be {kind}{' or null' if optional else ''}, got {_describe(value)}")


class ClipCapConfig(PretrainedConfig):
    """Configuration of a ClipCap model (docs/design.md §2); defaults follow the original implementation.

    lm: HF id or dir of the causal LM (its architecture is `text_config`). clip_model: the encoder that made the
    embeddings (HF id, or a dir relative to the model dir). clip_dim: its embedding size. prefix_length: k.
    clip_length: the Transformer mapper's input length. mapping: "mlp" or "transformer". tune_lm: whether the LM is
    trained. normalize_prefix: L2-normalise embeddings before the mapper. stop_token_id: token that ends a caption
    (None: never stop). pad_token_id: id written after it. token_shape: [T, D] of the vision tower's last hidden
    states the mapper reads instead of one pooled embedding (None: pooled embeddings).
    token_grid: the side of the grid their patches were pooled to (None: every token). vision_config: the encoder's
    vision tower, in a complete captioning model only. adapter: the model dir's subfolder holding a PEFT LoRA adapter
    of the LM (None: none)."""

    model_type = MODEL_TYPE
    sub_configs = {"text_config": AutoConfig, "vision_config": AutoConfig}

    def __init__(
        self,
        lm: str = "gpt2",
        clip_model: str | None = DEFAULT_CLIP,
        clip_dim: int = 512,
        prefix_length: int = 10,
        clip_length: int | None = None,
        mapping: str = "mlp",
        num_layers: int = 8,
        num_heads: int = 8,
        tune_lm: bool = True,
        normalize_prefix: bool = False,
        stop_token_id: int | None = None,
        pad_token_id: int | None = None,
        adapter: str | None = None,
        token_shape: list[int] | None = None,
        token_grid: int | None = None,
        text_config: dict | PretrainedConfig | None = None,
        vision_config: dict | PretrainedConfig | None = None,
        **kwargs,
    ):
        while ON_FIRST_CONFIG:
            ON_FIRST_CONFIG.pop()()
        if "lm_config" in kwargs:  # clipcap 0.1's name for text_config
            legacy = kwargs.pop("lm_config")
            if text_config is not None and legacy is not None:
                raise ClipCapError("the config has both text_config and lm_config (its clipcap 0.1 name): keep one")
            text_config = legacy if text_config is None else text_config
        self.lm = lm
        self.clip_model = clip_model
        self.clip_dim = clip_dim
        self.prefix_length = prefix_length
        self.clip_length = clip_length
        self.mapping = mapping
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.tune_lm = tune_lm
        self.normalize_prefix = normalize_prefix
        self.stop_token_id = stop_token_id
        self.adapter = adapter
        self.token_shape = token_shape
        self.token_grid = token_grid
        self.text_config = _sub_config("text_config", text_config)
        self.vision_config = _sub_config("vision_config", vision_config)
        _check_generic(kwargs)
        try:
            # pad_token_id goes through the base class: transformers 4 resets it there.
            super().__init__(pad_token_id=pad_token_id, **kwargs)
        except ClipCapError:
            raise
        except Exception as e:  # noqa: BLE001 - transformers validates its own generic fields (architectures, ...)
            raise ClipCapError(f"invalid config field: {_reason(e)}") from None
        self._check_fields()
        try:  # transformers' own fields (dtype, architectures, id2label, ...) must survive being written back
            self.to_json_string()
        except Exception as e:  # noqa: BLE001 - whatever serialising a wrongly typed generic field raises
            raise ClipCapError(f"invalid config field ({type(e).__name__}: {_reason(e)})") from None

    def _check_fields(self) -> None:
        """Raise ClipCapError when a field has the wrong type or contradicts another."""
        if not isinstance(self.lm, str) or not self.lm:
            raise ClipCapError(f"lm must be a non-empty string (an HF id or a directory), got {_describe(self.lm)}")
        if self.clip_model is not None and (not isinstance(self.clip_model, str) or not self.clip_model):
            raise ClipCapError(f"clip_model must be a non-empty string or null, got {_describe(self.clip_model)}")
        for name in ("lm", "clip_model"):
            if getattr(self, name) is not None:
                _check_text(name, getattr(self, name))
        adapter = self.adapter
        if adapter is not None and (
            not isinstance(adapter, str) or adapter in ("", ".", "..") or "/" in adapter or "\\" in adapter
        ):
            raise ClipCapError(
                f"adapter must name a folder inside the model dir (or be null), got {_describe(adapter)}"
            )
        if adapter is not None:
            _check_text("adapter", adapter)
            if self.tune_lm:
                raise ClipCapError("a LoRA adapter goes with an LM that was not tuned (tune_lm false)")
        if not isinstance(self.mapping, str) or self.mapping not in MAPPINGS:
            raise ClipCapError(f"mapping must be one of {MAPPINGS}, got {_describe(self.mapping)}")
        for name in ("clip_dim", "prefix_length", "num_layers", "num_heads"):
            _check_int(name, getattr(self, name), 1)
        _check_int("clip_length", self.clip_length, 1, optional=True)
        for name in ("tune_lm", "normalize_prefix"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ClipCapError(f"{name} must be true or false (a JSON boolean), got {_describe(value)}")
        for name in ("stop_token_id", "pad_token_id"):
            _check_int(name, getattr(self, name), 0, optional=True)
        if self.mapping == "transformer" and self.clip_length is None and self.token_shape is None:
            raise ClipCapError("the transformer mapping needs clip_length (the original used 10, or 40 with k=40)")
        self._check_tokens()
        if self.text_config is not None:
            vocab = getattr(self.text_config, "vocab_size", None)
            for name in ("stop_token_id", "pad_token_id"):
                value = getattr(self, name)
                if isinstance(vocab, int) and value is not None and value >= vocab:
                    raise ClipCapError(f"{name} {value} is outside the language model's vocabulary of {vocab} tokens")
            hidden = getattr(self.text_config, "hidden_size", None)
            if self.mapping == "transformer" and isinstance(hidden, int) and hidden % self.num_heads:
                raise ClipCapError(
                    f"num_heads {self.num_heads} does not divide the language model's hidden size {hidden}"
                )
        if self.vision_config is not None:
            out = getattr(self.vision_config, "projection_dim", None)
            if out != self.clip_dim:
                raise ClipCapError(
                    f"vision_config.projection_dim {_describe(out)} differs from clip_dim {self.clip_dim}: "
                    "the vision tower must produce the embeddings the mapper takes"
                )

    def _check_tokens(self) -> None:
        shape, grid = self.token_shape, self.token_grid
        if shape is None:
            if grid is not None:
                raise ClipCapError(
                    f"token_grid is set ({_describe(grid)}) but token_shape is not: a grid needs image tokens"
                )
            return
        if not isinstance(shape, (list, tuple)) or len(shape) != 2:
            raise ClipCapError(f"token_shape must be [tokens, width] or null, got {_describe(shape)}")
        if any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in shape):
            raise ClipCapError(f"token_shape must hold two positive integers, got {_describe(list(shape))}")
        self.token_shape = [int(v) for v in shape]
        _check_int("token_grid", grid, 1, optional=True)
        if self.normalize_prefix:
            raise ClipCapError("normalize_prefix applies to pooled embeddings, not image tokens")

    @property
    def prefix_tokens(self) -> int:
        """How many vectors the mapper puts before the caption: k, plus one per image token when the Transformer
        mapper reads tokens."""
        transformer_tokens = self.token_shape is not None and self.mapping == "transformer"
        return self.prefix_length + (self.token_shape[0] if transformer_tokens else 0)

    @property
    def mapper_input_shape(self) -> tuple[int, ...]:
        """One input of the mapper without the batch: (clip_dim,), or (T, D) = token_shape for a model that reads
        image tokens."""
        return (self.clip_dim,) if self.token_shape is None else tuple(self.token_shape)

    def check_mapper_input(self, shape: tuple[int, ...]) -> None:
        """Raise ClipCapError unless `shape` is (B, *mapper_input_shape)."""
        expected = self.mapper_input_shape
        if tuple(shape[1:]) != expected or len(shape) != len(expected) + 1:
            what = "image tokens" if self.token_shape is not None else "CLIP embeddings"
            raise ClipCapError(
                f"this model reads {what} of shape (B, {', '.join(map(str, expected))}), got {tuple(shape)}"
            )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ClipCapConfig) and _comparable(self.to_dict()) == _comparable(other.to_dict())

    __hash__ = None

    @classmethod
    def _dict_from_json_file(cls, json_file: str | Path) -> dict[str, Any]:
        """config.json as a dict, or one ClipCapError saying why it cannot be (transformers reads files here)."""
        try:
            data = json.loads(Path(json_file).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ClipCapError(f"no {CONFIG_NAME} at {json_file}") from None
        except (OSError, ValueError, RecursionError) as e:  # malformed, not UTF-8, nested beyond the parser's depth
            raise ClipCapError(f"{json_file} is not valid JSON: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ClipCapError(f"{json_file} must hold a JSON object, got {_describe(data)}")
        model_type = data.get("model_type", MODEL_TYPE)  # clipcap 0.1 wrote none
        if model_type != MODEL_TYPE:
            raise ClipCapError(
                f'{json_file} describes a {_describe(model_type)} model, not a ClipCap model (model_type "clipcap")'
            )
        return data

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs) -> ClipCapConfig:
        """Load config.json from a model dir, a config file or a Hub repo (transformers' loader); a missing or
        unusable config is one ClipCapError."""
        name = str(pretrained_model_name_or_path)
        path = Path(name).expanduser()
        if path.is_dir() and not (path / CONFIG_NAME).is_file():
            raise ClipCapError(f"{path} is not a ClipCap model dir (no {CONFIG_NAME})")
        if not path.exists() and looks_like_path(name):
            raise ClipCapError(f"model directory not found: {name}")
        try:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        except ClipCapError as e:
            if str(path) in str(e) or not path.exists():
                raise
            raise ClipCapError(f"{path / CONFIG_NAME if path.is_dir() else path}: {e}") from None
        except (OSError, ValueError) as e:
            if path.exists():
                raise ClipCapError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
            raise ClipCapError(offline_hint(name, "model")) from None


def _comparable(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _comparable(v) for k, v in data.items() if k not in _BOOKKEEPING}
    return data


ClipCapConfig.register_for_auto_class()
