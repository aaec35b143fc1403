"""ClipCap: CLIP prefix for image captioning (Mokady, Hertz, Bermano 2021), HF-native.

The model classes and Captioner are imported on first use (`clipcap.ClipCapModel`, `from clipcap import
Captioner`), so `import clipcap` stays light; it registers ClipCap with transformers' Auto classes (see auto.py).
"""

from importlib import import_module

from .auto import register as register_auto_classes
from .auto import register_lazily as _register_lazily
from .config import ClipCapConfig
from .errors import ClipCapError
from .version import __version__

_LAZY = {
    "Captioner": ".captioner",
    "ClipCapModel": ".model",
    "ClipCapForImageCaptioning": ".model",
    "ClipCapProcessor": ".processing",
}

__all__ = ["ClipCapConfig", "ClipCapError", "__version__", "register_auto_classes", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_register_lazily()
