"""ImageEncoder: any HF CLIP-family model (CLIP, SigLIP, ...) + its image processor, frozen."""

from __future__ import annotations

import contextlib
import functools
import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from .devices import resolve_device
from .errors import ClipCapError
from .hub import offline_hint, transformers_quiet
from .images import check_resize, open_image
from .mapping import pool_tokens

TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json", "spiece.model", "sentencepiece.bpe.model")


def _features(output) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output holds the projected features; 4.x a tensor.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ImageEncoder:
    """A frozen CLIP-family encoder. `encode(images)` -> (B, dim) float32 projected image features,
    L2-normalised when `normalize=True` (recorded by whoever stores them)."""

    def __init__(self, model, processor, tokenizer=None, normalize: bool = False, name: str | None = None):
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        self.tokenizer = tokenizer
        self.normalize = normalize
        self.name = name

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        normalize: bool = False,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> ImageEncoder:
        """Load model + image processor (+ tokenizer when present, for text features) from an HF id or dir."""
        from safetensors import SafetensorError
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        name = str(name_or_path)
        try:
            with transformers_quiet():
                model = AutoModel.from_pretrained(name, dtype=dtype)
                processor = AutoImageProcessor.from_pretrained(name)
        except (OSError, ValueError, SafetensorError) as e:  # SafetensorError: damaged weights
            if Path(name).expanduser().is_dir():
                raise ClipCapError(f"cannot load a CLIP-family encoder from {name}: {e}") from None
            raise ClipCapError(offline_hint(name, "CLIP encoder")) from None
        if not hasattr(model, "get_image_features"):
            raise ClipCapError(f"{name} is a {type(model).__name__}, not a CLIP-family model with image features")
        tokenizer = None  # image-only use needs none
        local = Path(name).expanduser()
        # transformers 5 returns an empty tokenizer for a local dir without tokenizer files: look for them first.
        if not local.is_dir() or any((local / f).is_file() for f in TOKENIZER_FILES):
            with contextlib.suppress(OSError, ValueError):
                tokenizer = AutoTokenizer.from_pretrained(name)
        if device is not None:
            model.to(resolve_device(device))
        return cls(model, processor, tokenizer, normalize=normalize, name=name)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def dim(self) -> int:
        config = self.model.config
        return int(getattr(config, "projection_dim", None) or config.vision_config.hidden_size)

    def preprocess(self, images: list[Image.Image], names: list[str] | None = None) -> torch.Tensor:
        """RGB PIL images -> pixel_values (B, 3, H, W); safe to run in DataLoader workers. An image the processor
        would resize past `limits.MAX_RESIZED_PIXELS` is an ImageLoadError (named by `names`) before it runs."""
        check_resize(images, self.processor, names)
        return self.processor(images=images, return_tensors="pt")["pixel_values"]

    @property
    def token_dim(self) -> int:
        """Width of the vision tower's hidden states (what `encode_pixels_and_tokens` returns per token)."""
        config = self.model.config
        return int(getattr(config, "vision_config", config).hidden_size)

    @torch.no_grad()
    def encode_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = _features(self.model.get_image_features(pixel_values=pixel_values.to(self.device, self.dtype)))
        out = out.float()
        return F.normalize(out, dim=-1) if self.normalize else out

    @torch.no_grad()
    def encode_pixels_and_tokens(
        self, pixel_values: torch.Tensor, grid: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward pass -> (pooled features (B, dim) as `encode_pixels` gives them, the vision tower's last
        hidden states (B, T, token_dim) as float32, the patch grid pooled to `grid` x `grid` when given)."""
        out = self.model.get_image_features(pixel_values=pixel_values.to(self.device, self.dtype))
        hidden = getattr(out, "last_hidden_state", None)
        if hidden is None:
            raise ClipCapError(
                f"{self.name}'s get_image_features returns no hidden states (transformers 5 or newer needed for tokens)"
            )
        pooled = _features(out).float()
        tokens = pool_tokens(hidden, grid).float()
        return (F.normalize(pooled, dim=-1) if self.normalize else pooled), tokens

    def encode(self, images, batch_size: int = 64) -> torch.Tensor:
        """Images (PIL or paths) -> (B, dim) float32 features on the encoder's device."""
        images = [open_image(im) for im in images]
        chunks = [
            self.encode_pixels(self.preprocess(images[i : i + batch_size])) for i in range(0, len(images), batch_size)
        ]
        return torch.cat(chunks) if chunks else torch.empty(0, self.dim, device=self.device)

    @torch.no_grad()
    def encode_text(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """Captions -> (B, dim) float32 text features from the CLIP text tower (for text-only training)."""
        if self.tokenizer is None:
            raise ClipCapError(f"{self.name} has no tokenizer files: text features need one")
        limit = getattr(self.model.config, "text_config", self.model.config).max_position_embeddings
        chunks = []
        for i in range(0, len(texts), batch_size):
            batch = self.tokenizer(
                list(texts[i : i + batch_size]),
                padding=True,
                truncation=True,
                max_length=limit,
                return_tensors="pt",
            ).to(self.device)
            out = _features(self.model.get_text_features(**batch)).float()
            chunks.append(F.normalize(out, dim=-1) if self.normalize else out)
        return torch.cat(chunks) if chunks else torch.empty(0, self.dim, device=self.device)


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@functools.cache
def fingerprint(name: str | Path) -> str | None:
    """A content hash of an encoder's weight files when `name` is a local dir (None otherwise), so an encoder is
    recognised wherever its dir was copied to."""
    path = Path(name).expanduser()
    if not path.is_dir():
        return None
    files = sorted(p for p in path.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file())
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            for chunk in iter(lambda f=f: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def same_encoder(recorded: str, name: str, recorded_fingerprint: str | None = None) -> bool:
    """Whether the encoder recorded as `recorded` (with its fingerprint, when known) is the encoder `name`."""
    if str(recorded) == str(name):
        return True
    if Path(recorded).expanduser().resolve() == Path(name).expanduser().resolve() and Path(name).exists():
        return True
    ours = fingerprint(str(name))
    theirs = recorded_fingerprint or fingerprint(str(recorded))
    return ours is not None and ours == theirs
