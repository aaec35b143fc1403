"""A complete captioning dir in the transformers ecosystem: `pipeline("image-text-to-text")` gives Captioner's
captions, with clipcap imported and, through the code saved in the dir, where clipcap is not installed at all."""

from __future__ import annotations

import importlib.metadata as metadata
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from packaging.requirements import Requirement
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from clipcap import Captioner, ClipCapConfig, ClipCapModel
from clipcap.demo import world
from clipcap.demo.encoders import ASSETS

REAL_IMAGES = sorted((Path(__file__).parent / "fixtures" / "real-images").glob("*.jpg"))
PROMPT = "a large"
MAX_NEW_TOKENS = 12


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    """The twelve real photographs and eight shapes-world pictures."""
    folder = tmp_path_factory.mktemp("shapes")
    rng = np.random.default_rng(3)
    shapes = []
    for i in range(8):
        path = folder / f"shape-{i}.png"
        world.render(world.sample_scene(rng), rng=rng).save(path)
        shapes.append(str(path))
    assert len(REAL_IMAGES) == 12
    return [str(p) for p in REAL_IMAGES] + shapes


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    """A tiny ClipCap model on the shipped shapes-world encoders (a random MLP mapper, so captions are the LM's
    words but unrelated to the image), as a model dir with its encoder under clip/, and as a complete dir."""
    root = tmp_path_factory.mktemp("pipeline")
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "lm")
    lm = AutoModelForCausalLM.from_pretrained(ASSETS / "lm")
    torch.manual_seed(0)
    config = ClipCapConfig(
        lm=str(ASSETS / "lm"),
        clip_model="clip",
        clip_dim=128,
        prefix_length=4,
        stop_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = ClipCapModel(config, lm=lm)
    with torch.no_grad():
        for p in model.mapper.parameters():
            p.mul_(4.0)  # a prefix strong enough that different images give different captions
    plain = root / "plain"
    model.save_pretrained(plain)
    tokenizer.save_pretrained(plain)
    shutil.copytree(ASSETS / "clip", plain / "clip")
    complete = Captioner.from_pretrained(plain).save_pretrained(root / "complete")
    return {"plain": plain, "complete": complete}


@pytest.fixture(scope="module")
def reference(dirs, images) -> dict[str, list[str]]:
    captioner = Captioner.from_pretrained(dirs["plain"])
    return {
        "": captioner.caption(images, max_new_tokens=MAX_NEW_TOKENS),
        PROMPT: captioner.caption(images, max_new_tokens=MAX_NEW_TOKENS, prompt=PROMPT),
    }


def test_reference_captions_are_varied_and_prompted(reference):
    assert len(set(reference[""])) >= 4  # the images give different captions: a broken prefix would not
    assert all(c.startswith(PROMPT + " ") for c in reference[PROMPT]) and len(set(reference[PROMPT])) >= 4


def test_complete_dir_layout(dirs):
    complete = dirs["complete"]
    files = {p.name for p in complete.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "processor_config.json"} <= files
    assert {"tokenizer.json", "tokenizer_config.json"} <= files
    assert {"config.py", "model.py", "mapping.py", "processing.py", "hub.py", "errors.py"} <= files
    config = json.loads((complete / "config.json").read_text())
    assert config["model_type"] == "clipcap" and config["vision_config"]["model_type"] == "clip_vision_model"
    assert config["auto_map"]["AutoModelForImageTextToText"] == "model.ClipCapForImageCaptioning"
    generation = json.loads((complete / "generation_config.json").read_text())
    assert generation["eos_token_id"] == config["stop_token_id"] and generation["max_new_tokens"] == 67
    assert generation["num_beams"] == 1
    processor = json.loads((complete / "processor_config.json").read_text())
    assert processor["auto_map"]["AutoProcessor"] == "processing.ClipCapProcessor"


def test_captioner_on_the_complete_dir_gives_the_same_captions(dirs, images, reference):
    captioner = Captioner.from_pretrained(dirs["complete"])
    assert captioner.caption(images, max_new_tokens=MAX_NEW_TOKENS) == reference[""]
    assert captioner.caption(images, max_new_tokens=MAX_NEW_TOKENS, prompt=PROMPT) == reference[PROMPT]


def test_pipeline_with_clipcap_imported(dirs, images, reference):
    captioner = pipeline("image-text-to-text", model=str(dirs["complete"]))
    for prompt, expected in reference.items():
        out = captioner(images=images, text=[prompt] * len(images), max_new_tokens=MAX_NEW_TOKENS)
        assert [r["generated_text"] for r in out] == expected


# -- where clipcap is not installed --------------------------------------------------------------------------------
def _distributions(names: list[str]) -> list[metadata.Distribution]:
    """The installed distributions `names` need, their requirements included (extras left out)."""
    found: dict[str, metadata.Distribution] = {}
    todo = list(names)
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in found:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        found[key] = dist
        for requirement in map(Requirement, dist.requires or []):
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return list(found.values())


def _site_without_clipcap(root: Path) -> Path:
    """A site dir holding only transformers, torch, tokenizers, pillow and what they require (symlinks)."""
    site = root / "site"
    site.mkdir()
    for dist in _distributions(["transformers", "torch", "tokenizers", "pillow"]):
        base = Path(dist.locate_file(""))
        tops = {Path(f).parts[0] for f in dist.files or [] if Path(f).parts}
        for top in sorted(tops - {"..", "__pycache__"}):
            if not top.endswith(".pth") and (base / top).exists() and not (site / top).exists():
                (site / top).symlink_to(base / top)
    return site


ISOLATED = textwrap.dedent(
    """
    import importlib.util, json, sys
    assert importlib.util.find_spec("clipcap") is None, "clipcap must not be importable here"
    from transformers import pipeline
    model_dir, images, prompt, max_new_tokens = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    captioner = pipeline("image-text-to-text", model=model_dir, trust_remote_code=True)
    out = {}
    for text in ("", prompt):
        results = captioner(images=images, text=[text] * len(images), max_new_tokens=max_new_tokens)
        out[text] = [r["generated_text"] for r in results]
    one = captioner(images=images[0], text="", max_new_tokens=max_new_tokens)
    out["single"] = [r["generated_text"] for r in one]
    print(json.dumps(out))
    """
)


def test_pipeline_with_only_transformers_installed(dirs, images, reference, tmp_path):
    site = _site_without_clipcap(tmp_path)
    assert not any(p.name.startswith("clipcap") for p in site.iterdir())
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": str(site),
        "HF_HOME": str(tmp_path / "hf-home"),  # a fresh modules cache: the code comes from the model dir
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    args = [str(dirs["complete"]), json.dumps(images), PROMPT, str(MAX_NEW_TOKENS)]
    result = subprocess.run(
        [sys.executable, "-S", "-c", ISOLATED, *args], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out[""] == reference[""]  # token-identical greedy captions
    assert out[PROMPT] == reference[PROMPT] and all(c.startswith(PROMPT + " ") for c in out[PROMPT])
    assert out["single"] == reference[""][:1]
    cached = list((tmp_path / "hf-home").rglob("model.py"))
    assert cached and "ClipCapForImageCaptioning" in cached[0].read_text()
