"""Training from an existing model (`init_from`: a trained model dir or a converted original checkpoint) and the
experiment trackers (`report_to`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from clipcap import ClipCapModel
from clipcap.convert import convert_original
from clipcap.errors import ClipCapError
from clipcap.train import TrainConfig, Trainer, train
from tests import original_clipcap as original
from tests import tiny
from tests.hostile import clipcap, one_line_error
from tests.test_train import metrics, one_thread, small_cfg, write_store  # noqa: F401 - one_thread is a fixture

CAPTIONS = [[tiny.CORPUS[i % 6], tiny.CORPUS[(i + 1) % 6]] for i in range(16)]


@pytest.fixture(scope="module")
def still_lm_dir(tmp_path_factory, tokenizer):
    """A tiny GPT-2 without dropout: a tuned LM's training-mode loss is then exactly its evaluation loss."""
    lm = tiny.tiny_gpt2(len(tokenizer))
    for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
        setattr(lm.config, name, 0.0)
    return tiny.save_lm_dir(tmp_path_factory.mktemp("still-lm"), type(lm)(lm.config).eval(), tokenizer)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    first = write_store(root / "first", CAPTIONS, seed=0)
    second = write_store(root / "second", CAPTIONS[::-1], seed=1)
    return first, second


@pytest.fixture(scope="module")
def trained(tmp_path_factory, stores, still_lm_dir):
    """A model trained on the first store (MLP + tuned LM)."""
    run = train(small_cfg(stores[0], tmp_path_factory.mktemp("base") / "run", still_lm_dir, epochs=2))
    return run / "final"


def first_batch_loss(cfg: TrainConfig, model_dir: Path) -> tuple[float, Trainer]:
    """The loss `model_dir`'s model gives on the first training batch of `cfg`, and the trainer for `cfg`."""
    trainer = Trainer(cfg)
    rows = trainer.epoch_steps(0)[0][0]
    batch = trainer.pairs.batch(rows)
    model = ClipCapModel.from_pretrained(model_dir).float()
    with torch.no_grad():
        loss = model(**batch, labels=batch["input_ids"]).loss.item()
    return loss, trainer


def test_warm_start_first_loss_is_the_loaded_models_loss(tmp_path, stores, trained, still_lm_dir):
    cfg = small_cfg(stores[1], tmp_path / "warm", still_lm_dir, epochs=1, init_from=str(trained))
    expected, trainer = first_batch_loss(cfg, trained)
    trainer.run()
    first = metrics(tmp_path / "warm")[0]
    assert first["step"] == 1
    assert abs(first["loss"] - expected) <= 1e-5
    fresh = train(small_cfg(stores[1], tmp_path / "fresh", still_lm_dir, epochs=1))
    assert abs(metrics(fresh)[0]["loss"] - expected) > 1e-2
    recorded = json.loads((tmp_path / "warm" / "train_config.json").read_text())
    assert recorded["init_from"] == str(trained.resolve())
    # The model's config decided the architecture; the result loads like any model dir.
    config = ClipCapModel.from_pretrained(tmp_path / "warm" / "final").config
    assert (config.mapping, config.prefix_length, config.tune_lm) == ("mlp", 4, True)


def test_warm_start_with_a_frozen_lm_trains_only_the_mapper(tmp_path, stores, trained, still_lm_dir):
    cfg = small_cfg(stores[1], tmp_path / "frozen", still_lm_dir, epochs=1, init_from=str(trained), tune_lm=False)
    trainer = Trainer(cfg)
    before = {k: v.clone() for k, v in trainer.model.lm.state_dict().items()}
    trainer.run()
    after = trainer.model.lm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert ClipCapModel.from_pretrained(tmp_path / "frozen" / "final").config.tune_lm is False


def test_warm_start_from_a_converted_original_checkpoint(tmp_path, stores, still_lm_dir):
    torch.manual_seed(0)
    orig = original.ClipCaptionModel(tiny.load_lm(still_lm_dir), prefix_length=4, prefix_size=16)
    torch.save(original.original_state_dict(orig), tmp_path / "coco.pt")
    converted = convert_original(tmp_path / "coco.pt", tmp_path / "converted", lm=str(still_lm_dir), clip_model="clip")
    cfg = small_cfg(stores[1], tmp_path / "warm", still_lm_dir, epochs=1, init_from=str(converted))
    expected, trainer = first_batch_loss(cfg, converted)
    trainer.run()
    assert abs(metrics(tmp_path / "warm")[0]["loss"] - expected) <= 1e-5


def test_options_that_contradict_the_model_are_errors(tmp_path, stores, trained, still_lm_dir):
    with pytest.raises(ClipCapError, match=r"`prefix_length` 7 contradicts .* whose model has 4"):
        Trainer(small_cfg(stores[1], tmp_path / "a", still_lm_dir, init_from=str(trained), prefix_length=7))
    with pytest.raises(ClipCapError, match=r"`mapping` 'transformer' contradicts .* 'mlp'"):
        Trainer(small_cfg(stores[1], tmp_path / "b", still_lm_dir, init_from=str(trained), mapping="transformer"))


def test_clip_dim_mismatch_fails_before_the_first_step(tmp_path, trained, still_lm_dir):
    from clipcap.data.store import StoreWriter

    with StoreWriter(tmp_path / "wide", clip_model="clip", clip_dim=24, normalized=False) as w:
        for i, caps in enumerate(CAPTIONS):
            w.add(torch.randn(24).numpy(), f"k{i}", caps)
    run = tmp_path / "run"
    done = clipcap("train", "--data", tmp_path / "wide", "--out", run, "--lm", still_lm_dir, "--init-from", trained)
    one_line_error(done, "16-d", "24-d", str(trained))
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()


def test_report_to_tensorboard_writes_the_loss_scalar(tmp_path, stores, still_lm_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = train(small_cfg(stores[0], tmp_path / "run", still_lm_dir, epochs=1, report_to="tensorboard"))
    events = list((run / "tensorboard").rglob("events.out.tfevents.*"))
    assert len(events) == 1
    reader = EventAccumulator(str(events[0].parent))
    reader.Reload()
    logged = [(e.step, e.value) for e in reader.Scalars("train/loss")]
    expected = [(m["step"], m["loss"]) for m in metrics(run) if m["type"] == "train"]
    assert [s for s, _ in logged] == [s for s, _ in expected]
    assert all(abs(a - b) <= 1e-6 for (_, a), (_, b) in zip(logged, expected, strict=True))
    assert "train/lr" in reader.Tags()["scalars"]
