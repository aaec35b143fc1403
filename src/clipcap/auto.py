"""Registers the ClipCap classes with transformers' Auto classes, so that `AutoConfig`, `AutoModel`,
`AutoModelForImageTextToText`, `AutoProcessor` and `pipeline("image-text-to-text", model=DIR)` load clipcap dirs
without `trust_remote_code`.

`import clipcap` registers the config at once and the model and processor classes when the first ClipCap config is
built, which every Auto class and the pipeline do before they look a model class up: the model classes import
transformers' modeling code (and accelerate with it), which `import clipcap` alone must not pull in.
"""

from __future__ import annotations

from transformers import AutoConfig

from . import config
from .config import MODEL_TYPE, ClipCapConfig


def register() -> None:
    """Register every ClipCap class now (idempotent)."""
    import transformers
    from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor

    from .model import ClipCapForImageCaptioning, ClipCapModel
    from .processing import ClipCapProcessor

    AutoConfig.register(MODEL_TYPE, ClipCapConfig, exist_ok=True)
    AutoModel.register(ClipCapConfig, ClipCapModel, exist_ok=True)
    AutoModelForImageTextToText.register(ClipCapConfig, ClipCapForImageCaptioning, exist_ok=True)
    AutoProcessor.register(ClipCapConfig, ClipCapProcessor, exist_ok=True)
    # transformers 4 serves captioning through pipeline("image-to-text"), which loads AutoModelForVision2Seq.
    vision2seq = getattr(transformers, "AutoModelForVision2Seq", None)
    if vision2seq is not None:
        vision2seq.register(ClipCapConfig, ClipCapForImageCaptioning, exist_ok=True)


def register_lazily() -> None:
    """Register the config now and the rest when the first ClipCapConfig is built."""
    AutoConfig.register(MODEL_TYPE, ClipCapConfig, exist_ok=True)
    if register not in config.ON_FIRST_CONFIG:
        config.ON_FIRST_CONFIG.append(register)
