"""Resumable sharded jobs (`embed`, `caption` with an output dir): the job record and each process's share.

A job cuts its items into fixed shards and writes each shard atomically; a shard whose final file exists is done, so
rerunning the same command finishes only what is missing. `job.json` records the command's parameters: it is claimed
when the job starts (written to a temporary file and hard-linked into place, which succeeds for exactly one of several
processes starting together) and compared on every later start, so a different command on the same dir is refused.
Under `torchrun` (RANK / WORLD_SIZE in the environment) rank r takes shards r, r + world, ...: no process group, no
scheduler, and any number of nodes on a shared filesystem.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from .errors import ClipCapError
from .outputs import disk_full, disk_full_error

JOB = "job.json"
# Files in a model or encoder dir that cannot change what it computes: docs (a model card written later), the model
# code copied for `trust_remote_code` (clipcap runs its own), and hidden files and folders (.git, caches, locks).
INERT_SUFFIXES = (".md", ".py", ".pyc")


def dir_fingerprint(name: str | Path) -> str | None:
    """A content hash of every file under the local dir `name` that can decide its output (weights of any kind,
    .onnx graphs, configs, generation_config.json, tokenizer and processor files, an encoder dir inside it), with
    their relative names; None when `name` is not a local dir (a Hub id)."""
    root = Path(name).expanduser()
    if not root.is_dir():
        return None
    digest = hashlib.sha256()
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
        for file in sorted(files):
            path = Path(folder, file)
            if file.startswith(".") or path.suffix in INERT_SUFFIXES or not path.is_file():
                continue
            digest.update(os.fsencode(path.relative_to(root).as_posix()) + b"\0")
            with open(path, "rb") as f:
                for chunk in iter(lambda f=f: f.read(1 << 20), b""):
                    digest.update(chunk)
            digest.update(b"\0")
    return digest.hexdigest()


def items_digest(items: Iterable) -> str:
    """A hash of a job's item list (each item JSON-able: key, image, captions, metadata, ...), so a source that
    changed between runs is noticed; non-UTF-8 names (lone surrogates) hash distinctly."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(json.dumps(item, sort_keys=True, default=str).encode("ascii") + b"\n")
    return digest.hexdigest()


def _shown(value) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12]  # a sha256: its start is enough to tell two apart
    return text if len(text) <= 80 else text[:77] + "..."


def differences(old: dict, new: dict, prefix: str = "") -> str:
    """`name old -> new` for each key whose value differs (`outer.inner` within dicts), comma-separated, for
    one-line messages."""
    shown = []
    for k in sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            shown.append(differences(a, b, f"{prefix}{k}."))
        else:
            shown.append(f"{prefix}{k} {_shown(a)} -> {_shown(b)}")
    return ", ".join(shown)


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
    # Another command's record (a store from `embed`, which names no command, as captions, or the reverse); a record
    # of the same command from an older version lacks the newer fields, which then show as changed from null.
    if previous.get("command") != job.get("command"):
        raise ClipCapError(
            f"{out} holds the output of another command, not a {kind} of `{command}`: use another output dir"
        )
    differs = differences(previous, job)
    if differs:
        raise ClipCapError(
            f"{out} holds a {kind} from a different `{command}` command (differs in: {differs}); "
            "use another output dir, or delete it to start over"
        )


def shards_of(rank: int, world: int, num_shards: int) -> range:
    """The shards rank `rank` of `world` takes: rank, rank + world, ..."""
    return range(rank, num_shards, world)
