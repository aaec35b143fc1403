"""Resume integrity and nothing silently ignored (issue 28, classes 3 and 4), through the real CLI and the Python API.

Class 3: a job records everything that decides its output (every file of the model and encoder dirs, the items),
and a rerun with anything else is refused naming what changed (old -> new); `train --resume` refuses what decides
the model or the sample order and applies and records what may change (`train.RESUMABLE`).
Class 4: a typo in a LoRA target, an option that does nothing with the others given, an unknown decoding keyword, an
image behind a symlinked folder and non-UTF-8 file names are errors or handled, never quietly dropped."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from clipcap import Captioner
from clipcap.data.sources import read_folder, read_images
from clipcap.errors import ClipCapError
from clipcap.jobs import dir_fingerprint
from tests import tiny
from tests.hostile import clipcap, no_traceback, one_line_error
from tests.test_sources import write_image

SMALL = ["--prefix-length", 2, "--batch-size", 4, "--warmup-steps", 0, "--num-samples", 0, "--lr", "1e-3", "--quiet"]
TOKENS = ["--max-new-tokens", 3, "--quiet"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tiny.make_store(tmp_path_factory.mktemp("store") / "s")


def train(data, out, lm_dir, *extra):
    return clipcap("train", "--data", data, "--out", out, "--lm", lm_dir, *SMALL, *extra)


def rows(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


# -- class 3: every file of a model dir decides a job ---------------------------------------------------------------
@pytest.mark.parametrize(
    "name, counts",
    [
        ("mapper.onnx", True),
        ("decoder.onnx", True),
        ("config.json", True),
        ("generation_config.json", True),
        ("tokenizer.json", True),
        ("clip/preprocessor_config.json", True),  # the encoder dir inside an exported model
        ("clip/model.safetensors", True),
        ("README.md", False),  # a model card written later
        ("config.py", False),  # model code copied for trust_remote_code; clipcap runs its own
        (".git/HEAD", False),
    ],
)
def test_the_fingerprint_covers_every_file_that_decides_the_output(name, counts, tmp_path, exported_dir):
    model = shutil.copytree(exported_dir, tmp_path / "m")
    before = dir_fingerprint(model)
    assert before is not None
    target = model / name
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "ab") as f:
        f.write(b" ")
    assert (dir_fingerprint(model) != before) is counts


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    root = tmp_path_factory.mktemp("pictures")
    for i in range(3):
        write_image(root / f"{i}.png", seed=i)
    return root


def test_a_caption_job_resumed_after_the_exported_model_changed_is_refused(tmp_path, pictures, exported_dir):
    model, out = shutil.copytree(exported_dir, tmp_path / "exported"), tmp_path / "out"
    args = ["caption", pictures, "--model", model, "--out", out, "--shard-size", 1, "--workers", 0, *TOKENS]
    assert clipcap(*args).returncode == 0
    job = json.loads((out / "job.json").read_text())
    assert job["model_fingerprint"] is not None and job["clip_fingerprint"] is not None
    shard = out / "captions" / "part-00001.parquet"
    shard.unlink()  # an interrupted job: one shard left to do
    config = model / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "model_max_length": 7}))
    line = one_line_error(clipcap(*args), "differs in: model_fingerprint ")
    assert "->" in line and not shard.exists()  # nothing of the other model was written


def test_an_embed_job_resumed_with_another_encoder_or_source_is_refused(tmp_path, pictures, clip_dir):
    source = tmp_path / "d.jsonl"
    source.write_text(
        "".join(json.dumps({"image": str(pictures / f"{i}.png"), "caption": "x."}) + "\n" for i in range(3))
    )
    clip = shutil.copytree(clip_dir, tmp_path / "clip")
    args = [
        "embed",
        source,
        "--out",
        tmp_path / "s",
        "--clip-model",
        clip,
        "--shard-size",
        1,
        "--workers",
        0,
        "--quiet",
    ]
    assert clipcap(*args).returncode == 0
    (tmp_path / "s" / "img_emb" / "img_emb_2.npy").unlink()
    (clip / "preprocessor_config.json").write_text(
        json.dumps({**json.loads((clip / "preprocessor_config.json").read_text()), "crop_size": 30})
    )
    one_line_error(clipcap(*args), "differs in: clip_files ")
    shutil.rmtree(clip)
    shutil.copytree(clip_dir, clip)
    source.write_text(source.read_text().replace('"x."', '"y."', 1))  # a caption edited since
    one_line_error(clipcap(*args), "differs in: records_sha256 ")


# -- class 3: train --resume ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def started(tmp_path_factory, store, lm_dir):
    """A finished 1-epoch run (3 steps, a checkpoint after the epoch), copied by each test that resumes it."""
    run = tmp_path_factory.mktemp("started") / "run"
    done = train(store, run, lm_dir, "--epochs", 1, "--log-every", 1)
    assert done.returncode == 0, done.stderr
    return run


@pytest.mark.parametrize(
    "args, fragments",
    [
        (
            ["--mapping", "transformer", "--num-layers", 1],
            ['--mapping "mlp" -> "transformer"', "--num-layers null -> 1"],
        ),
        (["--prefix-length", 3], ["--prefix-length 2 -> 3"]),
        (["--frozen-lm"], ["true -> false"]),
        (["--seed", 5], ["--seed 0 -> 5"]),
        (["--lora-r", 2], ["--lora-r 0 -> 2"]),
        (["--max-caption-tokens", 9], ["--max-caption-tokens 67 -> 9"]),
        (["--data", "OTHER"], ["--data "]),
        (["--lm", "OTHER-LM"], ["--lm "]),
    ],
)
def test_resuming_with_what_decides_the_model_is_refused_naming_old_and_new(
    args, fragments, started, tmp_path, store, lm_dir, tokenizer
):
    run = shutil.copytree(started, tmp_path / "run")
    other_lm = tiny.save_lm_dir(tmp_path / "lm2", tiny.tiny_gpt2(len(tokenizer), seed=3), tokenizer)
    other = {"OTHER": tiny.make_store(tmp_path / "other", seed=1), "OTHER-LM": other_lm}
    args = [other.get(a, a) for a in args]  # a later --data / --lm wins over the one train() gives
    done = train(store, run, lm_dir, "--epochs", 2, "--resume", *args)
    one_line_error(done, f"cannot resume {run / 'checkpoints'}", "may change only --epochs, --lr, --lm-lr", *fragments)
    assert len(rows(run, "train")) == len(rows(started, "train"))  # nothing trained


def test_resuming_with_another_lr_and_epochs_applies_and_records_them(started, tmp_path, store, lm_dir):
    run = shutil.copytree(started, tmp_path / "run")
    done = train(store, run, lm_dir, "--epochs", 2, "--resume", "--lr", "0.5", "--log-every", 1)
    no_traceback(done)
    assert done.returncode == 0, done.stderr
    (resume,) = rows(run, "resume")
    assert resume == {"type": "resume", "step": 3, "changed": {"epochs": [1, 2], "lr": [0.001, 0.5]}}
    assert json.loads((run / "train_config.json").read_text())["lr"] == 0.5
    # the schedule now decays 0.5 linearly to 0 over 6 steps: the lr logged after step s is 0.5 * (6 - s) / 6
    after = [(r["step"], r["lr"]) for r in rows(run, "train") if r["step"] > 3]
    assert [s for s, _ in after] == [4, 5, 6]
    assert [lr for _, lr in after] == pytest.approx([0.5 * (6 - s) / 6 for s in (4, 5, 6)])
    state = json.loads(sorted((run / "checkpoints").iterdir())[-1].joinpath("trainer_state.json").read_text())
    assert state["config"]["lr"] == 0.5 and state["config"]["epochs"] == 2
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == [0.0, 0.0]  # the end of the new schedule


def test_resuming_with_the_same_settings_spelled_differently_is_accepted(started, tmp_path, store, lm_dir):
    run = shutil.copytree(started, tmp_path / "run")
    # --tune-lm is what the MLP mapper defaulted to; --num-layers means nothing to it; the store by another path
    other_path = os.path.relpath(store, tmp_path)
    done = clipcap("train", "--data", other_path, "--out", run, "--lm", lm_dir, *SMALL, "--epochs", 1, "--resume",
                   "--tune-lm", "--num-layers", 3, "--log-every", 1, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert rows(run, "resume") == []


# -- class 4: what was typed is never ignored -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--lora-r", 2, "--lora-target-modules", "c_atn,c_proj"], ["c_atn", "no module of the gpt2 LM", "c_attn"]),
        (["--lora-r", 2, "--lora-target-modules", "q_proj"], ["q_proj", "its layers: c_attn"]),
        (["--lora-target-modules", "c_attn"], ["--lora-target-modules configures LoRA: it needs --lora-r"]),
        (["--lora-alpha", 8], ["--lora-alpha configures LoRA: it needs --lora-r"]),
        (["--lora-dropout", 0.2], ["--lora-dropout configures LoRA"]),
        (["--noise-variance", 0.1], ["--noise-variance is CapDec's noise", "needs --text-only"]),
        (["--lm-text-block", 8], ["--lm-text-block packs", "needs --lm-text"]),
        (["--val-every", 2], ["--val-every validates: it needs --val-data or --val-split"]),
        (["--clip-length", 3], ["--clip-length sizes the Transformer mapper"]),
        (["--mapping", "transformer", "--tokens", "--clip-length", 3], ["--clip-length sizes"]),
    ],
)
def test_an_option_that_would_do_nothing_is_one_line(args, fragments, tmp_path, store, lm_dir):
    one_line_error(train(store, tmp_path / "run", lm_dir, "--epochs", 1, *args), "clipcap train: error:", *fragments)
    assert not (tmp_path / "run" / "final").exists()


def test_lora_on_every_named_module_trains_each(tmp_path, store, lm_dir):
    done = train(store, tmp_path / "run", lm_dir, "--epochs", 1, "--lora-r", 2, "--lora-target-modules", "c_attn,c_fc")
    assert done.returncode == 0, done.stderr
    config = json.loads((tmp_path / "run" / "final" / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["c_attn", "c_fc"]


@pytest.fixture(scope="module")
def captioner(model_dir):
    return Captioner.from_pretrained(model_dir)


@pytest.mark.parametrize(
    "kwargs, fragments",
    [
        ({"num_beam": 4}, ["num_beam", "did you mean num_beams"]),
        ({"temprature": 0.5, "do_sample": True}, ["temprature", "temperature"]),
        ({"max_tokens": 3}, ["max_tokens", "max_new_tokens"]),
        ({"zzz": 1}, ["zzz", "e.g. num_beams"]),
    ],
)
def test_an_unknown_decoding_keyword_raises_naming_it(kwargs, fragments, captioner, pictures):
    with pytest.raises(ClipCapError) as error:
        captioner.caption(pictures / "0.png", **kwargs)
    assert all(f in str(error.value) for f in fragments), str(error.value)
    with pytest.raises(ClipCapError, match=re.escape(next(iter(kwargs)))):
        captioner.model.generate(torch.randn(1, captioner.model.config.clip_dim), **kwargs)


def test_an_unknown_decoding_keyword_raises_for_an_exported_model_too(exported_dir, pictures):
    exported = Captioner.from_pretrained(exported_dir)
    with pytest.raises(ClipCapError, match="num_beam: did you mean num_beams"):
        exported.caption(pictures / "0.png", num_beam=2)
    assert exported.caption(pictures / "0.png", max_new_tokens=3, min_new_tokens=1)  # a real option works


def test_images_under_a_symlinked_folder_are_captioned_and_a_cycle_ends(tmp_path, model_dir):
    elsewhere, root = tmp_path / "elsewhere", tmp_path / "root"
    write_image(elsewhere / "a.png", seed=1)
    write_image(root / "b.png", seed=2)
    (root / "linked").symlink_to(elsewhere, target_is_directory=True)
    (root / "loop").symlink_to(root, target_is_directory=True)  # a cycle: root/loop/loop/... must not hang
    (elsewhere / "back").symlink_to(elsewhere, target_is_directory=True)
    done = clipcap("caption", root, "--model", model_dir, "--workers", 0, "--format", "jsonl", *TOKENS)
    assert done.returncode == 0, done.stderr
    keys = [json.loads(line)["image"] for line in done.stdout.splitlines()]
    assert keys == [str(root / "b.png"), str(root / "linked" / "a.png")]
    # the folder source of `embed` walks the same way
    write_image(root / "linked2" / "c.png", seed=3)
    assert [r.key for r in read_folder(root)] == ["b", "linked/a", "linked2/c"]


def _unescape(key: str) -> bytes:
    return re.sub(rb"\\(\\|x[0-9a-f]{2})", lambda m: b"\\" if m[1] == b"\\" else bytes.fromhex(m[1][1:].decode()),
                  key.encode("utf-8"))  # fmt: skip


names = st.binary(min_size=1, max_size=40).filter(lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b".."))


@pytest.mark.skipif(sys.platform != "linux", reason="arbitrary bytes in file names are a Linux (POSIX) matter")
@given(st.lists(names, min_size=1, max_size=6, unique=True))
def test_keys_of_any_file_names_are_distinct_text_that_reads_back(tmp_path_factory, raw_names):
    folder = tmp_path_factory.mktemp("names")
    paths = [os.path.join(os.fsencode(folder), name + b".png") for name in raw_names]
    for path in paths:
        with open(path, "wb"):
            pass
    records = list(read_images([folder]))
    keys = [r.key for r in records]
    assert len(set(keys)) == len(paths)
    for key in keys:
        key.encode("utf-8")  # writable as it is
    assert sorted(_unescape(k) for k in keys) == sorted(paths)


def test_two_non_utf8_names_stay_two_keys_through_the_cli(tmp_path, model_dir):
    folder = os.fsencode(tmp_path / "imgs")
    os.mkdir(folder)
    for name in (b"\xff.png", b"\xfe.png", b"\\xff.png"):
        write_image(Path(os.fsdecode(os.path.join(folder, name))), seed=len(name))
    done = clipcap("caption", tmp_path / "imgs", "--model", model_dir, "--workers", 0, "--format", "jsonl", *TOKENS)
    assert done.returncode == 0, done.stderr
    keys = sorted(json.loads(line)["image"].rsplit("/", 1)[-1] for line in done.stdout.splitlines())
    assert keys == ["\\\\xff.png", "\\xfe.png", "\\xff.png"]


def test_an_unknown_save_pretrained_keyword_raises_naming_it(captioner, tmp_path):
    with pytest.raises(ClipCapError, match="unknown save_pretrained argument safe_serialisation .*max_shard_size"):
        captioner.save_pretrained(tmp_path / "complete", safe_serialisation=False)
    with pytest.raises(ClipCapError, match="unknown save_pretrained argument shard_size"):
        captioner.model.save_pretrained(tmp_path / "model", shard_size="1GB")
    assert not (tmp_path / "complete").exists() and not (tmp_path / "model").exists()


def test_scoring_predictions_with_a_clip_model_and_clipscore_off_is_one_line(tmp_path, clip_dir):
    preds, refs = tmp_path / "p.json", tmp_path / "r.json"
    preds.write_text(json.dumps([{"image_id": 1, "caption": "a cat."}]))
    refs.write_text(json.dumps({"1": ["a cat.", "a small cat."]}))
    done = clipcap("evaluate", "--predictions", preds, "--references", refs, "--no-spice", "--no-clipscore",
                   "--clip-model", clip_dir, "--out", tmp_path / "m.json")  # fmt: skip
    one_line_error(done, "--clip-model is only used for CLIPScore, which --no-clipscore turns off")
    assert not (tmp_path / "m.json").exists()


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--images", "IMGS"], ["a folder source holds its images: an image root", "does nothing for it"]),
        (
            ["--caption-column", "text"],
            ["a column name (text) applies to CSV, JSONL and parquet sources, not to folder"],
        ),
    ],
)
def test_embed_options_a_source_format_does_not_read_are_one_line(extra, fragments, tmp_path, pictures, clip_dir):
    extra = [str(pictures) if a == "IMGS" else a for a in extra]
    done = clipcap("embed", pictures, "--format", "folder", "--out", tmp_path / "s", "--clip-model", clip_dir, *extra)
    one_line_error(done, "clipcap embed: error:", *fragments)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("flag", ["--clip-length", "--num-layers"])
def test_converting_an_mlp_checkpoint_with_a_transformer_setting_is_one_line(flag, tmp_path, lm_dir):
    from tests.test_convert import make_original

    make_original(lm_dir, "mlp", tmp_path / "mlp.pt")
    done = clipcap("convert", tmp_path / "mlp.pt", tmp_path / "out", "--lm", lm_dir, flag, 3)
    one_line_error(done, f"{flag} is a setting of the Transformer mapper, but {tmp_path / 'mlp.pt'} holds an MLP")
    assert not (tmp_path / "out").exists()


def test_a_job_record_names_each_change_and_tells_another_command_apart(tmp_path):
    from clipcap.jobs import claim_job

    claim_job(tmp_path / "j", {"a": 1, "d": {"x": 1, "y": 2}}, "clipcap embed", "store")
    # an older version's record lacks a newer field: it shows as changed from null, not as another command
    with pytest.raises(ClipCapError, match=r"\(differs in: b null -> 2, d\.y 2 -> 3\); use another output dir"):
        claim_job(tmp_path / "j", {"a": 1, "b": 2, "d": {"x": 1, "y": 3}}, "clipcap embed", "store")
    with pytest.raises(ClipCapError, match="holds the output of another command, not a caption job"):
        claim_job(tmp_path / "j", {"command": "caption", "a": 1}, "clipcap caption", "caption job")
