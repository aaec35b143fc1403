"""The output-path policy (`clipcap.outputs`) through the real CLI, command by command: a dir or file the user has is
refused and left byte-for-byte intact, `.` and an input (or a path inside or around one) are refused, a dataset, model
or store of another kind is refused, a rerun needs `--overwrite` (which keeps the user's files beside the output) or
resumes, a full disk is one line leaving nothing half-written, and new dirs get the umask's permissions."""

from __future__ import annotations

import json
import os
import resource
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from clipcap.demo.experiments import EXPERIMENT_ENTRIES
from clipcap.demo.runner import DEMO_ENTRIES
from clipcap.lora import add_lora
from clipcap.outputs import DEMO, EXPERIMENT, MANIFEST, PARTIAL, claim_dir
from tests import tiny
from tests.hostile import REPO, clipcap, leftovers, no_traceback, one_line_error
from tests.test_convert import make_original
from tests.test_hostile_train import SMALL

USER = b"the user's own file \x00\xff\n"
REFS = {"1": ["a red circle.", "a circle."], "2": ["a blue square.", "a square."]}
PREDS = [{"image_id": 1, "caption": "a red circle."}, {"image_id": 2, "caption": "a blue square."}]


@pytest.fixture(scope="module")
def w(tmp_path_factory, lm_dir, clip_dir, model_dir, tokenizer):
    """The inputs every command here reads."""
    root = tmp_path_factory.mktemp("outputs-inputs")
    make_original(lm_dir, "mlp", root / "orig.pt")
    images = root / "images"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32), (80 * i, 20, 200 - 60 * i)).save(images / f"{i}.png")
    lora = tiny.tiny_model("mlp", lm=tiny.load_lm(lm_dir), lm_name=str(lm_dir), tune_lm=False)
    add_lora(lora, 2, 4.0, 0.0)
    lora.save_pretrained(root / "lora")
    tokenizer.save_pretrained(root / "lora")
    (root / "p.json").write_text(json.dumps(PREDS))
    (root / "r.json").write_text(json.dumps(REFS))
    encoders = root / "encoders"
    shutil.copytree(clip_dir, encoders / "clip")
    shutil.copytree(lm_dir, encoders / "lm")
    return SimpleNamespace(
        root=root,
        ckpt=root / "orig.pt",
        store=tiny.make_store(root / "store"),
        images=images,
        lora=root / "lora",
        preds=root / "p.json",
        refs=root / "r.json",
        encoders=encoders,
        lm=Path(lm_dir),
        clip=Path(clip_dir),
        model=Path(model_dir),
    )


# Each dir-writing command, as a user types it, with its output `out` and the input the cases below aim at.
DIR_COMMANDS = {
    "convert": (lambda w, out: ["convert", w.ckpt, out, "--lm", w.lm], lambda w: w.lm),
    "export": (lambda w, out: ["export", w.model, out, "--quiet"], lambda w: w.model),
    "merge-lora": (lambda w, out: ["merge-lora", w.lora, out], lambda w: w.lora),
    "train": (
        lambda w, out: ["train", "--data", w.store, "--out", out, "--lm", w.lm, "--quiet", "--epochs", 1, *SMALL],
        lambda w: w.store,
    ),
    "embed": (
        lambda w, out: ["embed", w.images, "--out", out, "--clip-model", w.clip, "--workers", 0, "--quiet"],
        lambda w: w.images,
    ),
    "caption": (
        lambda w, out: ["caption", w.images, "--model", w.model, "--out", out, "--workers", 0, "--quiet"],
        lambda w: w.images,
    ),
    "demo": (lambda w, out: ["demo", "--out", out, "--quick", "--encoders", w.encoders], lambda w: w.encoders),
    "experiment": (
        lambda w, out: ["experiment", "mapping", "--out", out, "--data", w.store, "--lm", w.lm],
        lambda w: w.store,
    ),
}


def user_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "notes.txt").write_bytes(USER)
    return path


def intact(path: Path, *names: str) -> None:
    """The user's file is still there, byte for byte, and nothing of clipcap's was left beside it."""
    assert (path / "notes.txt").read_bytes() == USER
    assert sorted(p.name for p in path.iterdir()) == sorted(["notes.txt", *names])


# -- class 1: the user's dir, `.`, an input, another kind ----------------------------------------------------------
@pytest.mark.parametrize("command", DIR_COMMANDS)
def test_a_dir_of_the_users_is_refused_and_left_intact(command, w, tmp_path):
    out = user_dir(tmp_path / "mine")
    one_line_error(clipcap(*DIR_COMMANDS[command][0](w, out)), str(out), "not empty (notes.txt)", "choose a new")
    intact(out)


@pytest.mark.parametrize("command", DIR_COMMANDS)
def test_the_current_dir_as_output_is_refused_when_it_holds_the_users_files(command, w, tmp_path):
    cwd = user_dir(tmp_path / "cwd")
    one_line_error(clipcap(*DIR_COMMANDS[command][0](w, "."), cwd=cwd), "not empty (notes.txt)")
    intact(cwd)


def test_convert_into_the_current_dir_that_holds_the_checkpoint(w, tmp_path):
    cwd = user_dir(tmp_path / "cwd")
    shutil.copy(w.ckpt, cwd / "orig.pt")
    one_line_error(clipcap("convert", "orig.pt", ".", "--lm", w.lm, cwd=cwd), "contains the input orig.pt")
    intact(cwd, "orig.pt")


def test_convert_into_an_empty_current_dir_writes_a_model_dir_there(w, tmp_path):
    cwd = tmp_path / "empty"
    cwd.mkdir()
    done = clipcap("convert", w.ckpt, ".", "--lm", w.lm, cwd=cwd)
    assert done.returncode == 0, done.stderr
    assert (cwd / "config.json").is_file() and (cwd / "model.safetensors").is_file()
    assert not list(cwd.glob(f"{PARTIAL}*")) and not leftovers(cwd)


@pytest.mark.parametrize("where", ["is", "inside", "contains"])
@pytest.mark.parametrize("command", DIR_COMMANDS)
def test_an_output_that_is_in_or_around_an_input_is_refused(command, where, w, tmp_path):
    build, aimed = DIR_COMMANDS[command]
    source = aimed(w)
    out = {"is": source, "inside": source / "out", "contains": source.parent}[where]
    before = {p: p.stat().st_mtime_ns for p in source.rglob("*")}
    fragment = {"is": "is the input", "inside": "is inside the input", "contains": "contains the input"}[where]
    one_line_error(clipcap(*build(w, out)), fragment, "write the output elsewhere")
    assert {p: p.stat().st_mtime_ns for p in source.rglob("*")} == before


def test_convert_onto_its_own_checkpoint_is_refused(w, tmp_path):
    ckpt = shutil.copy(w.ckpt, tmp_path / "orig.pt")
    data = Path(ckpt).read_bytes()
    one_line_error(clipcap("convert", ckpt, ckpt, "--lm", w.lm), "is the input")
    assert Path(ckpt).read_bytes() == data


@pytest.mark.parametrize("command", DIR_COMMANDS)
@pytest.mark.parametrize("other", ["a model dir", "an embedding store"])
def test_an_output_dir_of_another_kind_is_refused(command, other, w, tmp_path):
    target = shutil.copytree(w.model if other == "a model dir" else w.store, tmp_path / "other")
    before = {p: p.read_bytes() for p in target.rglob("*") if p.is_file()}
    one_line_error(clipcap(*DIR_COMMANDS[command][0](w, target)), f"is {other}", "choose a new")
    assert {p: p.read_bytes() for p in target.rglob("*") if p.is_file()} == before


def test_an_output_of_another_command_is_refused_by_its_manifest(w, tmp_path):
    store = tmp_path / "store"
    assert clipcap(*DIR_COMMANDS["embed"][0](w, store)).returncode == 0
    one_line_error(clipcap(*DIR_COMMANDS["convert"][0](w, store)), "holds an embedding store", "not a model dir")
    one_line_error(clipcap(*DIR_COMMANDS["train"][0](w, store)), "holds an embedding store", "not a training run")


# -- class 1: rerunning without and with --overwrite ---------------------------------------------------------------
@pytest.mark.parametrize("command", ["convert", "merge-lora", "export", "train"])
def test_a_rerun_needs_overwrite_which_keeps_the_users_files(command, w, tmp_path):
    out = tmp_path / "out"
    argv = DIR_COMMANDS[command][0](w, out)
    first = clipcap(*argv)
    assert first.returncode == 0, first.stderr
    written = sorted(p.name for p in out.iterdir())
    (out / "notes.txt").write_bytes(USER)  # the user keeps a note beside the output
    marker = out / next(n for n in written if not n.startswith("."))
    stamp = marker.stat().st_mtime_ns
    line = one_line_error(clipcap(*argv), "already holds", "--overwrite")
    if command == "train":
        assert "--resume" in line
    assert marker.stat().st_mtime_ns == stamp
    again = clipcap(*argv, "--overwrite")
    assert again.returncode == 0, again.stderr
    intact(out, *written)
    assert not leftovers(out) and not list(out.glob(f"{PARTIAL}*"))


@pytest.mark.parametrize("command", ["embed", "caption"])
def test_a_job_resumes_without_overwrite_and_starts_over_with_it(command, w, tmp_path):
    out = tmp_path / "out"
    argv = DIR_COMMANDS[command][0](w, out)
    assert clipcap(*argv).returncode == 0
    written = sorted(p.name for p in out.iterdir())
    (out / "notes.txt").write_bytes(USER)
    stale = out / ("img_emb" if command == "embed" else "captions") / "stale"  # stands for an earlier shard
    stale.write_text("x")
    resumed = clipcap(*argv)
    assert resumed.returncode == 0, resumed.stderr
    assert stale.exists()  # the same job, continued
    again = clipcap(*argv, "--overwrite")
    assert again.returncode == 0, again.stderr
    assert not stale.exists()  # started over
    intact(out, *written)


@pytest.mark.parametrize(
    "command, kind, entries", [("demo", DEMO, DEMO_ENTRIES), ("experiment", EXPERIMENT, EXPERIMENT_ENTRIES)]
)
def test_a_demo_or_experiment_rerun_needs_overwrite(command, kind, entries, w, tmp_path):
    out = claim_dir(tmp_path / "out", kind, f"clipcap {command}", entries)
    (out / entries[-1]).write_text("an earlier result")  # what an earlier run left
    (out / "notes.txt").write_bytes(USER)
    one_line_error(clipcap(*DIR_COMMANDS[command][0](w, out)), "already holds", "--overwrite")
    assert (out / entries[-1]).read_text() == "an earlier result"
    intact(out, entries[-1], MANIFEST)


def test_evaluate_refuses_the_references_as_output_and_a_file_of_the_users(w, tmp_path):
    refs = shutil.copy(w.refs, tmp_path / "r.json")
    data = Path(refs).read_bytes()
    base = ["evaluate", "--predictions", w.preds, "--references", refs, "--no-spice", "--no-clipscore"]
    one_line_error(clipcap(*base, "--out", refs), "is the input")
    assert Path(refs).read_bytes() == data
    mine = tmp_path / "mine.json"
    mine.write_bytes(USER)
    one_line_error(clipcap(*base, "--out", mine), "was not written by clipcap", "it is kept")
    assert mine.read_bytes() == USER
    (tmp_path / "m.csv").write_bytes(USER)  # a file beside it that evaluate would write: refused before scoring
    one_line_error(clipcap(*base, "--out", tmp_path / "m.json"), "m.csv")
    assert (tmp_path / "m.csv").read_bytes() == USER and not (tmp_path / "m.json").exists()
    in_store = ["evaluate", "--model", w.model, "--data", w.store, "--out", w.store / "metrics.json"]
    one_line_error(clipcap(*in_store), "is inside the input")
    assert not (w.store / "metrics.json").exists()


def test_evaluate_reruns_with_overwrite_only(w, tmp_path):
    cwd = user_dir(tmp_path / "work")
    base = ["evaluate", "--predictions", w.preds, "--references", w.refs, "--no-spice", "--no-clipscore"]
    assert clipcap(*base, cwd=cwd).returncode == 0
    metrics = (cwd / "metrics.json").read_bytes()
    one_line_error(clipcap(*base, cwd=cwd), "metrics.json already exists", "--overwrite")
    assert (cwd / "metrics.json").read_bytes() == metrics
    done = clipcap(*base, "--overwrite", cwd=cwd)
    assert done.returncode == 0, done.stderr
    intact(cwd, "metrics.json", "metrics.csv", MANIFEST)
    (cwd / "metrics.json").write_text("{}")  # the user edited it: theirs now, even with --overwrite
    one_line_error(clipcap(*base, "--overwrite", cwd=cwd), "was changed after", "it is kept")
    assert (cwd / "metrics.json").read_text() == "{}"


def test_card_keeps_a_readme_the_user_wrote_and_replaces_its_own_only_when_asked(w, tmp_path):
    model = shutil.copytree(w.model, tmp_path / "model")
    (model / "README.md").write_bytes(USER)
    one_line_error(clipcap("card", model), "README.md", "was not written by clipcap", "it is kept")
    assert (model / "README.md").read_bytes() == USER
    (model / "README.md").unlink()
    assert clipcap("card", model).returncode == 0
    card = (model / "README.md").read_text()
    one_line_error(clipcap("card", model), "already exists", "--overwrite")
    assert clipcap("card", model, "--overwrite").returncode == 0
    assert (model / "README.md").read_text() == card
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"metrics": {"CIDEr": 0.5}}))
    one_line_error(clipcap("card", model, "--metrics", metrics, "--out", metrics), "is the input")


def test_overwrite_without_an_output_dir_is_refused(w):
    one_line_error(clipcap("caption", w.images, "--model", w.model, "--overwrite"), "--overwrite", "needs --out")


# -- class 6: disk full and the umask ------------------------------------------------------------------------------
def fresh(*args, cwd: Path, fsize: int | None = None, umask: int | None = None) -> subprocess.CompletedProcess:
    """The real CLI in a new process under a file size limit (writes past it fail with EFBIG, SIGXFSZ being ignored
    by Python) and/or a umask: what a full disk and a user's umask look like to clipcap."""

    def limits() -> None:
        if umask is not None:
            os.umask(umask)
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.pop("CLIPCAP_DEBUG", None)
    argv = [sys.executable, "-m", "clipcap.cli", *map(str, args)]
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, preexec_fn=limits, timeout=600)


@pytest.mark.parametrize("command", ["convert", "merge-lora", "export", "train", "embed", "evaluate"])
def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(command, w, tmp_path):
    out = tmp_path / "out"
    if command == "evaluate":
        out = user_dir(tmp_path / "work") / "metrics.json"
        argv = ["evaluate", "--predictions", w.preds, "--references", w.refs, "--no-spice", "--no-clipscore"]
        argv += ["--out", out]
    else:
        argv = DIR_COMMANDS[command][0](w, out)
    done = fresh(*argv, cwd=tmp_path, fsize={"evaluate": 64, "embed": 256}.get(command, 8192))
    one_line_error(done, "no space left", "nothing half-written was kept")
    assert not leftovers(tmp_path)
    assert not [p for p in tmp_path.rglob(f"{PARTIAL}*")]
    if command in ("convert", "merge-lora", "export"):
        assert not out.exists()  # a new dir: removed again
    elif command == "evaluate":
        intact(out.parent)
    elif command == "train":
        assert not list((out / "checkpoints").glob(".step-*")) and not (out / "final").exists()


@pytest.mark.parametrize("command, mask", [("export", 0o022), ("convert", 0o027)])
def test_new_dirs_and_files_get_the_umasks_permissions(command, mask, w, tmp_path):
    out = tmp_path / "out"
    done = fresh(*DIR_COMMANDS[command][0](w, out), cwd=tmp_path, umask=mask)
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask
    for path in out.rglob("*"):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & mask == 0, f"{path}: {oct(mode)}"
        if path.is_dir():
            assert mode == 0o777 & ~mask, f"{path}: {oct(mode)}"
    no_traceback(done)
