"""Resumable sharded jobs (`embed`, `caption` with an output dir): the job record and each process's share.

A job cuts its items into fixed shards and writes each shard atomically; a shard whose final file exists is done, so
rerunning the same command finishes only what is missing. `job.json` records the command's parameters: it is claimed
when the job starts (written to a temporary file and hard-linked into place, which succeeds for exactly one of several
processes starting together) and compared on every later start, so a different command on the same dir is refused.
Under `torchrun` (RANK / WORLD_SIZE in the environment) rank r takes shards r, r + world, ...: no process group, no
scheduler, and any number of nodes on a shared filesystem.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import ClipCapError
from .outputs import disk_full, disk_full_error

JOB = "job.json"


def rank_and_world() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) as torchrun sets them; (0, 1) outside torchrun."""
    try:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        raise ClipCapError("RANK and WORLD_SIZE must be integers") from None
    if not 0 <= rank < world:
        raise ClipCapError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return rank, world


def claim_job(out: Path, job: dict, command: str, kind: str) -> None:
    """Start a job at `out` for `job`, or check that the job there was started by the same command; `command` and
    `kind` name the job in messages ("clipcap embed", "store"). The dir has been claimed by the output policy
    (`outputs.claim_dir`) before: it holds nothing of anyone else's that the job could overwrite."""
    job_file = out / JOB
    if not job_file.is_file():
        tmp = out / f".{JOB}.tmp{os.getpid()}"
        try:
            out.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(job, indent=2) + "\n", encoding="utf-8")
        except (FileExistsError, NotADirectoryError):
            raise ClipCapError(f"cannot create the {kind} {out}: a part of it is a file, not a directory") from None
        except OSError as e:
            tmp.unlink(missing_ok=True)
            if disk_full(e):
                raise disk_full_error(job_file) from None
            raise ClipCapError(f"cannot create the {kind} {out}: {e.strerror or e}") from None
        try:
            os.link(tmp, job_file)
            return
        except FileExistsError:
            pass  # another process started the same job a moment ago: compare with its record below
        finally:
            tmp.unlink(missing_ok=True)
    try:
        previous = json.loads(job_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ClipCapError(f"{job_file} is damaged ({e}): delete {out} to start over") from None
    if not isinstance(previous, dict):
        raise ClipCapError(f"{job_file} is damaged (not a JSON object): delete {out} to start over")
    if set(previous) != set(job):  # another command's record (a store from `embed` as captions, or the reverse)
        raise ClipCapError(
            f"{out} holds the output of another command, not a {kind} of `{command}`: use another output dir"
        )
    differs = sorted(k for k in set(job) | set(previous) if job.get(k) != previous.get(k))
    if differs:
        raise ClipCapError(
            f"{out} holds a {kind} from a different `{command}` command (differs in: {', '.join(differs)}); "
            "use another output dir, or delete it to start over"
        )


def shards_of(rank: int, world: int, num_shards: int) -> range:
    """The shards rank `rank` of `world` takes: rank, rank + world, ..."""
    return range(rank, num_shards, world)
