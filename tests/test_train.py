"""Training: tokenisation and dynamic padding, outputs, frozen vs tuned LM, exact resume after kill -9, DDP through
torchrun, CapDec text-only training, LM-text mixing, bad data and non-finite loss."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from clipcap import Captioner, ClipCapModel
from clipcap.cli import main as cli_main
from clipcap.data.pairs import CaptionPairs, PackedText, pad_batch, tokenize_captions
from clipcap.data.store import EmbeddingStore, StoreWriter
from clipcap.errors import ClipCapError
from clipcap.train import Objective, TrainConfig, Trainer, noise_injection, train
from tests import tiny

DIM = 16  # the tiny CLIP's projection size
LONG = " ".join(["a large red circle"] * 20) + "."
MOJIBAKE = "a caf\ufffd on the street."
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models gain nothing from intra-op threads; on a shared 2-core machine they only add contention.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_store(path, captions_per_image, clip_model="clip", modality="image", splits=None, seed=0, embeds=None):
    rng = np.random.default_rng(seed)
    with StoreWriter(path, clip_model=str(clip_model), clip_dim=DIM, normalized=False, modality=modality) as w:
        for i, caps in enumerate(captions_per_image):
            emb = embeds[i] if embeds is not None else rng.normal(size=DIM)
            w.add(emb, f"k{i}", caps, split=splits[i] if splits else None)
    return Path(path)


def small_cfg(data, out, lm_dir, **overrides) -> TrainConfig:
    fields = dict(
        data=str(data),
        out=str(out),
        lm=str(lm_dir),
        prefix_length=4,
        num_layers=2,
        epochs=2,
        batch_size=8,
        lr=1e-3,
        warmup_steps=0,
        log_every=1,
        save_every=1000,
        num_samples=2,
    )
    fields.update(overrides)
    return TrainConfig(**fields)


def lm_state(model_dir) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(Path(model_dir) / "model.safetensors")).items() if k.startswith("lm.")}


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def image_store(tmp_path_factory, clip_dir):
    """24 images x 2 captions from the tiny corpus; two bad captions; images 20-23 are the val split."""
    caps = [[tiny.CORPUS[i % 6], tiny.CORPUS[(i + 2) % 6]] for i in range(24)]
    caps[3][1] = LONG
    caps[5][0] = MOJIBAKE
    splits = ["train"] * 20 + ["val"] * 4
    return write_store(tmp_path_factory.mktemp("store") / "s", caps, clip_model=clip_dir, splits=splits)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, image_store, lm_dir):
    """One small MLP + tuned LM run with validation (shared by the output tests)."""
    out = tmp_path_factory.mktemp("run") / "run"
    cfg = small_cfg(image_store, out, lm_dir, split="train", val_split="val", max_caption_tokens=30, save_every=2)
    return train(cfg)


# -- tokenisation, padding, batches --------------------------------------------------------------------------------
def test_tokenize_appends_end_token_and_skips_bad_captions(tokenizer):
    caps = ["a red circle.", LONG, MOJIBAKE, "  two people riding bikes.  "]
    ids, problems = tokenize_captions(tokenizer, caps, max_tokens=30)
    eos = tokenizer.eos_token_id
    assert ids[0] == tokenizer("a red circle.", add_special_tokens=False)["input_ids"] + [eos]
    assert ids[3] == tokenizer("two people riding bikes.", add_special_tokens=False)["input_ids"] + [eos]
    assert ids[1] is None and problems[1].startswith("over-long (")
    assert ids[2] is None and problems[2].startswith("undecodable")
    assert problems[0] is None and problems[3] is None


def test_pad_batch_pads_to_the_longest_in_the_batch():
    ids, mask = pad_batch([[5, 6, 7], [8], [9, 10]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]


def test_caption_pairs_batches_are_dynamically_padded(image_store, tokenizer):
    store = EmbeddingStore(image_store, split="train")
    pairs = CaptionPairs(store, tokenizer, max_tokens=30, progress=False)
    assert len(store) == 40 and len(pairs) == 38
    assert sorted(s["reason"].split(" (")[0] for s in pairs.skipped) == ["over-long", "undecodable"]
    assert {s["key"] for s in pairs.skipped} == {"k3", "k5"}
    lengths = [len(pairs.token_ids(r)) for r in range(len(pairs))]
    rows = [r for r in range(len(pairs)) if lengths[r] < max(lengths)][:3]
    batch = pairs.batch(rows)
    assert batch["input_ids"].shape == (3, max(lengths[r] for r in rows)) and max(lengths[r] for r in rows) < max(
        lengths
    )
    for n, r in enumerate(rows):
        embedding, caption = store[int(pairs.pairs[r])]
        np.testing.assert_array_equal(batch["clip_embeds"][n].numpy(), embedding)
        ids = batch["input_ids"][n][batch["attention_mask"][n].bool()].tolist()
        assert ids == tokenizer(caption, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


# -- outputs --------------------------------------------------------------------------------------------------------
def test_run_writes_loadable_model_dirs_metrics_and_plot(run_dir, image_store, clip_dir, tokenizer):
    for name in ("final", "best"):
        model = ClipCapModel.from_pretrained(run_dir / name)
        assert model.config.clip_model == str(clip_dir)
        assert model.config.stop_token_id == tokenizer.eos_token_id and model.config.tune_lm
        assert (run_dir / name / "tokenizer.json").is_file()
    captioner = Captioner.from_pretrained(run_dir / "final", device="cpu")
    captions = captioner.caption([Image.new("RGB", (40, 40), (200, 30, 30))], max_new_tokens=5)
    assert len(captions) == 1 and isinstance(captions[0], str)

    rows = metrics(run_dir)
    train_rows = [r for r in rows if r["type"] == "train"]
    val_rows = [r for r in rows if r["type"] == "val"]
    # 38 usable training pairs, batch 8 -> 5 steps per epoch, 2 epochs, one log line per step
    assert [r["step"] for r in train_rows] == list(range(1, 11))
    assert [r["step"] for r in val_rows] == [5, 10]
    assert val_rows[1]["val_loss"] < val_rows[0]["val_loss"]
    samples = [r for r in rows if r["type"] == "samples"]
    assert len(samples) == 2 and [s["key"] for s in samples[0]["samples"]] == ["k20", "k21"]
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    skipped = [json.loads(line) for line in (run_dir / "skipped.jsonl").read_text().splitlines()]
    assert {s["key"] for s in skipped} == {"k3", "k5"}
    # checkpoints every 2 steps and at each epoch end; the newest two are kept
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000008", "step-00000010"]


def test_existing_run_needs_resume_and_cli_errors_are_one_line(run_dir, image_store, lm_dir, capsys):
    with pytest.raises(ClipCapError, match="already holds a training run"):
        Trainer(small_cfg(image_store, run_dir, lm_dir))
    code = cli_main(["train", "--data", str(image_store), "--out", str(run_dir), "--lm", str(lm_dir)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("clipcap train: error:") and "\n" not in err


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(text_only=True), "`text_only` trains on CLIP text embeddings"),
        (dict(mapping="transformer", lm_text_weight=1.0, lm_text="x.txt"), "`lm_text` needs `tune_lm`"),
        (dict(tune_lm=False, lm_lr=1e-5), "`lm_lr` needs `tune_lm`"),
        (dict(lm_text="x.txt"), "go together"),
        (dict(batch_size=0), "`batch_size` must be at least 1, got 0"),
        (dict(epochs="3"), "`epochs` must be int, got '3'"),
        (dict(mapping="lstm"), "`mapping` must be one of mlp, transformer"),
    ],
)
def test_bad_flag_combinations_raise(tmp_path, image_store, lm_dir, overrides, message):
    with pytest.raises(ClipCapError, match=message):
        Trainer(small_cfg(image_store, tmp_path / "run", lm_dir, **overrides))


def test_warmup_is_clipped_for_short_runs(tmp_path, image_store, lm_dir):
    trainer = Trainer(small_cfg(image_store, tmp_path / "run", lm_dir, warmup_steps=5000, epochs=20, split="train"))
    assert trainer.total_steps == 100 and trainer.warmup == 10
    factor = trainer.scheduler.lr_lambdas[0]  # the multiplier of --lr at each step
    assert [factor(s) for s in (0, 5, 10, 55, 100)] == [0.0, 0.5, 1.0, 0.5, 0.0]


# -- frozen vs tuned ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mapping, flag", [("transformer", None), ("mlp", False), ("mlp", True)])
def test_frozen_lm_trains_only_the_mapper(tmp_path, image_store, lm_dir, mapping, flag):
    cfg = small_cfg(image_store, tmp_path / "run", lm_dir, mapping=mapping, tune_lm=flag, epochs=1, num_samples=0)
    run = train(cfg)
    tuned = flag if flag is not None else mapping == "mlp"
    final = ClipCapModel.from_pretrained(run / "final")
    assert final.config.tune_lm is tuned
    original = tiny.load_lm(lm_dir).state_dict()
    changed = {k for k, v in lm_state(run / "final").items() if not torch.equal(v, original[k.removeprefix("lm.")])}
    checkpoint = sorted((run / "checkpoints").iterdir())[-1]
    optimized = {k.split(".")[0] for k in load_file(str(checkpoint / "optimizer.safetensors"))}
    mapper = [p for p in final.mapper.parameters()]
    lm_params = [p for p in final.lm.parameters()]
    if tuned:
        assert changed and len(optimized) == len(mapper) + len(lm_params)
    else:
        assert not changed and len(optimized) == len(mapper)


def test_lm_lr_is_a_separate_param_group(tmp_path, image_store, lm_dir):
    run = train(small_cfg(image_store, tmp_path / "run", lm_dir, epochs=1, lm_lr=1e-5, num_samples=0))
    state = json.loads(sorted((run / "checkpoints").iterdir())[-1].joinpath("trainer_state.json").read_text())
    assert [g["initial_lr"] for g in state["optimizer"]["param_groups"]] == [1e-3, 1e-5]


# -- exact resume ---------------------------------------------------------------------------------------------------
def test_resume_after_kill_9_matches_an_uninterrupted_run(tmp_path, image_store, lm_dir):
    common = dict(epochs=6, batch_size=4, save_every=2, keep_checkpoints=50, log_every=5, num_samples=0)
    killed = tmp_path / "killed"
    args = [
        "train",
        "--data",
        str(image_store),
        "--out",
        str(killed),
        "--lm",
        str(lm_dir),
        "--prefix-length",
        "4",
        "--lr",
        "1e-3",
        "--warmup-steps",
        "10",
    ]
    for key, value in common.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "clipcap.cli", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if any((killed / "checkpoints").glob("step-*")):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    assert not (killed / "final").exists()
    # a save cut short by the kill leaves a temporary dir, never a checkpoint: resume ignores and removes it
    (killed / "checkpoints" / ".step-00000099.tmp").mkdir(parents=True, exist_ok=True)

    cfg = dict(prefix_length=4, lr=1e-3, warmup_steps=10, **common)
    resumed = train(small_cfg(image_store, killed, lm_dir, resume=True, **cfg))
    reference = train(small_cfg(image_store, tmp_path / "reference", lm_dir, **cfg))
    assert not (killed / "checkpoints" / ".step-00000099.tmp").exists()
    a, b = (
        load_file(str(resumed / "final" / "model.safetensors")),
        load_file(str(reference / "final" / "model.safetensors")),
    )
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    # the resumed log has no duplicate steps and ends where the reference does
    steps = [r["step"] for r in metrics(resumed) if r["type"] == "train"]
    assert steps == sorted(set(steps)) == [r["step"] for r in metrics(reference) if r["type"] == "train"]


# -- DDP --------------------------------------------------------------------------------------------------------------
def equal_length_captions(tokenizer, n: int) -> list[str]:
    words = ["red", "blue", "green", "yellow", "purple", "orange"]
    shapes = ["circle", "square", "triangle"]
    candidates = [f"a {w} {s} on the left." for w in words for s in shapes]
    by_length: dict[int, list[str]] = {}
    for c in candidates:
        by_length.setdefault(len(tokenizer(c)["input_ids"]), []).append(c)
    group = max(by_length.values(), key=len)
    assert len(group) >= 4
    return [group[i % len(group)] for i in range(n)]


def test_two_process_ddp_through_torchrun_matches_one_process_with_double_batch(tmp_path, tokenizer, lm_dir):
    # Equal-length captions and a dropout-free (frozen) LM: mean of the two processes' gradients == the gradient of
    # their union, which is exactly the single process's batch under the same seeded order.
    captions = equal_length_captions(tokenizer, 32)
    store = write_store(tmp_path / "store", [[c] for c in captions])
    flags = dict(mapping="mlp", epochs=2, lr=1e-3, num_samples=0)
    ddp_out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "clipcap.cli"]
    cmd += ["train", "--data", str(store), "--out", str(ddp_out), "--lm", str(lm_dir), "--frozen-lm"]
    cmd += ["--prefix-length", "4", "--batch-size", "4", "--epochs", "2", "--lr", "1e-3", "--warmup-steps", "0"]
    cmd += ["--num-samples", "0", "--log-every", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "batch 4 x 2 processes" in done.stderr
    single = train(small_cfg(store, tmp_path / "single", lm_dir, tune_lm=False, batch_size=8, warmup_steps=0, **flags))
    # 32 pairs / 2 processes / batch 4 = 4 steps per epoch, the same steps as one process with batch 8
    assert [r["step"] for r in metrics(ddp_out) if r["type"] == "train"] == list(range(1, 9))
    a = load_file(str(ddp_out / "final" / "model.safetensors"))
    b = load_file(str(single / "final" / "model.safetensors"))
    for key in (k for k in a if k.startswith("mapper.")):
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)
    losses = [[r["loss"] for r in metrics(run) if r["type"] == "train"] for run in (ddp_out, single)]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)


def test_gradient_accumulation_matches_the_larger_batch(tmp_path, tokenizer, lm_dir):
    store = write_store(tmp_path / "store", [[c] for c in equal_length_captions(tokenizer, 32)])
    flags = dict(tune_lm=False, epochs=2, warmup_steps=0, num_samples=0)
    accumulated = train(small_cfg(store, tmp_path / "accum", lm_dir, batch_size=4, grad_accum=2, **flags))
    single = train(small_cfg(store, tmp_path / "single", lm_dir, batch_size=8, **flags))
    assert [r["step"] for r in metrics(accumulated) if r["type"] == "train"] == list(range(1, 9))
    a = load_file(str(accumulated / "final" / "model.safetensors"))
    b = load_file(str(single / "final" / "model.safetensors"))
    for key in (k for k in a if k.startswith("mapper.")):
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)


# -- text-only (CapDec) ---------------------------------------------------------------------------------------------
def test_noise_injection_is_capdec_noise():
    torch.manual_seed(0)
    x = torch.randn(2000, DIM) * 5
    y = noise_injection(x, 0.016)
    torch.testing.assert_close(y.norm(dim=-1), torch.ones(2000))
    # before renormalising, the noise has variance 0.016 per dimension: |n|^2 ~ 0.016 * DIM
    cos = (torch.nn.functional.normalize(x, dim=-1) * y).sum(-1)
    expected = 1 / torch.sqrt(torch.tensor(1 + 0.016 * DIM))
    assert abs(cos.mean().item() - expected.item()) < 0.02
    model = tiny.tiny_model("mlp", normalize_prefix=True)
    objective = Objective(model, noise_variance=0.016).eval()
    ids = torch.tensor([[5, 6, 7]])
    args = (x[:1], ids, torch.ones_like(ids))
    assert torch.equal(objective(*args)[0], objective(*args)[0])  # no noise at evaluation
    objective.train()
    model.lm.eval()  # dropout off: only the noise differs between the two calls below
    assert not torch.equal(objective(*args)[0], objective(*args)[0])


def test_text_only_training_learns_captions_and_captions_images(tmp_path, tokenizer, lm_dir, clip_dir):
    captions = tiny.CORPUS
    rng = np.random.default_rng(1)
    text_embeds = rng.normal(size=(len(captions), DIM))
    # one row per caption, as `clipcap embed --text-only` writes; ten copies make ten steps per epoch
    store = write_store(
        tmp_path / "text",
        [[c] for c in captions * 10],
        clip_model=clip_dir,
        modality="text",
        embeds=np.tile(text_embeds, (10, 1)),
    )
    with pytest.raises(ClipCapError, match="train on it with `text_only`"):
        Trainer(small_cfg(store, tmp_path / "no-flag", lm_dir))
    cfg = small_cfg(store, tmp_path / "run", lm_dir, text_only=True, epochs=10, batch_size=6, lr=1e-2, num_samples=0)
    cfg.log_every = 20
    run = train(cfg)
    model = ClipCapModel.from_pretrained(run / "final")
    assert model.config.normalize_prefix and model.config.clip_model == str(clip_dir)
    # the clean text embeddings (any scale: the prefix is normalised) decode to their captions
    ids = model.generate(torch.tensor(text_embeds, dtype=torch.float32) * 3, max_new_tokens=30)
    decoded = [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
    assert sum(d == c for d, c in zip(decoded, captions, strict=True)) >= 5, decoded
    captioner = Captioner.from_pretrained(run / "final", device="cpu")  # the image tower of the same CLIP
    assert len(captioner.caption([Image.new("RGB", (40, 40), (40, 70, 220))], max_new_tokens=5)) == 1


def test_text_only_trains_on_a_store_from_embed_text_only(tmp_path, lm_dir, clip_dir):
    from clipcap.embed import EmbedConfig, embed

    source = tmp_path / "captions.jsonl"
    source.write_text(
        "".join(json.dumps({"image": f"{i}.jpg", "caption": c}) + "\n" for i, c in enumerate(tiny.CORPUS))
    )
    out = str(tmp_path / "store")
    store = embed(EmbedConfig(source=str(source), out=out, clip_model=str(clip_dir), text_only=True, workers=0)).out
    run = train(small_cfg(store, tmp_path / "run", lm_dir, text_only=True, epochs=1, batch_size=3, num_samples=0))
    config = ClipCapModel.from_pretrained(run / "final").config
    assert config.normalize_prefix and config.clip_model == str(clip_dir) and config.clip_dim == DIM
    assert [r["step"] for r in metrics(run) if r["type"] == "train"] == [1, 2]


# -- LM-text mixing ---------------------------------------------------------------------------------------------------
def test_packed_text_blocks_cover_the_stream_once_per_cycle(tmp_path, tokenizer):
    text = tmp_path / "lm.txt"
    text.write_text("\n".join(tiny.CORPUS * 4) + "\n\n")
    packed = PackedText(text, tokenizer, block=8, seed=0)
    n = len(packed.blocks)
    stream = [t for c in tiny.CORPUS * 4 for t in tokenizer(c)["input_ids"] + [tokenizer.eos_token_id]]
    assert packed.blocks.flatten().tolist() == stream[: n * 8]
    # two processes drawing in turn: the first n draws visit every block exactly once, the next n start a new shuffle
    first = [packed.rows(*divmod(g, 2), 2, 1)[0] for g in range(n)]
    second = [packed.rows(*divmod(g, 2), 2, 1)[0] for g in range(n, 2 * n)]
    assert sorted(first) == sorted(second) == list(range(n)) and first != second
    again = PackedText(text, tokenizer, block=8, seed=0)
    assert torch.equal(packed.batch(3, 1, 2, 2), again.batch(3, 1, 2, 2))
    assert packed.batch(3, 1, 2, 2).shape == (2, 8)
    with pytest.raises(ClipCapError, match="fewer than one block"):
        PackedText(text, tokenizer, block=10_000, seed=0)


def test_lm_text_loss_keeps_the_language_model(tmp_path, image_store, lm_dir, tokenizer):
    text = tmp_path / "lm.txt"
    text.write_text("\n".join(f"the {c} {s} is next to the {s}." for c in ("red", "teal") for s in ("cube", "ring")))
    runs = {}
    for weight in (0.0, 1.0):
        extra = dict(lm_text=str(text), lm_text_weight=weight, lm_text_block=16) if weight else {}
        cfg = small_cfg(image_store, tmp_path / f"w{weight}", lm_dir, epochs=3, num_samples=0, **extra)
        runs[weight] = train(cfg)
    lm_rows = [r for r in metrics(runs[1.0]) if r["type"] == "train"]
    assert all("lm_loss" in r for r in lm_rows) and lm_rows[-1]["lm_loss"] < lm_rows[0]["lm_loss"]
    blocks = PackedText(text, tokenizer, block=16, seed=0).blocks

    def text_loss(run):
        lm = ClipCapModel.from_pretrained(run / "final").lm
        return lm(input_ids=blocks, labels=blocks).loss.item()

    assert text_loss(runs[1.0]) < text_loss(runs[0.0])


# -- non-finite loss ---------------------------------------------------------------------------------------------------
def test_non_finite_loss_stops_with_step_and_last_checkpoint(tmp_path, image_store, lm_dir):
    cfg = small_cfg(image_store, tmp_path / "run", lm_dir, lr=1e30, save_every=1, num_samples=0)
    with pytest.raises(ClipCapError, match=r"at step 2 .*last good checkpoint: .*step-00000001"):
        train(cfg)
