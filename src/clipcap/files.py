"""Output locations: a directory to write into is created, or refused with one clear error."""

from __future__ import annotations

from pathlib import Path

from .errors import ClipCapError


def output_dir(path: str | Path) -> Path:
    """`path` as an existing directory (created with its parents), or ClipCapError saying why it cannot be one."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ClipCapError(f"{path} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ClipCapError(f"cannot create {path}: a part of it is a file, not a directory") from None
    except OSError as e:
        raise ClipCapError(f"cannot create {path}: {e.strerror or e}") from None
    return path
