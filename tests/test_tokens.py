"""Image tokens through every stage: `embed --tokens` -> `train --tokens` -> evaluate -> Captioner -> serve, and the
user mistakes along the way (each a one-line CLI error)."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from transformers import pipeline

from clipcap import Captioner, ClipCapError, ClipCapModel
from clipcap.caption_job import CaptionJobConfig, caption_job
from clipcap.card import CardConfig, build_card
from clipcap.cli import main
from clipcap.data.store import EmbeddingStore
from clipcap.encoder import ImageEncoder
from clipcap.evaluate import EvalConfig, evaluate_model
from clipcap.images import open_image
from clipcap.serve import create_app
from tests.test_caption_job import shard_rows

SAID = {  # image -> (its colour, the caption the tiny model is trained to say back)
    "red": ((255, 0, 0), "a large red circle on the left."),
    "blue": ((0, 0, 255), "a small blue square above a green triangle."),
    "green": ((0, 255, 0), "two people riding bikes down the street."),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A JSONL source of three solid-colour images (the random tiny CLIP tells them apart), each listed 5 times
    under its own key so one epoch is 5 steps, plus a test split of the three."""
    root = tmp_path_factory.mktemp("tokens-data")
    lines = []
    for name, (colour, caption) in SAID.items():
        Image.new("RGB", (32, 32), colour).save(root / f"{name}.png")
        lines += [{"image": f"{name}.png", "caption": caption, "key": f"{name}{i}", "split": "train"} for i in range(5)]
        lines.append({"image": f"{name}.png", "caption": caption, "key": name, "split": "test"})
    (root / "data.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root / "data.jsonl"


@pytest.fixture(scope="module")
def token_run(tmp_path_factory, source, clip_dir, lm_dir):
    out = tmp_path_factory.mktemp("tokens-run")
    store = out / "store"
    embed = ["embed", str(source), "--out", str(store), "--clip-model", str(clip_dir), "--workers", "0", "--quiet"]
    assert main([*embed, "--tokens", "--token-grid", "2"]) == 0
    args = ["train", "--data", str(store), "--out", str(out / "run"), "--lm", str(lm_dir), "--split", "train"]
    args += ["--mapping", "transformer", "--tokens", "--tune-lm", "--num-layers", "2", "--prefix-length", "4"]
    args += ["--epochs", "20", "--batch-size", "3", "--lr", "1e-2", "--warmup-steps", "0", "--num-samples", "0"]
    assert main(args) == 0
    return store, out / "run" / "final"


def test_embed_stores_pooled_embeddings_and_grid_pooled_tokens(token_run, clip_dir, source):
    store_dir, _ = token_run
    store = EmbeddingStore(store_dir, split="test")
    assert store.token_shape == (5, 32) and store.token_grid == 2  # class token + 2 x 2 cells of 4 x 4 patches
    encoder = ImageEncoder.from_pretrained(clip_dir)
    pixels = encoder.preprocess([open_image(source.parent / f"{n}.png") for n in SAID])
    pooled, tokens = encoder.encode_pixels_and_tokens(pixels, 2)
    np.testing.assert_allclose(store.image_tokens(), tokens.numpy(), rtol=1e-2, atol=1e-2)  # float16 on disk
    np.testing.assert_allclose(store.image_embeddings(), pooled.numpy(), rtol=1e-2, atol=1e-2)


def test_the_model_dir_records_what_it_reads(token_run):
    _, model_dir = token_run
    config = json.loads((model_dir / "config.json").read_text())
    assert (config["mapping"], config["token_shape"], config["token_grid"]) == ("transformer", [5, 32], 2)
    assert config["clip_length"] is None and config["normalize_prefix"] is False
    assert ClipCapModel.from_pretrained(model_dir).mapper.positions.shape == (5, 32)


def _evaluate(model_dir, data, **options):
    cfg = EvalConfig(model=str(model_dir), data=str(data), split="test", num_beams=1, max_new_tokens=40, spice=False)
    return evaluate_model(dataclasses.replace(cfg, **options))


def test_evaluate_caption_and_serve_agree(token_run, source, capsys):
    store, model_dir = token_run
    from_store, from_images = _evaluate(model_dir, store), _evaluate(model_dir, source)
    said = [caption for _, caption in SAID.values()]
    assert [r["prediction"] for r in from_store.rows] == said  # it learned to read the tokens
    assert [r["prediction"] for r in from_images.rows] == said
    # CLIPScore still reads the pooled features
    assert from_images.metrics["CLIPScore"] == pytest.approx(from_store.metrics["CLIPScore"], abs=1e-2)
    captioner = Captioner.from_pretrained(model_dir)
    images = [source.parent / f"{n}.png" for n in SAID]
    assert captioner.caption(images, max_new_tokens=40) == said
    # `clipcap caption` goes through the same Captioner
    capsys.readouterr()
    assert main(["caption", *map(str, images), "--model", str(model_dir), "--max-new-tokens", "40", "--quiet"]) == 0
    assert [json.loads(line)["caption"] for line in capsys.readouterr().out.splitlines()] == said
    with TestClient(create_app(captioner)) as client:
        buf = io.BytesIO()
        Image.open(images[1]).save(buf, "PNG")
        reply = client.post("/v1/captions", files=[("image", ("b.png", buf.getvalue(), "image/png"))])
        assert reply.status_code == 200 and reply.json()["results"][0]["captions"] == [said[1]]


def test_a_model_reading_tokens_refuses_an_encoder_of_another_width(token_run, tmp_path, tokenizer):
    from tests import tiny

    _, model_dir = token_run
    clip = tiny.tiny_clip(len(tokenizer))  # 16-d pooled features, as the model's encoder, but 24-wide tokens:
    config = clip.config.to_dict()
    config["vision_config"] |= {"hidden_size": 24, "intermediate_size": 48}
    other = tiny.save_clip_dir(tmp_path / "other", type(clip)(type(clip.config).from_dict(config)), tokenizer)
    with pytest.raises(ClipCapError, match="24-wide image tokens but the model reads 32-wide"):
        Captioner.from_pretrained(model_dir, clip_model=str(other))


@pytest.mark.parametrize("mapping", ["transformer", "mlp"])
def test_a_token_model_complete_piped_and_exported_says_the_same(token_run, mlp_token_run, source, tmp_path, mapping):
    """A model reading image tokens as a complete captioning dir (its vision tower gives the pooled tokens), through
    transformers' pipeline, and exported for ONNX Runtime: the model dir's captions, everywhere."""
    model_dir = token_run[1] if mapping == "transformer" else mlp_token_run
    images = [str(source.parent / f"{n}.png") for n in SAID]
    said = [caption for _, caption in SAID.values()]
    complete = Captioner.from_pretrained(model_dir).save_pretrained(tmp_path / "complete")
    config = json.loads((complete / "config.json").read_text())
    assert (config["mapping"], config["token_shape"], config["token_grid"]) == (mapping, [5, 32], 2)
    card = str(build_card(CardConfig(model_dir=str(model_dir), repo_id="someone/tokens")))
    prefix = 4 + (5 if mapping == "transformer" else 0)
    assert "last hidden states (5 tokens, the patch grid average-pooled to 2 × 2; beyond the paper) go" in card
    assert f"mapping network to a prefix of {prefix} vectors" in card
    assert Captioner.from_pretrained(complete).caption(images, max_new_tokens=40) == said
    piped = pipeline("image-text-to-text", model=str(complete))(images=images, text=[""] * 3, max_new_tokens=40)
    assert [r["generated_text"] for r in piped] == said
    pytest.importorskip("onnxruntime")
    from clipcap.export import export

    exported = Captioner.from_pretrained(export(model_dir, tmp_path / "exported", progress=False))
    assert exported.caption(images, max_new_tokens=40) == said
    with pytest.raises(ClipCapError, match=r"reads image tokens of shape \(B, 5, 32\), got \(3, 16\)"):
        exported.caption_embeddings(torch.zeros(3, 16))  # pooled embeddings given to a token model


@pytest.fixture(scope="module")
def complete_token_dir(token_run, tmp_path_factory):
    return Captioner.from_pretrained(token_run[1]).save_pretrained(tmp_path_factory.mktemp("complete") / "model")


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        ({"token_grid": 1}, "reads image tokens of shape (B, 5, 32), got (3, 2, 32)"),
        ({"token_grid": None}, "reads image tokens of shape (B, 5, 32), got (3, 17, 32)"),
        ({"token_grid": "2"}, "token_grid must be a positive integer"),
        ({"token_shape": [5, 24]}, "do not match config.json"),
        ({"token_shape": None}, "the transformer mapping needs clip_length"),  # a pooled-input transformer now
    ],
)
def test_a_damaged_complete_token_dir_is_one_line_error(complete_token_dir, source, tmp_path, capsys, edit, words):
    """A complete captioning dir of a token model whose config.json was edited against its weights or itself."""
    _caption_with_edited_config(complete_token_dir, edit, [source.parent / f"{n}.png" for n in SAID], tmp_path, capsys)
    _one_line_error(capsys, "caption", words)


def _caption_with_edited_config(model_dir, edit: dict, images: list, tmp_path, capsys) -> None:
    """`clipcap caption` with a copy of model_dir whose config.json got `edit`; it must fail (exit 2)."""
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(config | edit))
    capsys.readouterr()
    assert main(["caption", *map(str, images), "--model", str(copy), "--quiet"]) == 2


def test_evaluating_a_token_model_on_a_store_of_another_grid_is_refused(token_run, source, clip_dir, tmp_path):
    _, model_dir = token_run
    assert main(["embed", str(source), "--out", str(tmp_path / "s"), "--clip-model", str(clip_dir), "--workers",
                 "0", "--quiet", "--tokens"]) == 0  # fmt: skip
    shapes = r"tokens of shape \[17, 32\], but the model reads image tokens of shape \[5, 32\]"
    with pytest.raises(ClipCapError, match=shapes):
        _evaluate(model_dir, tmp_path / "s")


def _one_line_error(capsys, command: str, words: str) -> None:
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"clipcap {command}: error:") and "\n" not in err and words in err, err


def test_user_mistakes_are_one_line_errors(token_run, source, clip_dir, lm_dir, tmp_path, capsys):
    store, _ = token_run
    embed = ["embed", str(source), "--clip-model", str(clip_dir), "--workers", "0", "--quiet"]
    assert main([*embed, "--out", str(tmp_path / "a"), "--token-grid", "2"]) == 2
    _one_line_error(capsys, "embed", "--token-grid pools image tokens: it needs --tokens")
    assert main([*embed, "--out", str(tmp_path / "b"), "--tokens", "--text-only"]) == 2
    _one_line_error(capsys, "embed", "--tokens cannot go with --text-only")
    assert main([*embed, "--out", str(tmp_path / "c"), "--tokens", "--token-grid", "0"]) == 2
    _one_line_error(capsys, "embed", "--token-grid must be at least 1")
    with pytest.raises(SystemExit) as exit_:
        main([*embed, "--out", str(tmp_path / "d"), "--tokens", "--token-grid", "two"])
    assert exit_.value.code == 2 and "--token-grid: invalid int value: 'two'" in capsys.readouterr().err
    assert main([*embed, "--out", str(store), "--tokens"]) == 2  # resuming with another grid
    _one_line_error(capsys, "embed", "differs in: token_grid")
    plain = tmp_path / "plain"
    assert main([*embed, "--out", str(plain)]) == 0
    train = ["train", "--lm", str(lm_dir), "--epochs", "1", "--num-samples", "0"]
    assert main([*train, "--data", str(plain), "--out", str(tmp_path / "r1"), "--mapping", "transformer",
                 "--tokens"]) == 2  # fmt: skip
    _one_line_error(capsys, "train", "holds no image tokens")
    assert main([*train, "--data", str(plain), "--out", str(tmp_path / "r2"), "--mapping", "mlp", "--tokens"]) == 2
    _one_line_error(capsys, "train", "holds no image tokens")


def test_the_caption_budget_counts_one_prefix_vector_per_token(token_run, lm_dir, tmp_path):
    from clipcap.train import TrainConfig, Trainer

    store, _ = token_run
    fields = dict(data=str(store), lm=str(lm_dir), mapping="transformer", tokens=True, split="train", num_samples=0)
    # the tiny GPT-2 has 128 positions; 5 tokens + k = 100 leave 23 for the caption (67 asked)
    trainer = Trainer(TrainConfig(out=str(tmp_path / "a"), prefix_length=100, **fields))
    assert trainer.model.config.prefix_tokens == 105 and trainer.max_tokens == 128 - 105
    with pytest.raises(ClipCapError, match="a prefix of 128 vectors leaves no room in the LM's 128 positions"):
        Trainer(TrainConfig(out=str(tmp_path / "b"), prefix_length=123, **fields))


@pytest.fixture(scope="module")
def mlp_token_run(tmp_path_factory, token_run, lm_dir):
    """`--mapping mlp --tokens` trained on the token store: the model dir."""
    store, _ = token_run
    out = tmp_path_factory.mktemp("mlp-tokens-run")
    args = ["train", "--data", str(store), "--out", str(out / "run"), "--lm", str(lm_dir), "--split", "train"]
    args += ["--mapping", "mlp", "--tokens", "--tune-lm", "--prefix-length", "4", "--epochs", "20"]
    assert main([*args, "--batch-size", "3", "--lr", "1e-2", "--warmup-steps", "0", "--num-samples", "0"]) == 0
    return out / "run" / "final"


def test_the_mlp_mapper_reads_the_flattened_tokens(token_run, mlp_token_run, source):
    """`--mapping mlp --tokens`: the paper's MLP on the LayerNormed, flattened tokens; a prefix of k vectors."""
    store, _ = token_run
    model_dir = mlp_token_run
    config = json.loads((model_dir / "config.json").read_text())
    assert (config["mapping"], config["token_shape"], config["token_grid"]) == ("mlp", [5, 32], 2)
    model = ClipCapModel.from_pretrained(model_dir)
    assert model.config.prefix_tokens == 4 and model.mapper.mlp.model[0].in_features == 5 * 32
    tokens = torch.from_numpy(EmbeddingStore(store, split="test").image_tokens())
    assert model.prefix(tokens).shape == (3, 4, model.lm.config.hidden_size)
    images = [source.parent / f"{n}.png" for n in SAID]
    said = [caption for _, caption in SAID.values()]
    assert Captioner.from_pretrained(model_dir).caption(images, max_new_tokens=40) == said


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        ({"mapping": "transformer"}, "do not match config.json: missing ['mapper.linear.bias'"),
        ({"token_shape": [4, 32]}, "do not match config.json"),
        ({"token_shape": [5, "32"]}, "token_shape must hold two positive integers"),
        ({"token_shape": None}, "token_grid is set (2) but token_shape is not"),
        ({"normalize_prefix": True}, "normalize_prefix applies to pooled embeddings, not image tokens"),
    ],
)
def test_a_damaged_mlp_token_model_dir_is_one_line_error(mlp_token_run, source, tmp_path, capsys, edit, words):
    """An MLP-on-tokens model dir whose config.json was edited to disagree with its weights, or with itself:
    `clipcap caption` says so in one line."""
    _caption_with_edited_config(mlp_token_run, edit, [source.parent / "red.png"], tmp_path, capsys)
    _one_line_error(capsys, "caption", words)


def test_a_caption_job_reads_a_token_store(token_run, source, clip_dir, tmp_path):
    """`clipcap caption STORE --out` gives a token model the stored tokens; a store without tokens is refused."""
    store, model_dir = token_run
    args = ["--model", str(model_dir), "--max-new-tokens", "40", "--quiet", "--split", "test"]
    assert main(["caption", str(store), *args, "--out", str(tmp_path / "from-store")]) == 0
    said = [caption for _, caption in SAID.values()]
    assert sorted(r["caption"] for r in shard_rows(tmp_path / "from-store")) == sorted(said)
    pooled = tmp_path / "pooled"
    assert main(["embed", str(source), "--out", str(pooled), "--clip-model", str(clip_dir), "--workers", "0"]) == 0
    with pytest.raises(ClipCapError, match="holds no image tokens, but the model reads image tokens of shape"):
        caption_job(CaptionJobConfig(inputs=[str(pooled)], model=str(model_dir), out=str(tmp_path / "o")))
