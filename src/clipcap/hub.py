"""Resolving HF ids and local paths, with one clear error when a name can be neither read nor downloaded."""

from __future__ import annotations

from pathlib import Path

from .errors import ClipCapError


def offline_hint(name: str, what: str) -> str:
    return (
        f"cannot load {what} {name!r}: it is not a local directory and could not be fetched from the "
        f"Hugging Face Hub (offline, or no such repo). Download it where you have network "
        f"(`hf download {name}`) and pass its local directory instead"
    )


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


def load_causal_lm(name: str, **kwargs):
    """AutoModelForCausalLM.from_pretrained with a one-line error when `name` is unreachable."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:
        if Path(name).expanduser().is_dir():
            raise ClipCapError(f"cannot load the language model from {name}: {e}") from None
        raise ClipCapError(offline_hint(name, "language model")) from None


def load_tokenizer(name: str | Path):
    """AutoTokenizer.from_pretrained with a one-line error when `name` is unreachable."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(name))
    except (OSError, ValueError) as e:
        if Path(name).expanduser().is_dir():
            raise ClipCapError(f"cannot load a tokenizer from {name}: {e}") from None
        raise ClipCapError(offline_hint(str(name), "tokenizer")) from None
