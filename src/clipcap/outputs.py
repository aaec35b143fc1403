"""Where commands write: one policy for every output path, so that clipcap never destroys a file the user has.

- clipcap deletes or replaces only what it wrote itself. Every dir it writes into holds `.clipcap-output.json`, the
  manifest of what is clipcap's there: for a dir output (a model dir, a store, a run dir, ...) its kind and the command
  that claimed it, and for each top-level entry the command that wrote it (a single file added to a dir, such as a
  model card or a metrics file, also its SHA-256, so a file edited since is the user's again).
- A dir output goes to a new dir, an empty one, or one whose manifest names the same kind; a non-empty dir without a
  manifest (the user's, or a dataset, model or store of another kind) is refused, naming what is there. Files the user
  put beside clipcap's in an output dir are never touched.
- An output that is one of the command's inputs, lies inside one or contains one is refused.
- An earlier output of the same command is replaced only with `overwrite` (the earlier entries are deleted, the user's
  files in the dir stay); resumable jobs (`resume=True`) continue into their own dir without it.
- Writes are atomic (a temporary name, then a rename), and a failed write (disk full, or the file size limit, included)
  is one ClipCapError that leaves no temporary or half-written file. Dirs are created with `mkdir`, so they get the
  permissions the umask gives.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

from .errors import ClipCapError
from .files import output_dir

MANIFEST = ".clipcap-output.json"
PARTIAL = ".clipcap-partial-"  # a dir output being written (inside the output dir, so on its filesystem)

MODEL_DIR, EXPORTED, STORE, RUN, CAPTIONS, DEMO, EXPERIMENT = (
    "model dir",
    "exported model",
    "embedding store",
    "training run",
    "caption job output",
    "demo output",
    "experiment output",
)

_DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
# How libraries that do not raise OSError report the same (safetensors' Rust IoError, torch's stream writer).
_DISK_FULL_TEXT = ("No space left on device", "File too large", "Disk quota exceeded", "StorageFull", "FileTooLarge")


def disk_full(error: BaseException | None) -> bool:
    """Whether `error`, or an error it was raised from, says the disk (or the file size limit) is full."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _DISK_FULL:
            return True
        if any(text in str(error) for text in _DISK_FULL_TEXT):
            return True
        error = error.__cause__ or error.__context__
    return False


def disk_full_error(path: str | Path) -> ClipCapError:
    return ClipCapError(
        f"no space left writing {path} (the disk or the file size limit is full): nothing half-written was kept; "
        "free some space and run the command again"
    )


@contextlib.contextmanager
def writing(path: str | Path):
    """Report a failed write under `path` as one ClipCapError: disk full says so, another OSError says why."""
    try:
        yield
    except ClipCapError as e:
        if disk_full(e.__cause__ or e.__context__):  # a library's own message over the machine's
            raise disk_full_error(path) from None
        raise
    except Exception as e:
        if disk_full(e):
            raise disk_full_error(path) from None
        if isinstance(e, OSError):
            raise ClipCapError(f"cannot write {path}: {e.strerror or e}") from None
        raise


def replace_atomically(path: str | Path, write: Callable[[Path], object]) -> None:
    """Call write(tmp_path), then rename over `path`: readers and resumed jobs never see a half-written file, and a
    failed write (disk full included) leaves neither `path` changed nor the temporary file."""
    path = Path(path)
    # Unique per write: ranks on several machines of a shared filesystem may share a pid.
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with writing(path):
            write(tmp)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def copy_tree(source: str | Path, target: str | Path) -> None:
    """Copy the dir `source` to the new `target` with the permissions the umask gives (shutil.copytree would copy
    the source's, such as a temporary dir's 0700)."""
    source, target = Path(source), Path(target)
    for root, _, names in os.walk(source, followlinks=True):
        here = target / Path(root).relative_to(source)
        here.mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copyfile(Path(root) / name, here / name)


# -- what is there --------------------------------------------------------------------------------------------------
def read_manifest(directory: str | Path) -> dict | None:
    """The manifest of what clipcap wrote in `directory`, or None when there is none."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ClipCapError(f"{path} is damaged ({e}): clipcap cannot tell its files from yours there") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("entries"), dict):
        raise ClipCapError(f"{path} is damaged (no entries): clipcap cannot tell its files from yours there")
    return manifest


def _write_manifest(directory: Path, manifest: dict) -> None:
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    replace_atomically(directory / MANIFEST, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _present(directory: Path) -> list[str]:
    """The entries of `directory` (a dir) but the manifest and clipcap's own temporaries."""
    return sorted(
        p.name
        for p in directory.iterdir()
        # (".job.json.tmp": a job record being claimed, jobs.py)
        if p.name != MANIFEST and not p.name.startswith(PARTIAL) and not p.name.startswith(".job.json.tmp")
    )


def kind_of(directory: str | Path) -> str | None:
    """What an existing dir holds, by its manifest or, for dirs written without one, by its files; None if unknown."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest is not None and manifest.get("kind"):
        return manifest["kind"]
    config = directory / "config.json"
    if config.is_file():
        try:
            exported = "export" in json.loads(config.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError):
            exported = False
        return EXPORTED if exported else MODEL_DIR
    if any((directory / n).exists() for n in ("train_config.json", "checkpoints")):
        return RUN
    if (directory / "captions").is_dir():
        return CAPTIONS
    if any((directory / n).exists() for n in ("img_emb", "text_emb", "info.json")):
        return STORE
    return None


def _a(kind: str) -> str:
    return ("an " if kind[0] in "aeiou" else "a ") + kind


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _resolved(path: Path) -> Path:
    return Path(os.path.abspath(path.expanduser())).resolve()


def check_inputs(out: str | Path, inputs: Iterable = (), hosts: Iterable = ()) -> None:
    """Refuse an output `out` that is one of `inputs`, lies inside one or contains one. `hosts` are inputs an output
    may be written into (a model dir that takes its card) but may not be or contain."""
    target = _resolved(Path(out))
    for given, inside_ok in [(i, False) for i in inputs] + [(h, True) for h in hosts]:
        if given is None or not os.path.exists(os.path.expanduser(given)):
            continue  # a Hub id or a glob, not a path here
        source = _resolved(Path(given))
        if target == source:
            raise ClipCapError(f"the output {out} is the input {given}: write the output elsewhere")
        if source.is_relative_to(target):
            raise ClipCapError(f"the output {out} contains the input {given}: write the output elsewhere")
        if not inside_ok and target.is_relative_to(source):
            raise ClipCapError(f"the output {out} is inside the input {given}: write the output elsewhere")


# -- dir outputs ----------------------------------------------------------------------------------------------------
def _prepare(out: Path, kind: str, command: str, inputs, hosts, overwrite, resume, resumable=False, legacy=None):
    """Check that `out` may take this command's `kind` of output; returns (manifest to write, earlier entries of
    this kind to delete before writing)."""
    check_inputs(out, inputs, hosts)
    if out.exists() and not out.is_dir():
        raise ClipCapError(f"{out} is a file, not a directory")
    manifest = read_manifest(out) if out.is_dir() else None
    if manifest is None or not manifest.get("kind"):
        present = _present(out) if out.is_dir() else []
        found = kind_of(out) if present else None
        # A resumable command's own dir from before manifests, known by its `legacy` file (a job's record, which
        # jobs.py then compares; a run's config).
        adopt = resume and legacy is not None and (out / legacy).is_file() and found in (kind, None)
        if present and not adopt:
            what = _a(found) if found else f"not empty ({_listing(present)})"
            raise ClipCapError(
                f"{out} is {what}, not an output clipcap recorded writing there: clipcap never replaces files it did "
                "not write; choose a new or empty directory"
            )
        entries = (manifest or {}).get("entries", {})
        return {"kind": kind, "command": command, "entries": entries}, []
    if manifest["kind"] != kind:
        raise ClipCapError(
            f"{out} holds {_a(manifest['kind'])} (written by `{manifest.get('command')}`), not {_a(kind)}: "
            "choose another directory"
        )
    claimant = manifest.get("command")
    earlier = sorted(
        name
        for name, entry in manifest["entries"].items()
        if isinstance(entry, dict) and entry.get("command") == claimant and os.path.lexists(out / name)
    )
    if earlier and not overwrite and not resume:
        also = "set `resume` to continue it, " if resumable else ""
        raise ClipCapError(
            f"{out} already holds {_a(kind)} written by `{claimant}`: {also}set `overwrite` to replace it (files of "
            "yours there are kept), or choose another directory"
        )
    return {**manifest, "command": command}, earlier if overwrite else []


def check_dir(
    out: str | Path, kind: str, command: str, *, inputs: Iterable = (), hosts: Iterable = (), overwrite: bool = False
) -> None:
    """The checks of `write_dir`, alone: to refuse an output before the work that would be lost."""
    _prepare(Path(out).expanduser(), kind, command, inputs, hosts, overwrite, resume=False)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def claim_dir(
    out: str | Path,
    kind: str,
    command: str,
    entries: Iterable[str],
    *,
    inputs: Iterable = (),
    hosts: Iterable = (),
    overwrite: bool = False,
    resume: bool = False,
    resumable: bool = False,
    legacy: str | None = None,
) -> Path:
    """Make `out` the output dir of a command that writes into it as it goes (a job, a run, the demo) and return it:
    checked as the module doc says, created if missing, its manifest recording `entries` (the names the command may
    write there) as the command's. With `overwrite`, the command's earlier entries are deleted first; `resume`
    continues them (a job that resumes whenever it is rerun passes it always; `resumable` only names it in errors),
    also in a dir written before manifests existed that holds the file `legacy`."""
    out = Path(out).expanduser()
    manifest, earlier = _prepare(out, kind, command, inputs, hosts, overwrite, resume, resumable, legacy)
    output_dir(out)
    with writing(out):
        for name in earlier:
            _remove(out / name)
            manifest["entries"].pop(name, None)
        for name in entries:
            manifest["entries"][name] = {"command": command}
        _write_manifest(out, manifest)
    return out


def write_dir(
    out: str | Path,
    kind: str,
    command: str,
    write: Callable[[Path], object],
    *,
    inputs: Iterable = (),
    hosts: Iterable = (),
    overwrite: bool = False,
) -> Path:
    """Write a whole dir output (a model dir): checked as the module doc says, `write(stage)` fills a fresh dir
    inside `out`, and only then are its entries moved into `out` (an earlier output of the command removed first,
    with `overwrite`). A failure, disk full included, leaves `out` as it was. Returns `out`."""
    out = Path(out).expanduser()
    manifest, earlier = _prepare(out, kind, command, inputs, hosts, overwrite, resume=False)
    created, had_manifest = not out.exists(), (out / MANIFEST).is_file()
    output_dir(out)
    stage = out / f"{PARTIAL}{secrets.token_hex(4)}"
    try:
        with writing(out):
            for old in out.glob(f"{PARTIAL}*"):  # left by a killed run: inside a dir that is ours
                shutil.rmtree(old, ignore_errors=True)
            _write_manifest(out, manifest)  # before anything else: a killed run leaves a dir known to be ours
            stage.mkdir()
            write(stage)
            new = sorted(p.name for p in stage.iterdir())
            clash = [n for n in new if os.path.lexists(out / n) and n not in earlier]
            if clash:
                raise ClipCapError(
                    f"{out / clash[0]} was not written by `{command}`: it would be replaced; move it away or choose "
                    "another directory"
                )
            for name in earlier:
                manifest["entries"].pop(name, None)
            manifest["entries"].update({name: {"command": command} for name in new})
            _write_manifest(out, manifest)  # the new names are ours before they arrive
            for name in earlier:
                _remove(out / name)
            for name in new:
                os.replace(stage / name, out / name)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if created:
            shutil.rmtree(out, ignore_errors=True)  # made by this call: nothing of anyone else's is in it
        elif not had_manifest:
            (out / MANIFEST).unlink(missing_ok=True)  # the empty dir it was
        raise
    stage.rmdir()
    return out


# -- file outputs ---------------------------------------------------------------------------------------------------
def _digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def check_file(
    path: str | Path, command: str, *, inputs: Iterable = (), hosts: Iterable = (), overwrite: bool = False
) -> Path:
    """Check that the file `path` may take this command's output (added into its dir, whatever else is there):
    not an input, and either new or this command's earlier output, unchanged since, with `overwrite`."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ClipCapError(f"{path} is a directory: name a file to write")
    for parent in path.parents:  # the nearest existing one must be a dir
        if os.path.lexists(parent):
            if not parent.is_dir():
                raise ClipCapError(f"cannot write {path}: {parent} is a file, not a directory")
            break
    check_inputs(path, inputs, hosts)
    if not os.path.lexists(path):
        return path
    manifest = read_manifest(path.parent) if path.parent.is_dir() else None
    entry = (manifest or {}).get("entries", {}).get(path.name)
    if not isinstance(entry, dict) or "sha256" not in entry:
        raise ClipCapError(
            f"{path} exists and was not written by clipcap: it is kept; choose another file name or move it away"
        )
    if not path.is_file() or _digest(path) != entry["sha256"]:
        raise ClipCapError(
            f"{path} was changed after `{entry.get('command')}` wrote it: it is kept; move it away first"
        )
    if not overwrite:
        raise ClipCapError(
            f"{path} already exists (written by `{entry.get('command')}`): set `overwrite` to replace it"
        )
    return path


def write_file(
    path: str | Path,
    command: str,
    write: Callable[[Path], object],
    *,
    inputs: Iterable = (),
    hosts: Iterable = (),
    overwrite: bool = False,
) -> Path:
    """Write one file into a dir that may hold anything (a metrics file, a model card): checked by `check_file`,
    written atomically, and recorded in the dir's manifest. Returns `path`."""
    path = check_file(path, command, inputs=inputs, hosts=hosts, overwrite=overwrite)
    output_dir(path.parent)
    replace_atomically(path, write)
    manifest = read_manifest(path.parent) or {"kind": None, "entries": {}}
    manifest["entries"][path.name] = {"command": command, "sha256": _digest(path)}
    _write_manifest(path.parent, manifest)
    return path
