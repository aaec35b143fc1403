"""ImageEncoder: any HF CLIP-family model (CLIP, SigLIP, ...) + its image processor; and safe image loading.

`load_image` is the one way every code path opens an image: EXIF orientation applied, every mode converted to RGB,
animated images reduced to their first frame, and unusable files (missing, empty, not an image, truncated, too many
pixels) raised as one per-item error type, `ImageLoadError`, before PIL allocates anything large.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import ClipCapError
from .hub import offline_hint

# PIL's own bomb limit is a warning up to 2x; ours is a hard per-item error checked from the header alone.
MAX_IMAGE_PIXELS = 64_000_000
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json", "spiece.model", "sentencepiece.bpe.model")


class ImageLoadError(ClipCapError):
    """One image could not be used; `source` names it and `reason` says why."""

    def __init__(self, source, reason: str):
        self.source = str(source) if not isinstance(source, Image.Image) else "<PIL image>"
        self.reason = reason
        super().__init__(f"{self.source}: {reason}")


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        # 16-bit modes span 0..65535 whatever the values (a dark image stays dark); I and F carry no range.
        top = 65535.0 if img.mode.startswith("I;16") or (img.mode == "I" and arr.max() > 255) else 255.0
        img = Image.fromarray(np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8))
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))  # transparency shown on white
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def load_image(source: str | Path | Image.Image, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open `source` (path or PIL image) as an RGB image, or raise ImageLoadError with the reason."""
    if isinstance(source, Image.Image):
        img = source
    else:
        path = Path(source)
        if not path.is_file():
            raise ImageLoadError(source, "file not found")
        if path.stat().st_size == 0:
            raise ImageLoadError(source, "empty file (0 bytes)")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(path)
        except Image.DecompressionBombError:
            raise ImageLoadError(source, "too many pixels (decompression bomb)") from None
        except UnidentifiedImageError:
            raise ImageLoadError(source, "not an image (unrecognised format)") from None
        except OSError as e:
            raise ImageLoadError(source, f"unreadable ({e})") from None
    width, height = img.size
    if width * height > max_pixels:
        raise ImageLoadError(source, f"too many pixels ({width}x{height} > {max_pixels}; decompression bomb?)")
    if width == 0 or height == 0:
        raise ImageLoadError(source, "image has no pixels")
    try:
        if getattr(img, "is_animated", False):
            img.seek(0)
        previous, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
        try:
            img.load()
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = previous
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageLoadError(source, f"truncated or corrupt image ({e})") from None


def _features(output) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output holds the projected features; 4.x a tensor.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def pool_tokens(hidden: torch.Tensor, grid: int | None) -> torch.Tensor:
    """A ViT's last hidden states (B, T, D) with the patch grid average-pooled to `grid` x `grid` cells (None, or a
    grid at least the patch grid's side: every token kept). Tokens before the patches (CLIP's class token) are
    kept as they are; the patches must form a square grid after 0 or 1 of them."""
    if grid is None:
        return hidden
    if not isinstance(grid, int) or isinstance(grid, bool) or grid < 1:
        raise ClipCapError(f"the token grid must be a positive integer, got {grid!r}")
    b, t, d = hidden.shape
    for lead in (1, 0):  # a class token is the common case; a square count alone is ambiguous only for t = 1
        side = math.isqrt(t - lead)
        if t - lead > 0 and side * side == t - lead:
            break
    else:
        raise ClipCapError(f"cannot pool {t} image tokens into a grid: they are not a square grid of patches")
    if grid >= side:
        return hidden
    patches = hidden[:, lead:].transpose(1, 2).reshape(b, d, side, side)
    pooled = F.adaptive_avg_pool2d(patches.float(), grid).to(hidden.dtype).flatten(2).transpose(1, 2)
    return torch.cat((hidden[:, :lead], pooled), dim=1)


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
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        name = str(name_or_path)
        try:
            model = AutoModel.from_pretrained(name, dtype=dtype)
            processor = AutoImageProcessor.from_pretrained(name)
        except (OSError, ValueError) as e:
            if Path(name).expanduser().is_dir():
                raise ClipCapError(f"cannot load a CLIP-family encoder from {name}: {e}") from None
            raise ClipCapError(offline_hint(name, "CLIP encoder", "--clip-model")) from None
        if not hasattr(model, "get_image_features"):
            raise ClipCapError(f"{name} is a {type(model).__name__}, not a CLIP-family model with image features")
        tokenizer = None  # image-only use needs none
        local = Path(name).expanduser()
        # transformers 5 returns an empty tokenizer for a local dir without tokenizer files: look for them first.
        if not local.is_dir() or any((local / f).is_file() for f in TOKENIZER_FILES):
            with contextlib.suppress(OSError, ValueError):
                tokenizer = AutoTokenizer.from_pretrained(name)
        if device is not None:
            model.to(device)
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

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """RGB PIL images -> pixel_values (B, 3, H, W); safe to run in DataLoader workers."""
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
        images = [load_image(im) for im in images]
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
