"""Training checkpoints: a model dir plus optimizer, scheduler and RNG state, in safetensors and JSON.

```
RUN_DIR/checkpoints/step-00001000/   config.json, model.safetensors, tokenizer files   (a model dir)
                                     optimizer.safetensors   optimizer tensors; the rest in trainer_state.json
                                     trainer_state.json      step, best validation loss, scheduler, run identity
                                     rng_state_{rank}.safetensors
```
A checkpoint is written to `.step-N.tmp` and renamed, so it exists whole or not at all. Resuming takes the newest
checkpoint that reads back intact and reports the damaged ones it passed over.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .errors import ClipCapError
from .outputs import writing

CHECKPOINTS = "checkpoints"
STATE = "trainer_state.json"
OPTIMIZER = "optimizer.safetensors"
WEIGHTS = "model.safetensors"


def save_model_dir(model, tokenizer, path: Path) -> None:
    """Write a model dir next to `path` and swap it in, so `path` is never half-written (a failed write, disk full
    included, is one ClipCapError and leaves no temporary dir)."""
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with writing(path):
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            old = path.with_name(f".{path.name}.old")
            if path.exists():
                os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def optimizer_to_safetensors(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (for safetensors) and the JSON-able rest."""
    tensors, rest = {}, {}
    for pid, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                rest.setdefault(str(pid), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "state": rest}


def optimizer_from_safetensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {int(pid): dict(values) for pid, values in meta["state"].items()}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def rng_file(path: Path, rank: int) -> Path:
    return path / f"rng_state_{rank}.safetensors"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a temporary dir from a killed save is never listed)."""
    root = Path(run_dir) / CHECKPOINTS
    found = [p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[5:]))


def write_checkpoint(tmp: Path, model, tokenizer, optimizer_state: dict, state: dict) -> None:
    """The main process's part of a checkpoint: model dir, optimizer tensors, trainer state."""
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tensors, optimizer_meta = optimizer_to_safetensors(optimizer_state)
    save_file(tensors, str(tmp / OPTIMIZER))
    (tmp / STATE).write_text(json.dumps({**state, "optimizer": optimizer_meta}, indent=1))


def commit_checkpoint(tmp: Path, final: Path, keep: int) -> None:
    """Rename `tmp` to `final` (this is what makes the checkpoint exist) and delete all but the `keep` newest."""
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in list_checkpoints(final.parent.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def checkpoint_problem(path: Path, ranks: int) -> str | None:
    """Why the checkpoint at `path` cannot be resumed from (a file missing, unreadable or truncated), or None."""
    try:
        state = json.loads((path / STATE).read_text())
    except FileNotFoundError:
        return f"no {STATE}"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"{STATE} is damaged ({e})"
    if not isinstance(state, dict) or not {"step", "identity", "optimizer", "scheduler"} <= set(state):
        return f"{STATE} is incomplete"
    for name in (WEIGHTS, OPTIMIZER, *(rng_file(path, r).name for r in range(ranks))):
        try:
            with safe_open(str(path / name), framework="pt"):
                pass
        except FileNotFoundError:
            return f"no {name}"
        except (SafetensorError, OSError) as e:
            return f"{name} is damaged ({e})"
    return None


def newest_intact_checkpoint(run_dir: Path, ranks: int) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the newest checkpoint that reads back whole, or None; [(damaged newer checkpoint, why)])."""
    passed = []
    for path in reversed(list_checkpoints(run_dir)):
        problem = checkpoint_problem(path, ranks)
        if problem is None:
            return path, passed
        passed.append((path, problem))
    return None, passed


def read_state(path: Path) -> dict:
    """The trainer state of a checkpoint that passed `checkpoint_problem`."""
    return json.loads((path / STATE).read_text())


def read_checkpoint(path: Path, rank: int) -> tuple[dict, dict, dict]:
    """(trainer state, optimizer state dict, this rank's RNG state) of a checkpoint that passed `checkpoint_problem`."""
    state = read_state(path)
    try:
        optimizer = optimizer_from_safetensors(load_file(str(path / OPTIMIZER)), state["optimizer"])
        rng = load_file(str(rng_file(path, rank)))
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise ClipCapError(f"cannot resume from {path}: {e}") from None
    return state, optimizer, rng
