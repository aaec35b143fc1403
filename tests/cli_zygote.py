"""A process that has imported torch, transformers and `clipcap.cli` once and forks a fresh child for every `clipcap`
command line a test runs: each command is its own process (own exit status, file descriptors, working directory,
environment), as `python -m clipcap.cli ARGS` would be, without paying the seconds-long imports each time.

Nothing computes in this process before it forks (no torch op runs, so no thread pool exists to be lost in a child).
The protocol is one JSON object per line on stdin, {argv, cwd, env, stdout, stderr, timeout}; the answer is one line
with {"rc": status}. A child that outlives its timeout is killed and reported with status -9.

    python -m tests.cli_zygote
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time


def _child(request: dict) -> None:
    """Become `python -m clipcap.cli ARGV` in the requested directory and environment; never returns."""
    status = 1
    try:
        os.setsid()
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), fd)
        sys.stdin = open(0, closefd=False)  # noqa: SIM115
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
        sys.argv = ["clipcap", *request["argv"]]
        import torch

        torch.set_num_threads(int(request["env"].get("OMP_NUM_THREADS", "1")))
        from clipcap.cli import main

        try:
            status = main(request["argv"])
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        status = 0 if status is None else status
    except BaseException:  # noqa: BLE001 - reported as the interpreter reports an uncaught exception
        import traceback

        traceback.print_exc()
        status = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(status if isinstance(status, int) else 1)


def _wait(pid: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return -9
        time.sleep(0.02)


def serve() -> None:
    import torch  # noqa: F401 - the seconds-long imports every child shares
    import transformers.modeling_utils  # noqa: F401

    import clipcap.cli  # noqa: F401

    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
        print(json.dumps({"rc": _wait(pid, request["timeout"])}), flush=True)


if __name__ == "__main__":
    serve()
