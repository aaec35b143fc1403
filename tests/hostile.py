"""Running the real `clipcap` command in a subprocess on hostile input, and what every outcome must look like."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def clipcap(*args, cwd: Path | None = None, timeout: float = 300, env: dict | None = None):
    """`python -m clipcap.cli ARGS` as a user runs it (offline, one thread), captured."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    full_env.pop("CLIPCAP_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "clipcap.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=full_env,
        timeout=timeout,
    )


def one_line_error(done: subprocess.CompletedProcess, *fragments: str, code: int = 2) -> str:
    """The command failed with `code` and exactly one line on stderr, naming the problem; returns that line."""
    err = done.stderr
    assert done.returncode == code, f"exit {done.returncode}, stderr:\n{err[-3000:]}"
    assert "Traceback" not in err and "internal error" not in err, err[-3000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1, err[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def no_traceback(done: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in done.stderr and "internal error" not in done.stderr, done.stderr[-3000:]


def leftovers(path: Path) -> list[Path]:
    """Temporary files a half-done write would leave behind (what a rerun could trip over)."""
    return [p for p in Path(path).rglob("*") if ".tmp" in p.name] if Path(path).exists() else []
