"""Runs many `clipcap` command lines in one fresh interpreter, each as if it were its own process: the exit status
and everything written to stdout and stderr, Python's and the file descriptors' (so C-level output counts too).
An exception escaping `main` is printed with its traceback and exits 1, as the interpreter would.

Hostile-input tests run dozens of failing commands; one interpreter for all of them keeps them fast (importing torch
and transformers takes seconds), while `clipcap.cli.main` is the same entry point the console script calls.

    python -m tests.cli_batch CASES.json RESULTS.json   # CASES: {name: argv}; RESULTS: {name: {rc, stdout, stderr}}
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _run_one(argv: list[str]) -> dict:
    from clipcap.cli import main

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2), sys.stdout, sys.stderr
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)  # noqa: SIM115
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        except BaseException:  # noqa: BLE001 - reported as the interpreter would report it
            traceback.print_exc()
            rc = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            sys.stdout, sys.stderr = saved[2], saved[3]
        out.seek(0)
        err.seek(0)
        return {"rc": rc, "stdout": out.read().decode(errors="replace"), "stderr": err.read().decode(errors="replace")}


def run_cli(cases: dict[str, list[str]], cwd: str | Path | None = None, timeout: float = 1200) -> dict[str, dict]:
    """Run every case's argv in one fresh interpreter (offline); returns {name: {rc, stdout, stderr}}."""
    with tempfile.TemporaryDirectory() as tmp:
        spec, results = Path(tmp) / "cases.json", Path(tmp) / "results.json"
        spec.write_text(json.dumps(cases))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
        done = subprocess.run(
            [sys.executable, "-m", "tests.cli_batch", str(spec), str(results)],
            cwd=cwd or REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(results.read_text())


def assert_one_line_error(result: dict, command: str) -> str:
    """Exit status 2, nothing on stdout, exactly one line on stderr naming the command, no traceback."""
    err = result["stderr"]
    assert "Traceback" not in err, err
    assert result["rc"] == 2, result
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith(f"clipcap {command}: error: "), err
    assert result["stdout"] == "", result["stdout"]
    return err.strip()


if __name__ == "__main__":
    cases = json.loads(Path(sys.argv[1]).read_text())
    Path(sys.argv[2]).write_text(json.dumps({name: _run_one(argv) for name, argv in cases.items()}))
