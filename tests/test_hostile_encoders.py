"""A model uses the encoder (and LM) its dir names, whatever the working directory holds; an exported model keeps or
names its encoder and says which it used; exporting a LoRA dir says to merge it first; the model card's install
line and usage examples work on the dir they describe; `evaluate` checks a store as `caption` does and skips images
whose references are all blank; config.json records a portable LM name. Through the real CLI and the Python API."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from importlib.metadata import distribution
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from clipcap import Captioner, ClipCapError, ClipCapModel
from clipcap.card import CardConfig, build_card, write_card
from clipcap.data.store import StoreWriter
from clipcap.encoder import fingerprint
from clipcap.export import export
from clipcap.lora import add_lora
from tests import tiny
from tests.hostile import REPO, clipcap, no_traceback, one_line_error
from tests.test_images import REAL_IMAGES

PHOTO = sorted(REAL_IMAGES.glob("*.jpg"))[0]


# -- fixtures: a working directory that holds an unrelated ./clip and ./lm, and the dirs under test --------------
@pytest.fixture(scope="module")
def hostile_cwd(tmp_path_factory, tokenizer):
    """A working directory whose ./clip is another CLIP (same sizes, other weights) and whose ./lm another LM."""
    cwd = tmp_path_factory.mktemp("hostile-cwd")
    tiny.save_clip_dir(cwd / "clip", tiny.tiny_clip(len(tokenizer), seed=7), tokenizer)
    tiny.save_lm_dir(cwd / "lm", tiny.varied_lm(vocab_size=len(tokenizer), seed=7), tokenizer)
    return cwd


@pytest.fixture(scope="module")
def empty_cwd(tmp_path_factory):
    return tmp_path_factory.mktemp("empty-cwd")


@pytest.fixture(scope="module")
def complete_dir(tmp_path_factory, varied_model_dir):
    """varied_model_dir made complete (`Captioner.save_pretrained`: vision tower inside, config still names "clip")."""
    return Captioner.from_pretrained(varied_model_dir).save_pretrained(tmp_path_factory.mktemp("complete") / "model")


@pytest.fixture(scope="module")
def exported_complete(tmp_path_factory, complete_dir):
    return export(complete_dir, tmp_path_factory.mktemp("exported-complete") / "model", progress=False)


@pytest.fixture(scope="module")
def by_reference_dir(tmp_path_factory, tokenizer, lm_dir, clip_dir):
    """A frozen-LM model dir saved without its LM, whose config names the LM "lm" and the encoder "clip", both
    copies inside the dir (relative names)."""
    path = tmp_path_factory.mktemp("by-reference") / "model"
    model = tiny.tiny_model("mlp", lm=tiny.load_lm(lm_dir), lm_name="lm", tune_lm=False)
    model.save_pretrained(path, save_lm=False)
    tokenizer.save_pretrained(path)
    shutil.copytree(lm_dir, path / "lm")
    shutil.copytree(clip_dir, path / "clip")
    return path


@pytest.fixture(scope="module")
def dirs(varied_model_dir, exported_dir, complete_dir, exported_complete, by_reference_dir):
    return {
        "model": varied_model_dir,
        "exported": exported_dir,
        "complete": complete_dir,
        "exported-complete": exported_complete,
        "lm-by-reference": by_reference_dir,
    }


def caption_cli(model, cwd, *extra) -> list[str]:
    done = clipcap("caption", PHOTO, "--model", model, "--quiet", *extra, cwd=cwd)
    no_traceback(done)
    assert done.returncode == 0, done.stderr
    return [json.loads(line)["caption"] for line in done.stdout.splitlines()]


# -- class 5: a model uses the encoder it names ------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["model", "exported", "complete", "exported-complete", "lm-by-reference"])
def test_a_cwd_with_another_clip_and_lm_changes_no_caption_cli(kind, dirs, hostile_cwd, empty_cwd):
    expected = caption_cli(dirs[kind], empty_cwd)
    assert caption_cli(dirs[kind], hostile_cwd) == expected


def test_the_cwd_encoder_would_give_other_captions(varied_model_dir, hostile_cwd, empty_cwd):
    """The test above could not fail if ./clip captioned alike: it does not."""
    assert caption_cli(varied_model_dir, hostile_cwd, "--clip-model", "clip") != caption_cli(
        varied_model_dir, empty_cwd
    )


@pytest.mark.parametrize("kind", ["model", "exported", "complete", "exported-complete", "lm-by-reference"])
def test_a_cwd_with_another_clip_and_lm_changes_no_caption_python(kind, dirs, hostile_cwd, empty_cwd, monkeypatch):
    monkeypatch.chdir(empty_cwd)
    expected = Captioner.from_pretrained(dirs[kind]).caption(PHOTO)
    monkeypatch.chdir(hostile_cwd)
    captioner = Captioner.from_pretrained(dirs[kind])
    assert captioner.caption(PHOTO) == expected
    assert Path(captioner.clip_model).resolve().is_relative_to(dirs[kind].resolve())
    assert captioner.encoder_info["clip_fingerprint"] == fingerprint(captioner.clip_model) is not None


def model_naming(tmp_path, source, **fields) -> Path:
    """A copy of `source` without its clip/ and with config.json's fields replaced."""
    path = shutil.copytree(source, tmp_path / "named")
    shutil.rmtree(path / "clip", ignore_errors=True)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **fields}))
    return path


@pytest.mark.parametrize(
    "fields, fragments",
    [
        ({}, ["names CLIP encoder 'clip' (clip_model)", "not in the model dir", "working directory is not"]),
        ({"clip_model": "./clip"}, ["names CLIP encoder './clip'", "never the working directory"]),
        ({"clip_model": "../clip"}, ["names CLIP encoder '../clip'", "never the working directory"]),
        ({"clip_model": "/nonexistent/clip"}, ["/nonexistent/clip (clip_model), which does not exist"]),
    ],
    ids=["hub-id-shadowed", "dot-path", "parent-path", "absolute-missing"],
)
def test_an_encoder_missing_from_the_model_dir_is_never_taken_from_the_cwd(
    fields, fragments, varied_model_dir, hostile_cwd, tmp_path, monkeypatch
):
    model = model_naming(tmp_path, varied_model_dir, **fields)
    one_line_error(clipcap("caption", PHOTO, "--model", model, cwd=hostile_cwd), "clipcap caption: error:", *fragments)
    monkeypatch.chdir(hostile_cwd)
    with pytest.raises(ClipCapError, match=re.escape(fragments[0])):
        Captioner.from_pretrained(model)


def test_an_lm_missing_from_the_model_dir_is_never_taken_from_the_cwd(by_reference_dir, hostile_cwd, tmp_path):
    model = shutil.copytree(by_reference_dir, tmp_path / "model")
    shutil.rmtree(model / "lm")
    done = clipcap("caption", PHOTO, "--model", model, cwd=hostile_cwd)
    one_line_error(done, "clipcap caption: error:", "names language model 'lm' (lm)", "not in the model dir")


def test_evaluate_and_caption_job_record_the_encoder_they_used(varied_model_dir, hostile_cwd, tmp_path):
    Image.open(PHOTO).convert("RGB").resize((48, 32)).save(tmp_path / "a.png")
    entry = {"filename": "a.png", "cocoid": 1, "split": "test", "sentences": [{"raw": "a photo."}]}
    source = tmp_path / "dataset_coco.json"
    source.write_text(json.dumps({"images": [entry]}))
    done = clipcap(
        "evaluate", "--model", varied_model_dir, "--data", source, "--no-spice", "--out", tmp_path / "m.json",
        cwd=hostile_cwd,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    settings = json.loads((tmp_path / "m.json").read_text())["settings"]
    assert settings["clip_model"] == str(varied_model_dir / "clip")
    assert settings["clip_fingerprint"] == fingerprint(varied_model_dir / "clip") != fingerprint(hostile_cwd / "clip")
    done = clipcap(
        "caption", tmp_path / "a.png", "--model", varied_model_dir, "--out", tmp_path / "job", cwd=hostile_cwd
    )
    assert done.returncode == 0, done.stderr
    info = json.loads((tmp_path / "job" / "info.json").read_text())
    assert (info["clip_model"], info["clip_fingerprint"]) == (settings["clip_model"], settings["clip_fingerprint"])


def test_serve_says_which_encoder_it_uses(exported_complete, hostile_cwd, monkeypatch):
    from fastapi.testclient import TestClient

    from clipcap.serve import create_app

    monkeypatch.chdir(hostile_cwd)
    with TestClient(create_app(Captioner.from_pretrained(exported_complete))) as client:
        encoder = client.get("/healthz").json()["encoder"]
    assert encoder == {"clip_model": str(exported_complete), "clip_fingerprint": fingerprint(exported_complete)}


def test_export_copies_the_model_dirs_encoder_not_the_cwds(varied_model_dir, hostile_cwd, tmp_path):
    done = clipcap("export", varied_model_dir, tmp_path / "out", cwd=hostile_cwd)
    assert done.returncode == 0, done.stderr
    assert fingerprint(tmp_path / "out" / "clip") == fingerprint(varied_model_dir / "clip")


def test_init_from_takes_the_lm_inside_the_model_dir(by_reference_dir, hostile_cwd, monkeypatch):
    from types import SimpleNamespace

    from clipcap.start import start_from
    from clipcap.train import TrainConfig

    monkeypatch.chdir(hostile_cwd)
    store = SimpleNamespace(clip_dim=16, clip_model=None, path="store")
    cfg = start_from(TrainConfig(data="store", out="run", init_from=str(by_reference_dir)), store)
    assert Path(cfg.lm) == by_reference_dir / "lm"


# -- an exported complete dir keeps its vision tower -------------------------------------------------------------
def test_an_exported_complete_dir_keeps_its_vision_tower(complete_dir, exported_complete):
    assert (exported_complete / "vision_tower.safetensors").is_file()
    assert json.loads((exported_complete / "config.json").read_text())["export"]["vision_tower"] == (
        "vision_tower.safetensors"
    )
    images = [PHOTO, *sorted(REAL_IMAGES.glob("*.jpg"))[1:3]]
    assert Captioner.from_pretrained(exported_complete).caption(images) == Captioner.from_pretrained(
        complete_dir
    ).caption(images)


@pytest.mark.parametrize(
    "damage, fragment",
    [
        ("truncate", "cannot load the vision tower"),
        ("delete", "vision_tower.safetensors is missing"),
        ("rename-entry", "export.vision_tower must name a .safetensors file in the dir"),
    ],
)
def test_a_damaged_exported_tower_is_one_line(damage, fragment, exported_complete, tmp_path):
    path = shutil.copytree(exported_complete, tmp_path / "exp")
    tower = path / "vision_tower.safetensors"
    if damage == "truncate":
        tower.write_bytes(tower.read_bytes()[:200])
    elif damage == "delete":
        tower.unlink()
    else:
        config = json.loads((path / "config.json").read_text())
        config["export"]["vision_tower"] = "../elsewhere.safetensors"
        (path / "config.json").write_text(json.dumps(config))
    one_line_error(clipcap("caption", PHOTO, "--model", path), "clipcap caption: error:", fragment)


# -- exporting a LoRA dir ----------------------------------------------------------------------------------------
def test_exporting_a_lora_dir_says_merge_it_first(tmp_path, tokenizer, lm_dir):
    model = tiny.tiny_model("mlp", lm=tiny.load_lm(lm_dir), lm_name=str(lm_dir), tune_lm=False)
    add_lora(model, 2, 4.0, 0.0)
    model.save_pretrained(tmp_path / "lora")
    tokenizer.save_pretrained(tmp_path / "lora")
    done = clipcap("export", tmp_path / "lora", tmp_path / "out")
    one_line_error(done, "clipcap export: error:", "holds a LoRA adapter", "merge it", "clipcap merge-lora")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


# -- the model card ------------------------------------------------------------------------------------------------
def python_blocks(card: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card, flags=re.S)


def run_card_code(code: str, cwd: Path) -> list[str]:
    """Run a card's Python example as a user would (fresh interpreter, offline, in `cwd`); its printed lines."""
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.splitlines()


@pytest.mark.parametrize("kind", ["model", "complete", "exported"])
def test_the_cards_examples_run_on_the_dir_they_describe(kind, dirs, tmp_path):
    """The card is written into (a copy of) the dir; its examples load the dir by its name from the dir's parent,
    with a photo.jpg there, and print the dir's captions."""
    model = shutil.copytree(dirs[kind], tmp_path / "someone-model")
    shutil.copy(PHOTO, tmp_path / "photo.jpg")
    card = write_card(CardConfig(model_dir=str(model))).read_text()
    blocks = python_blocks(card)
    expected = Captioner.from_pretrained(model).caption([tmp_path / "photo.jpg"], num_beams=5)
    assert run_card_code(blocks[-1], tmp_path) == [repr(expected)]
    if kind == "complete":
        assert 'pipeline("image-text-to-text", model="someone-model"' in blocks[0]
        greedy = Captioner.from_pretrained(model).caption([tmp_path / "photo.jpg"])[0]
        plain, prompted = run_card_code(blocks[0], tmp_path)
        assert plain == repr([{"input_text": "", "generated_text": greedy}])
        assert eval(prompted)[0]["generated_text"].startswith("a picture of")  # noqa: S307 - the card's own output
    else:
        assert "pipeline(" not in "".join(blocks)  # it would fail on this dir


def test_a_model_dir_card_says_how_to_make_it_complete_and_that_works(varied_model_dir, tmp_path):
    model = shutil.copytree(varied_model_dir, tmp_path / "someone-model")
    card = str(build_card(CardConfig(model_dir=str(model))))
    (snippet,) = re.findall(r'`(Captioner\.from_pretrained\("someone-model"\)\.save_pretrained\([^`]*\))`', card)
    run_card_code(f"from clipcap import Captioner\n{snippet}\n", tmp_path)
    complete_card = str(build_card(CardConfig(model_dir=str(tmp_path / "someone-model-complete"))))
    assert "pipeline(" in python_blocks(complete_card)[0]


@pytest.mark.parametrize("kind", ["model", "complete", "exported"])
def test_the_cards_install_line_names_this_distribution_and_its_extras(kind, dirs):
    card = str(build_card(CardConfig(model_dir=str(dirs[kind]))))
    installs = re.findall(r"pip install ['\"]?([\w.-]+)(?:\[([\w,]+)\])?", card)
    assert installs, card
    dist = distribution("clipcap-hf")
    extras = set(dist.metadata.get_all("Provides-Extra") or [])
    for name, extra in installs:
        assert name == "clipcap-hf" and set(filter(None, extra.split(","))) <= extras
    assert "clipcap" in (dist.read_text("top_level.txt") or "clipcap").split()
    assert ("[cpu]" in card) == (kind == "exported")


def test_no_message_names_the_unrelated_clipcap_package():
    wrong = re.compile(r"pip install ['\"]?clipcap(?![\w-])")
    for path in [*(REPO / "src" / "clipcap").rglob("*.py"), REPO / "README.md", *(REPO / "docs").glob("*.md")]:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            assert not wrong.search(line), f"{path}:{n}: {line.strip()}"


# -- found by reading the code -------------------------------------------------------------------------------------
def store(path: Path, clip_model, normalized: bool = False, captions=("a photo.",)) -> Path:
    with StoreWriter(path, clip_model=clip_model, clip_dim=16, normalized=normalized) as w:
        for i in range(3):
            w.add(np.full(16, 0.1 * (i + 1)), f"k{i}", list(captions), split="test")
    return path


def evaluate_store(model, data, out):
    return clipcap("evaluate", "--model", model, "--data", data, "--no-spice", "--no-clipscore", "--out", out)


def test_evaluate_refuses_an_l2_normalised_store_for_a_raw_model(varied_model_dir, tmp_path):
    data = store(tmp_path / "s", str(varied_model_dir / "clip"), normalized=True)
    done = evaluate_store(varied_model_dir, data, tmp_path / "m.json")
    one_line_error(done, "clipcap evaluate: error:", "holds L2-normalised embeddings but the model maps raw ones")
    assert not (tmp_path / "m.json").exists()


def test_evaluate_warns_about_a_store_that_records_no_encoder(varied_model_dir, tmp_path):
    done = evaluate_store(varied_model_dir, store(tmp_path / "s", None), tmp_path / "m.json")
    assert done.returncode == 0, done.stderr
    warning = [line for line in done.stderr.splitlines() if "records no encoder" in line]
    assert len(warning) == 1 and str(varied_model_dir / "clip") in warning[0]


@pytest.mark.parametrize("kind", ["source", "store", "predictions"])
def test_images_whose_references_are_all_blank_are_skipped_and_reported(kind, varied_model_dir, tmp_path):
    refs = {"1": ["a red circle.", ""], "2": ["", "  "], "3": ["a blue square."]}
    if kind == "source":
        images = []
        for key, caps in refs.items():
            Image.new("RGB", (32, 32), (40 * int(key), 90, 20)).save(tmp_path / f"{key}.png")
            images.append(
                {"filename": f"{key}.png", "cocoid": int(key), "split": "test", "sentences": [{"raw": c} for c in caps]}
            )
        data = tmp_path / "dataset_coco.json"
        data.write_text(json.dumps({"images": images}))
        args = ["--model", varied_model_dir, "--data", data]
    elif kind == "store":
        data = tmp_path / "s"
        with StoreWriter(data, clip_model=str(varied_model_dir / "clip"), clip_dim=16, normalized=False) as w:
            for key, caps in refs.items():
                w.add(np.full(16, 0.1 * int(key)), key, caps, split="test")
        args = ["--model", varied_model_dir, "--data", data]
    else:
        preds = tmp_path / "p.json"
        preds.write_text(json.dumps([{"image_id": int(k), "caption": "a red circle."} for k in refs]))
        (tmp_path / "r.json").write_text(json.dumps(refs))
        args = ["--predictions", preds, "--references", tmp_path / "r.json"]
    done = clipcap("evaluate", *args, "--no-spice", "--no-clipscore", "--out", tmp_path / "m.json")
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["num_images"] == 2
    # a store keeps no blank caption, so its image 2 holds none at all
    reason = "no reference captions" if kind == "store" else "every reference caption is empty"
    (item,) = metrics["skipped"]["items"]
    assert item["reason"] == reason and "2" in str(item["image"])
    assert "skipped 1 images" in done.stderr and reason in done.stderr
    assert "have no prediction" not in done.stderr
    with open(tmp_path / "m.csv", newline="") as f:
        rows = {row["image"]: json.loads(row["references"]) for row in csv.DictReader(f)}
    assert rows == {"1": ["a red circle."], "3": ["a blue square."]}  # image 1's blank reference is not scored


def test_config_records_a_portable_lm(tmp_path, lm_dir, tokenizer, monkeypatch):
    """Trained on `--lm lm` (a dir in the working directory): config.json says "lm" for a dir that holds the LM,
    the absolute path only for a LoRA dir, which refers to its LM; a Hub id stays a Hub id."""
    from clipcap.start import recorded_lm

    shutil.copytree(lm_dir, tmp_path / "lm")
    monkeypatch.chdir(tmp_path)
    with StoreWriter(tmp_path / "store", clip_model=None, clip_dim=16, normalized=False) as w:
        for i in range(4):
            w.add(np.full(16, 0.1 * i), f"k{i}", [tiny.CORPUS[i]])
    small = ["--prefix-length", "2", "--batch-size", "4", "--epochs", "1", "--warmup-steps", "0", "--quiet"]
    done = clipcap("train", "--data", "store", "--out", "run", "--lm", "lm", "--num-samples", "0", *small, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    config = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert config["lm"] == "lm"
    shutil.rmtree(tmp_path / "lm")  # the model dir holds its LM: it captions without the LM it came from
    assert ClipCapModel.from_pretrained(tmp_path / "run" / "final").config.lm == "lm"
    assert recorded_lm("gpt2", by_reference=True) == "gpt2" and recorded_lm("org/lm", by_reference=False) == "org/lm"
    (tmp_path / "lm2").mkdir()
    assert recorded_lm("lm2", by_reference=True) == str(tmp_path / "lm2")
    assert recorded_lm("lm2", by_reference=False) == "lm2"


def test_lora_from_a_model_refers_to_the_lm_that_model_names(by_reference_dir, hostile_cwd, tmp_path):
    """--init-from a frozen-LM dir whose config names "lm" (inside it) with --lora-r, run where ./lm is another
    LM: the LoRA dir refers to the model dir's LM, by the absolute path a LoRA dir needs."""
    with StoreWriter(tmp_path / "store", clip_model=None, clip_dim=16, normalized=False) as w:
        for i in range(4):
            w.add(np.full(16, 0.1 * i), f"k{i}", [tiny.CORPUS[i]])
    small = ["--batch-size", "4", "--epochs", "1", "--warmup-steps", "0", "--num-samples", "0", "--quiet"]
    run = tmp_path / "run"
    done = clipcap(
        "train", "--data", tmp_path / "store", "--out", run, "--init-from", by_reference_dir, "--lora-r", "2", *small,
        cwd=hostile_cwd,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads((run / "final" / "config.json").read_text())["lm"] == str((by_reference_dir / "lm").resolve())


@settings(max_examples=40, deadline=None)
@given(
    prefix=st.sampled_from(["", "./", "../", "./x/../"]),
    name=st.from_regex(r"[a-z][a-z0-9_.-]{0,6}(/[a-z][a-z0-9_-]{0,6}){0,2}", fullmatch=True),
    inside=st.booleans(),
)
def test_a_config_name_never_resolves_into_the_working_directory(prefix, name, inside):
    """Whatever the name, with an entry of that name in the working directory: the model dir's own entry when it
    has one, else an error (offline, so a Hub id cannot be fetched), never the working directory's entry."""
    from clipcap.hub import resolve_model_dir_name

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cwd, model = root / "A" / "CWD", root / "A" / "MODEL"  # upper case: no generated name is one of them
        (cwd / name).mkdir(parents=True)
        model.mkdir()
        if inside:
            (model / prefix / name).mkdir(parents=True, exist_ok=True)
        before = os.getcwd()
        os.chdir(cwd)
        try:
            if inside:
                found = resolve_model_dir_name(prefix + name, model, "CLIP encoder", "clip_model")
                assert Path(found).resolve() == (model / prefix / name).resolve()
            else:
                with pytest.raises(ClipCapError, match="not in the model dir"):
                    resolve_model_dir_name(prefix + name, model, "CLIP encoder", "clip_model")
        finally:
            os.chdir(before)
