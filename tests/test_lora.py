"""LoRA on the LM (peft): what trains, what is saved, reloading, resuming, and merging into a plain model dir."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clipcap import ClipCapModel
from clipcap.errors import ClipCapError
from clipcap.lora import MergeLoraConfig, add_lora, merge_lora
from clipcap.train import Trainer, train
from tests import tiny
from tests.hostile import clipcap, one_line_error
from tests.test_train import metrics, one_thread, small_cfg, write_store  # noqa: F401 - one_thread is a fixture

CAPTIONS = [[tiny.CORPUS[i % 6], tiny.CORPUS[(i + 1) % 6]] for i in range(16)]


@pytest.fixture(scope="module")
def store(tmp_path_factory, clip_dir):
    return write_store(tmp_path_factory.mktemp("store") / "s", CAPTIONS, clip_model=clip_dir)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, store, lm_dir):
    """A LoRA run (MLP mapper, rank 4) kept with its trainer, checkpointing every step."""
    cfg = small_cfg(store, tmp_path_factory.mktemp("lora") / "run", lm_dir, lora_r=4, save_every=1)
    trainer = Trainer(cfg)
    trainer.run()
    return trainer


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def logits(model: ClipCapModel, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(batch["clip_embeds"], batch["input_ids"], batch["attention_mask"]).logits


def test_only_mapper_and_adapters_train_and_the_base_lm_is_untouched(lora_run, lm_dir):
    model = lora_run.model
    names = {id(p): n for n, p in model.named_parameters()}
    optimized = {names[id(p)] for group in lora_run.optimizer.param_groups for p in group["params"]}
    adapters = {n for n in optimized if "lora_" in n}
    assert adapters and all(n.startswith("lm.") for n in adapters)
    assert optimized == {n for n in names.values() if n.startswith("mapper.")} | adapters
    assert all(".c_attn.lora_" in n for n in adapters)  # peft's default target for GPT-2
    base = {k.replace(".base_layer", ""): v for k, v in model.lm.get_base_model().state_dict().items()}
    saved = load_file(str(Path(lm_dir) / "model.safetensors"))
    assert saved and all(torch.equal(base[k], v) for k, v in saved.items())
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)  # B starts at 0: it trained


def test_saved_dir_is_mapper_and_adapter_and_reloads_with_equal_logits(lora_run, lm_dir):
    final = lora_run.run_dir / "final"
    assert set(load_file(str(final / "model.safetensors"))) == {
        k for k in lora_run.model.state_dict() if k.startswith("mapper.")
    }
    adapter = json.loads((final / "adapter" / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"], adapter["target_modules"]) == (4, 8.0, ["c_attn"])
    config = json.loads((final / "config.json").read_text())
    assert (config["adapter"], config["tune_lm"], config["lm"]) == ("adapter", False, str(lm_dir))
    batch = lora_run.pairs.batch(list(range(6)))
    reloaded = ClipCapModel.from_pretrained(final)
    assert torch.allclose(logits(reloaded, batch), logits(lora_run.model, batch), atol=1e-5, rtol=0)


def test_lora_dir_is_smaller_than_a_full_tuned_dir_by_the_lm(tmp_path, lora_run, store, lm_dir):
    from clipcap.demo.experiments import run_figures

    full_run = Trainer(small_cfg(store, tmp_path / "full", lm_dir, epochs=1))
    full = full_run.run() / "final"
    # what the tuning experiment reports: trainable parameters (from the saved files) and dir sizes
    for trainer in (lora_run, full_run):
        figures = run_figures(trainer.run_dir, 8)
        assert figures["trainable"] == sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        assert figures["dir_bytes"] == dir_bytes(trainer.run_dir / "final")
        logged = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
        assert figures["train_loss"] == [r for r in logged if r["type"] == "train"][-1]["loss"]
    final = lora_run.run_dir / "final"
    lm_bytes = (Path(lm_dir) / "model.safetensors").stat().st_size
    adapter_bytes = (final / "adapter" / "adapter_model.safetensors").stat().st_size
    assert adapter_bytes * 10 < lm_bytes
    # Everything else is shared: the full dir holds the LM's weights, the LoRA dir its adapter folder instead.
    assert dir_bytes(full) - dir_bytes(final) >= lm_bytes - dir_bytes(final / "adapter")
    assert (final / "model.safetensors").stat().st_size * 2 < (full / "model.safetensors").stat().st_size


def test_merged_dir_is_plain_and_gives_equal_logits_and_captions(tmp_path, lora_run, clip_dir):
    from clipcap import Captioner

    final = lora_run.run_dir / "final"
    done = clipcap("merge-lora", final, tmp_path / "merged")
    assert done.returncode == 0, done.stderr[-2000:]
    merged = tmp_path / "merged"
    assert not (merged / "adapter").exists()
    config = json.loads((merged / "config.json").read_text())
    assert (config["adapter"], config["tune_lm"]) == (None, True)
    batch = lora_run.pairs.batch(list(range(6)))
    plain = ClipCapModel.from_pretrained(merged)
    assert type(plain.lm).__name__ == "GPT2LMHeadModel"
    assert torch.allclose(logits(plain, batch), logits(lora_run.model, batch), atol=1e-5, rtol=0)
    from PIL import Image

    image = Image.new("RGB", (32, 32), (200, 30, 30))
    assert Captioner.from_pretrained(merged).caption([image]) == Captioner.from_pretrained(final).caption([image])


def test_resume_continues_the_adapters_exactly(tmp_path, lora_run):
    run = lora_run.run_dir
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "final")
    newest = sorted((copy / "checkpoints").glob("step-*"))[-1]
    shutil.rmtree(newest)  # resume from the step before the last
    train(small_cfg(lora_run.cfg.data, copy, lora_run.cfg.lm, lora_r=4, save_every=1, resume=True))
    for name in ("adapter/adapter_model.safetensors", "model.safetensors"):
        a, b = load_file(str(run / "final" / name)), load_file(str(copy / "final" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert metrics(copy) == [
        {**m, "samples_per_s": n["samples_per_s"]} for m, n in zip(metrics(run), metrics(copy), strict=True)
    ]


@pytest.mark.parametrize(
    "make, targets", [(tiny.tiny_opt, {"q_proj", "v_proj"}), (tiny.tiny_llama, {"q_proj", "v_proj"})]
)
def test_default_targets_are_the_attention_projections(make, targets):
    model = tiny.tiny_model("transformer", lm=make(300))
    add_lora(model, 2, 4.0, 0.0)
    trained = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in model.lm.named_parameters() if p.requires_grad}
    assert trained == targets


def test_lora_options_that_cannot_go_together(tmp_path, store, lm_dir):
    with pytest.raises(ClipCapError, match="excludes `tune_lm`"):
        small_cfg(store, tmp_path / "a", lm_dir, lora_r=4, tune_lm=True)
    with pytest.raises(ClipCapError, match="`lora_dropout` must be below 1"):
        small_cfg(store, tmp_path / "a", lm_dir, lora_r=4, lora_dropout=1.0)
    with pytest.raises(ClipCapError, match="has no LoRA adapter to merge"):
        merge_lora(
            MergeLoraConfig(
                model_dir=str(train(small_cfg(store, tmp_path / "f", lm_dir, epochs=1)) / "final"),
                out=str(tmp_path / "m"),
            )
        )


def test_lora_on_modules_the_lm_lacks_is_one_line(tmp_path, store, lm_dir):
    done = clipcap(
        "train", "--data", store, "--out", tmp_path / "run", "--lm", lm_dir, "--lora-r", "4",
        "--lora-target-modules", "q_proj,k_proj",
    )  # fmt: skip
    one_line_error(done, "q_proj, k_proj", "gpt2")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
