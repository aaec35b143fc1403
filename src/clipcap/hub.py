"""Resolving HF ids and local paths, with one clear error when a name can be neither read nor downloaded."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

from .errors import ClipCapError


def offline_hint(name: str, what: str) -> str:
    return (
        f"cannot load {what} {name!r}: it is not a local directory and could not be fetched from the "
        f"Hugging Face Hub (offline, or no such repo). Download it where you have network "
        f"(`hf download {name}`) and pass its local directory instead"
    )


@contextlib.contextmanager
def transformers_quiet(errors_only: bool = False):
    """transformers without its progress bars (the library is silent) and, with `errors_only`, its warnings."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    if errors_only:
        hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).exists() or name.count("/") > 1


def resolve_dir(name: str | Path, what: str = "model") -> Path:
    """Return a local directory for `name`: the directory itself, or a Hub snapshot (cached or downloaded)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    name = str(name)
    if looks_like_path(name):
        raise ClipCapError(f"{what} directory not found: {name}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(name))
    except HFValidationError:
        raise ClipCapError(f"{what} directory not found: {name}") from None
    except Exception:  # offline, DNS failure, 404, gated repo: all mean "not reachable from here"
        raise ClipCapError(offline_hint(name, what)) from None


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def _path_like(name: str) -> bool:
    """Whether `name` is written as a filesystem path rather than a Hub id (`org/name` or `name`); unlike
    `looks_like_path` it never looks at the working directory."""
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or Path(name).is_absolute()


def is_hub_id(name: str | None) -> bool:
    """Whether `name` is written as a Hub id, whatever happens to exist in the working directory."""
    return bool(name) and not _path_like(name) and HUB_ID.fullmatch(name) is not None


def resolve_model_dir_name(name: str, model_dir: str | Path | None, what: str, field: str) -> str:
    """What a name recorded in a model dir's config.json (`field`: `clip_model`, `lm`, ...) refers to: an absolute
    path as it is, a relative one inside `model_dir` (the model dir always wins), anything else a Hub id. A config's
    names never resolve against the working directory: a Hub id that a same-named entry there would shadow is read
    from the Hub cache (or downloaded) instead. ClipCapError when a path names nothing."""
    where = f"{model_dir}/config.json" if model_dir is not None else "the model's config.json"
    path = Path(name).expanduser()
    if path.is_absolute():
        if not path.exists():
            raise ClipCapError(f"{where} names {what} {name} ({field}), which does not exist on this machine")
        return str(path)
    if model_dir is not None and Path(model_dir).is_dir() and (Path(model_dir) / path).exists():
        return str(Path(model_dir) / path)
    if not is_hub_id(name):
        raise ClipCapError(
            f"{where} names {what} {name!r} ({field}), which is not in the model dir (a relative path there is "
            "read from the model dir, never the working directory)"
        )
    if not path.exists():
        return name  # transformers reads it from the Hub cache
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name)
    except Exception:  # noqa: BLE001 - offline, 404, gated: the Hub copy is out of reach
        raise ClipCapError(
            f"{where} names {what} {name!r} ({field}), which is not in the model dir and, as a Hub id, cannot be "
            f"fetched (offline, or no such repo); the {name!r} in the working directory is not the model's"
        ) from None


def load_causal_lm(name: str, **kwargs):
    """AutoModelForCausalLM.from_pretrained with a one-line error when `name` is unreachable."""
    from transformers import AutoModelForCausalLM

    try:
        with transformers_quiet():
            return AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:
        if Path(name).expanduser().is_dir():
            raise ClipCapError(f"cannot load the language model from {name}: {e}") from None
        raise ClipCapError(offline_hint(name, "language model")) from None


# What a tokenizer is saved as (any one is enough for AutoTokenizer).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)


def load_tokenizer(name: str | Path):
    """AutoTokenizer.from_pretrained with a one-line error when `name` is unreachable or holds no tokenizer."""
    from transformers import AutoTokenizer

    local = Path(name).expanduser()
    # transformers 5 returns an empty tokenizer for a local dir without tokenizer files instead of failing.
    if local.is_dir() and not any((local / f).is_file() for f in TOKENIZER_FILES):
        raise ClipCapError(f"{name} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...)")
    try:
        return AutoTokenizer.from_pretrained(str(name))
    except (OSError, ValueError) as e:
        if Path(name).expanduser().is_dir():
            raise ClipCapError(f"cannot load a tokenizer from {name}: {e}") from None
        raise ClipCapError(offline_hint(str(name), "tokenizer")) from None
