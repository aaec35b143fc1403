"""Running the real `clipcap` command in a subprocess on hostile input, and what every outcome must look like."""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


class _Zygote:
    """One `tests.cli_zygote` process per test session: it forks a fresh process for each command line."""

    def __init__(self) -> None:
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.cli_zygote"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=REPO,
            env=env,
            text=True,
        )
        atexit.register(self.proc.kill)

    def run(self, argv: list[str], cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory() as tmp:
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            request = dict(argv=argv, cwd=str(cwd), env=env, stdout=str(out), stderr=str(err), timeout=timeout)
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            answer = self.proc.stdout.readline()
            assert answer, "the command zygote died"
            rc = json.loads(answer)["rc"]
            text = [p.read_bytes().decode(errors="replace") if p.exists() else "" for p in (out, err)]
        return subprocess.CompletedProcess(["clipcap", *argv], rc, *text)


_zygote: _Zygote | None = None


def clipcap(*args, cwd: Path | None = None, timeout: float = 300, env: dict | None = None):
    """`python -m clipcap.cli ARGS` as a user runs it (offline, one thread), captured: a fresh process forked from
    one that has already imported torch and transformers (tests/cli_zygote.py)."""
    global _zygote
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    full_env.pop("CLIPCAP_DEBUG", None)
    if _zygote is None or _zygote.proc.poll() is not None:
        _zygote = _Zygote()
    return _zygote.run([str(a) for a in args], Path(cwd or os.getcwd()), full_env, timeout)


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
