"""Opening images: the one function every code path uses, for files, bytes (uploads, tar members) and PIL images.

`open_image` applies EXIF orientation, converts every mode to RGB (transparency shown on white, 16-bit scaled),
reduces animated images to their first frame, and refuses unusable input (missing, empty, not an image, a format not
allowed, truncated, too many pixels, too elongated) with one per-item error, `ImageLoadError`, whose `kind` says which —
before PIL allocates anything large (the size is read from the header). `check_resize` refuses, before an image
processor runs, an image it would resize to more than `limits.MAX_RESIZED_PIXELS`.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import ClipCapError
from .limits import MAX_ASPECT_RATIO, MAX_IMAGE_PIXELS, MAX_RESIZED_PIXELS, resized_size

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# ImageLoadError.kind values
MISSING, EMPTY, NOT_AN_IMAGE, FORMAT, TOO_LARGE, CORRUPT = (
    "missing",
    "empty",
    "not an image",
    "format not allowed",
    "too large",
    "corrupt",
)


class ImageLoadError(ClipCapError):
    """One image could not be used; `source` names it, `reason` says why and `kind` classifies it."""

    def __init__(self, source, reason: str, kind: str = CORRUPT):
        self.source = "<PIL image>" if isinstance(source, Image.Image) else str(source)
        self.reason = reason
        self.kind = kind
        super().__init__(f"{self.source}: {reason}")


def is_image_file(path: Path) -> bool:
    """Whether `path` names an image by its extension (what folder and glob expansion pick)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


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


def _open(data, name: str, formats: tuple[str, ...] | None) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(data, formats=formats)
    except Image.DecompressionBombError:
        raise ImageLoadError(name, "too many pixels (decompression bomb)", TOO_LARGE) from None
    except UnidentifiedImageError:
        if formats is None:
            raise ImageLoadError(name, "not an image (unrecognised format)", NOT_AN_IMAGE) from None
        accepted = ", ".join(formats)
        raise ImageLoadError(name, f"not a supported image (accepted: {accepted})", FORMAT) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageLoadError(name, f"unreadable ({e})", CORRUPT) from None


def open_image(
    source: str | Path | bytes | Image.Image,
    name: str | None = None,
    max_pixels: int = MAX_IMAGE_PIXELS,
    formats: tuple[str, ...] | None = None,
) -> Image.Image:
    """`source` (a path, the bytes of an image file, or a PIL image) as an RGB image, or ImageLoadError.

    `name` is how errors refer to bytes or a PIL image; `formats` restricts the accepted PIL formats (the server
    accepts only what browsers produce)."""
    if isinstance(source, Image.Image):
        img = source
        name = name or "<PIL image>"
    elif isinstance(source, (bytes, bytearray, memoryview)):
        name = name or "<bytes>"
        if not len(source):
            raise ImageLoadError(name, "empty file (0 bytes)", EMPTY)
        img = _open(io.BytesIO(bytes(source)), name, formats)
    else:
        path = Path(source)
        name = name or str(source)
        if not path.is_file():
            if path.is_symlink() and not path.exists():
                raise ImageLoadError(name, "broken symbolic link", MISSING)
            raise ImageLoadError(name, "not a regular file" if path.exists() else "file not found", MISSING)
        try:
            empty = path.stat().st_size == 0
        except OSError as e:
            raise ImageLoadError(name, f"unreadable ({e})", CORRUPT) from None
        if empty:
            raise ImageLoadError(name, "empty file (0 bytes)", EMPTY)
        img = _open(path, name, formats)
    width, height = img.size
    if width * height > max_pixels:
        raise ImageLoadError(name, f"too many pixels ({width}x{height} > {max_pixels}; decompression bomb?)", TOO_LARGE)
    if width == 0 or height == 0:
        raise ImageLoadError(name, "image has no pixels", CORRUPT)
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ImageLoadError(
            name, f"too elongated ({width}x{height}: sides more than {MAX_ASPECT_RATIO} to 1 apart)", TOO_LARGE
        )
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
    except (OSError, SyntaxError, ValueError, TypeError, Image.DecompressionBombError) as e:
        raise ImageLoadError(name, f"truncated or corrupt image ({e})", CORRUPT) from None


def check_resize(images: list[Image.Image], processor, names: list[str] | None = None) -> None:
    """ImageLoadError (too large) for the first image that `processor`'s resize would make more than
    MAX_RESIZED_PIXELS of, computed from its settings before it runs."""
    if not getattr(processor, "do_resize", True):
        return
    for n, img in enumerate(images):
        width, height = img.size
        size = resized_size(getattr(processor, "size", None), width, height)
        if size is not None and size[0] * size[1] > MAX_RESIZED_PIXELS:
            name = names[n] if names else "<PIL image>"
            resized = f"{size[0]}x{size[1]} (over {MAX_RESIZED_PIXELS} pixels)"
            raise ImageLoadError(name, f"resized for the encoder, {width}x{height} would be {resized}", TOO_LARGE)
