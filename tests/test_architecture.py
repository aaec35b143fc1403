"""The library/application split: the core imports light, the library never prints, exits or names a flag, layers
import only downwards, and the library API is silent with progress off."""

from __future__ import annotations

import ast
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "clipcap"
APPLICATION = ("cli", "serve.py", "demo", "static")  # talks to people; everything else is the library
LIBRARY = sorted(
    p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0] not in APPLICATION and p.name != "__main__.py"
)
FLAG = __import__("re").compile(r"(?<![\w-])--[a-z][a-z0-9]*(-[a-z0-9]+)*")

# Which library modules may import which: a module may import from its own layer and the layers below it.
LAYERS = [
    {"errors", "version", "limits", "options", "devices", "images", "files", "hub", "jobs", "outputs"},
    {"config", "mapping", "decoding", "generation"},
    {"model", "processing", "data", "encoder", "exported", "ort_lm"},
    {"captioner", "convert", "checkpoint", "metrics", "export", "auto", "card", "lora", "rerank"},
    {"start", "embed", "train", "evaluate", "push", "caption_job", "caption_report", "ray_engine"},
    {"__init__"},
]


def test_core_import_is_light():
    code = (
        "import clipcap, sys; "
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('fastapi','uvicorn','matplotlib','accelerate')]; "
        "assert not heavy, heavy"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _strings_and_calls(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield "string", node.value, node.lineno
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
            yield "call", f"{owner}.{name}" if owner else name, node.lineno


def test_there_are_library_modules_to_check():
    names = {p.relative_to(PACKAGE).as_posix() for p in LIBRARY}
    assert {"model.py", "train.py", "embed.py", "evaluate.py", "data/sources.py", "captioner.py"} <= names
    assert not any(n.startswith(("cli/", "demo/")) or n == "serve.py" for n in names)


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_library_never_prints_exits_or_names_a_flag(path):
    for kind, value, line in _strings_and_calls(path):
        where = f"{path.relative_to(PACKAGE)}:{line}"
        if kind == "call":
            assert value not in ("print", "sys.exit", "exit", "quit", "os._exit"), f"{where} calls {value}"
        else:
            found = FLAG.search(value)
            assert found is None, f"{where} names the flag {found.group(0)!r} in {value[:80]!r}"


def _layer(module: str) -> int | None:
    head = module.split(".")[0]
    return next((n for n, layer in enumerate(LAYERS) if head in layer), None)


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_library_imports_only_downwards(path):
    rel = path.relative_to(PACKAGE)
    me = _layer(rel.parts[0].removesuffix(".py"))
    assert me is not None, f"{rel} is in no layer: add it to LAYERS"
    package = rel.parts[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom) or node.level == 0:
            continue
        base = list(package[: len(package) - node.level + 1])
        target = ".".join([*base, node.module] if node.module else base) or node.names[0].name
        if target.split(".")[0] in APPLICATION or target.split(".")[0] in ("cli", "serve", "demo"):
            pytest.fail(f"{rel} imports the application module {target}")
        layer = _layer(target)
        assert layer is not None and layer <= me, f"{rel} (layer {me}) imports {target} (layer {layer})"


def test_data_layer_does_not_import_the_encoder():
    for path in (PACKAGE / "data").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert "encoder" not in (node.module or ""), f"{path.name} imports {node.module}"


@pytest.fixture
def fresh_logging():
    """The "clipcap" logger as a program that never ran the CLI has it (in-process CLI tests configure it)."""
    logger = logging.getLogger("clipcap")
    saved = logger.handlers[:], logger.level, logger.propagate
    logger.handlers[:], logger.propagate = [], True
    logger.setLevel(logging.NOTSET)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


def test_the_library_api_is_silent_with_progress_off(tmp_path, capfd, model_dir, clip_dir, lm_dir, fresh_logging):
    """Caption, embed a small source, train a few steps, score predictions: nothing on stdout or stderr."""
    from clipcap import Captioner
    from clipcap.embed import EmbedConfig, embed
    from clipcap.evaluate import EvalConfig, evaluate
    from clipcap.train import TrainConfig, train

    capfd.readouterr()
    for i in range(4):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    rows = [{"image": f"{i}.png", "caption": f"a red circle number {i}."} for i in range(4)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    captions = Captioner.from_pretrained(model_dir).caption([tmp_path / "0.png"], max_new_tokens=4)
    store = embed(EmbedConfig(source=str(tmp_path / "data.jsonl"), out=str(tmp_path / "s"), clip_model=str(clip_dir)))
    cfg = TrainConfig(data=str(store.out), out=str(tmp_path / "run"), lm=str(lm_dir), epochs=1, batch_size=2)
    train(TrainConfig(**{**cfg.__dict__, "prefix_length": 2, "warmup_steps": 0, "num_samples": 0}))
    (tmp_path / "p.json").write_text(json.dumps({f"{i}.png": "a red circle." for i in range(4)}))
    result = evaluate(
        EvalConfig(predictions=str(tmp_path / "p.json"), references=str(tmp_path / "data.jsonl"), spice=False)
    )
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")
    assert len(captions) == 1 and (tmp_path / "run" / "final" / "model.safetensors").is_file()
    assert result.num_images == 4
