"""ClipCapConfig: the plain-data description of a ClipCap model, stored as config.json in a model dir."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ClipCapError

CONFIG_NAME = "config.json"
MAPPINGS = ("mlp", "transformer")


@dataclass
class ClipCapConfig:
    """Configuration of a ClipCap model (DESIGN §2); defaults follow the original implementation."""

    lm: str = "gpt2"  # HF id or path of the causal LM
    clip_model: str | None = "openai/clip-vit-base-patch32"  # encoder that made the embeddings
    clip_dim: int = 512
    prefix_length: int = 10  # k
    clip_length: int | None = None  # transformer mapper only
    mapping: str = "mlp"
    num_layers: int = 8
    num_heads: int = 8
    tune_lm: bool = True
    normalize_prefix: bool = False
    stop_token_id: int | None = None
    pad_token_id: int | None = None
    # Image tokens instead of one pooled embedding (transformer mapping only): [T, D] of the vision tower's last
    # hidden states the mapper reads, and the grid their patches were pooled to (None: every token).
    token_shape: list[int] | None = None
    token_grid: int | None = None
    # The LM's own config (AutoConfig dict), so a saved model dir rebuilds its LM without the network.
    lm_config: dict[str, Any] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ClipCapError with a clear message when fields are inconsistent."""
        if self.mapping not in MAPPINGS:
            raise ClipCapError(f"mapping must be one of {MAPPINGS}, got {self.mapping!r}")
        for name in ("clip_dim", "prefix_length", "num_layers", "num_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ClipCapError(f"{name} must be a positive integer, got {value!r}")
        if self.mapping == "transformer" and self.token_shape is None:
            if self.clip_length is None:
                raise ClipCapError("the transformer mapping needs clip_length (the original used 10, or 40 with k=40)")
            if not isinstance(self.clip_length, int) or self.clip_length < 1:
                raise ClipCapError(f"clip_length must be a positive integer, got {self.clip_length!r}")
        if self.token_shape is not None:
            self._validate_tokens()
        elif self.token_grid is not None:
            raise ClipCapError("token_grid is set but token_shape is not: a token grid needs image tokens")

    def _validate_tokens(self) -> None:
        shape = self.token_shape
        if not isinstance(shape, (list, tuple)) or len(shape) != 2:
            raise ClipCapError(f"token_shape must be [tokens, width], got {shape!r}")
        if any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in shape):
            raise ClipCapError(f"token_shape must hold two positive integers, got {shape!r}")
        self.token_shape = [int(v) for v in shape]
        if self.mapping != "transformer":
            raise ClipCapError("image tokens need the transformer mapping (the MLP mapper reads one vector)")
        grid = self.token_grid
        if grid is not None and (not isinstance(grid, int) or isinstance(grid, bool) or grid < 1):
            raise ClipCapError(f"token_grid must be a positive integer or null, got {grid!r}")
        if self.normalize_prefix:
            raise ClipCapError("normalize_prefix applies to pooled embeddings, not image tokens")

    @property
    def prefix_tokens(self) -> int:
        """How many vectors the mapper puts before the caption: k, plus one per image token when it reads tokens."""
        return self.prefix_length + (self.token_shape[0] if self.token_shape is not None else 0)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClipCapConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ClipCapError(f"unknown ClipCapConfig fields: {', '.join(unknown)}")
        return cls(**data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, directory: str | Path) -> None:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_NAME).write_text(self.to_json_string())

    @classmethod
    def from_json_file(cls, file: str | Path) -> ClipCapConfig:
        try:
            data = json.loads(Path(file).read_text())
        except FileNotFoundError:
            raise ClipCapError(f"no {CONFIG_NAME} at {file}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ClipCapError(f"{file} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ClipCapError(f"{file} must hold a JSON object")
        return cls.from_dict(data)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> ClipCapConfig:
        return cls.from_json_file(Path(directory) / CONFIG_NAME)
