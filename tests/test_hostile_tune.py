"""Hostile input to training from an existing model, LoRA, trackers and `clipcap merge-lora`, through the real CLI
(all cases in one interpreter): one line on stderr, exit status 2, no traceback, no run started."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from clipcap.data.store import StoreWriter
from clipcap.lora import add_lora
from tests import tiny
from tests.cli_batch import assert_one_line_error, run_cli

SMALL = ["--prefix-length", "4", "--batch-size", "4", "--warmup-steps", "0", "--num-samples", "0", "--quiet"]


def make_store(path: Path, dim: int = 16) -> Path:
    rng = np.random.default_rng(0)
    with StoreWriter(path, clip_model="clip", clip_dim=dim, normalized=False) as w:
        for i in range(8):
            w.add(rng.normal(size=dim), f"k{i}", [tiny.CORPUS[i % len(tiny.CORPUS)]])
    return path


def damaged_copies(root: Path, model_dir: Path, tokenizer) -> dict[str, Path]:
    """Model dirs that cannot be started from, by name."""
    dirs = {}
    for name in ("no-config", "config-not-json", "weights-truncated", "weights-missing"):
        dirs[name] = shutil.copytree(model_dir, root / name)
    (dirs["no-config"] / "config.json").unlink()
    (dirs["config-not-json"] / "config.json").write_text("{oops")
    weights = dirs["weights-truncated"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    (dirs["weights-missing"] / "model.safetensors").unlink()
    dirs["plain-lm"] = tiny.save_lm_dir(root / "plain-lm", tiny.tiny_gpt2(len(tokenizer)), tokenizer)
    return dirs


def lora_dir(root: Path, tokenizer, lm_dir: Path) -> Path:
    model = tiny.tiny_model("mlp", lm=tiny.load_lm(lm_dir), lm_name=str(lm_dir), tune_lm=False)
    add_lora(model, 2, 4.0, 0.0)
    model.save_pretrained(root / "lora")
    tokenizer.save_pretrained(root / "lora")
    return root / "lora"


@pytest.fixture(scope="module")
def results(tmp_path_factory, model_dir, lm_dir, tokenizer):
    root = tmp_path_factory.mktemp("hostile-tune")
    store, wide = make_store(root / "store"), make_store(root / "wide", dim=24)
    damaged = damaged_copies(root, Path(model_dir), tokenizer)
    lora = lora_dir(root, tokenizer, Path(lm_dir))
    bad_adapter = shutil.copytree(lora, root / "bad-adapter")
    weights = bad_adapter / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    no_adapter = shutil.copytree(lora, root / "no-adapter")
    shutil.rmtree(no_adapter / "adapter")
    (root / "full-out").mkdir()
    (root / "full-out" / "x").write_text("x")
    (root / "a-file").write_text("x")

    def train(name, *extra, data=store):
        lm = [] if "--init-from" in extra else ["--lm", str(lm_dir)]  # the model's config names its LM
        return ["train", "--data", str(data), "--out", str(root / "runs" / name), *lm, *SMALL, *extra]

    cases = {
        "init-missing": train("init-missing", "--init-from", str(root / "nowhere")),
        "init-offline-id": train("init-offline-id", "--init-from", "someone/clipcap-coco"),
        **{f"init-{k}": train(f"init-{k}", "--init-from", str(v)) for k, v in damaged.items()},
        "init-clip-dim": train("init-clip-dim", "--init-from", str(model_dir), data=wide),
        "init-contradiction": train("init-contradiction", "--init-from", str(model_dir), "--prefix-length", "7"),
        "init-lora-dir": train("init-lora-dir", "--init-from", str(lora)),
        "lora-tune-lm": train("lora-tune-lm", "--lora-r", "4", "--tune-lm"),
        "lora-negative": train("lora-negative", "--lora-r", "-1"),
        "lora-not-int": train("lora-not-int", "--lora-r", "four"),
        "lora-dropout": train("lora-dropout", "--lora-r", "4", "--lora-dropout", "1.5"),
        "lora-alpha": train("lora-alpha", "--lora-r", "4", "--lora-alpha", "0"),
        "lora-no-targets": train("lora-no-targets", "--lora-r", "4", "--lora-target-modules", ","),
        "lora-wrong-targets": train("lora-wrong-targets", "--lora-r", "4", "--lora-target-modules", "q_proj"),
        "report-to-unknown": train("report-to-unknown", "--report-to", "mlflow"),
        "merge-missing": ["merge-lora", str(root / "nowhere"), str(root / "m1")],
        "merge-plain": ["merge-lora", str(model_dir), str(root / "m2")],
        "merge-bad-adapter": ["merge-lora", str(bad_adapter), str(root / "m3")],
        "merge-no-adapter": ["merge-lora", str(no_adapter), str(root / "m4")],
        "merge-out-full": ["merge-lora", str(lora), str(root / "full-out")],
        "merge-out-file": ["merge-lora", str(lora), str(root / "a-file")],
        "merge-onto-itself": ["merge-lora", str(lora), str(lora)],
    }
    if importlib.util.find_spec("wandb") is None:
        cases["report-to-wandb-missing"] = train("report-to-wandb-missing", "--report-to", "wandb")
    return root, run_cli(cases)


EXPECTED = {
    "init-missing": ("train", ["model directory not found"]),
    "init-offline-id": ("train", ["someone/clipcap-coco"]),
    "init-no-config": ("train", ["no config.json"]),
    "init-config-not-json": ("train", ["is not valid JSON"]),
    "init-weights-truncated": ("train", ["model.safetensors is not a readable safetensors file"]),
    "init-weights-missing": ("train", ["has no model.safetensors"]),
    "init-plain-lm": ("train", ['describes a "gpt2" model, not a ClipCap model']),
    "init-clip-dim": ("train", ["16-d", "24-d"]),
    "init-contradiction": ("train", ["--prefix-length 7 contradicts", "whose model has 4"]),
    "init-lora-dir": ("train", ["holds a LoRA adapter: merge it"]),
    "lora-tune-lm": ("train", ["--lora-r", "excludes --tune-lm"]),
    "lora-negative": ("train", ["--lora-r must be at least 0"]),
    "lora-not-int": ("train", ["--lora-r: invalid int"]),
    "lora-dropout": ("train", ["--lora-dropout must be below 1"]),
    "lora-alpha": ("train", ["--lora-alpha must be at least"]),
    "lora-no-targets": ("train", ["--lora-target-modules"]),
    "lora-wrong-targets": ("train", ["LoRA target modules q_proj: no module of the gpt2 LM", "its layers: c_attn"]),
    "report-to-unknown": ("train", ["--report-to", "mlflow"]),
    "report-to-wandb-missing": ("train", ["needs the wandb package"]),
    "merge-missing": ("merge-lora", ["model directory not found"]),
    "merge-plain": ("merge-lora", ["has no LoRA adapter to merge"]),
    "merge-bad-adapter": ("merge-lora", ["cannot load the LoRA adapter"]),
    "merge-no-adapter": ("merge-lora", ["has no LoRA adapter in adapter/"]),
    "merge-out-full": ("merge-lora", ["full-out is not empty (x)"]),
    "merge-out-file": ("merge-lora", ["a-file is a file, not a directory"]),
    "merge-onto-itself": ("merge-lora", ["is the input"]),
}


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_hostile_input_is_one_line(results, case):
    root, done = results
    if case not in done:
        pytest.skip("wandb is installed")
    command, fragments = EXPECTED[case]
    line = assert_one_line_error(done[case], command)
    for fragment in fragments:
        assert fragment in line, line
    run = root / "runs" / case
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()


def test_a_failed_merge_writes_nothing(results):
    root, _ = results
    assert not any((root / name).exists() for name in ("m1", "m2", "m3", "m4"))
    assert [p.name for p in (root / "full-out").iterdir()] == ["x"]
    assert json.loads((root / "lora" / "config.json").read_text())["adapter"] == "adapter"
