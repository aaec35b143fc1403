"""Captioner end to end on a tiny model dir: loading, batching, decoding, decoding defaults from the model dir."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from clipcap import Captioner, ClipCapConfig, ClipCapError
from clipcap.images import ImageLoadError
from tests import tiny


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imgs")
    paths = []
    for i in range(7):
        rng = np.random.default_rng(i)
        paths.append(folder / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def captioner(varied_model_dir):
    return Captioner.from_pretrained(varied_model_dir)


def expected_captions(cap: Captioner, images, **kwargs) -> list[str]:
    """The pipeline by hand: encoder features -> generate -> cut after the stop token -> decode."""
    ids = cap.model.generate(cap.encoder.encode(images), **kwargs)
    stop = cap.model.config.stop_token_id
    texts = []
    for row in ids.tolist():
        row = row[: row.index(stop) + 1] if stop in row else row
        texts.append(cap.tokenizer.decode(row, skip_special_tokens=True).strip())
    return texts


def test_end_to_end_on_paths_and_pil_images(captioner, images):
    captions = captioner.caption(images, max_new_tokens=10)
    assert isinstance(captions, list) and len(captions) == 7 and all(isinstance(c, str) for c in captions)
    assert captions == expected_captions(captioner, images, max_new_tokens=10)
    assert len(set(captions)) > 3 and all(c for c in captions)  # varied, non-empty
    assert captioner.caption([Image.open(p) for p in images], max_new_tokens=10) == captions
    assert captioner.caption(images[2], max_new_tokens=10) == captions[2:3]  # a single image is a list of one


def test_decoded_text_is_clean(captioner, images):
    tok = captioner.tokenizer
    stop = captioner.model.config.stop_token_id
    assert tok.convert_ids_to_tokens(stop) == "."
    for caption in captioner.caption(images, max_new_tokens=30):
        assert caption == caption.strip()
        assert "<|endoftext|>" not in caption
        assert caption.count(".") <= 1 and (caption.endswith(".") or "." not in caption)  # nothing after the stop
    red, circle = tok.encode(" red"), tok.encode(" circle")
    assert tok.decode(red + circle) == " red circle"
    pad = captioner.model.pad_token_id
    n = len(red + circle + red + circle + red)
    rows = [red + circle + [stop], red + [stop] + circle + red, red + circle + red + circle + red]
    ids = torch.tensor([row + [pad] * (n - len(row)) for row in rows])
    assert captioner.decode(ids) == ["red circle.", "red.", "red circle red circle red"]


def test_multiple_captions_per_image_are_lists(captioner, images):
    lists = captioner.caption(images[:3], num_beams=4, num_return_sequences=3, max_new_tokens=8)
    assert len(lists) == 3 and all(isinstance(c, list) and len(c) == 3 for c in lists)
    best = captioner.caption(images[:3], num_beams=4, max_new_tokens=8)
    assert [c[0] for c in lists] == best
    torch.manual_seed(0)
    sampled = captioner.caption(images[:2], do_sample=True, num_return_sequences=4, max_new_tokens=8)
    assert [len(c) for c in sampled] == [4, 4]
    with pytest.raises(ClipCapError, match="3 captions per image need at least 3 beams"):
        captioner.caption(images[:1], num_return_sequences=3)


def test_batch_boundaries_do_not_change_captions(varied_model_dir, images):
    big = Captioner.from_pretrained(varied_model_dir, batch_size=64)
    small = Captioner.from_pretrained(varied_model_dir, batch_size=2)
    for kwargs in (dict(), dict(num_beams=3)):
        assert small.caption(images, max_new_tokens=12, **kwargs) == big.caption(images, max_new_tokens=12, **kwargs)


def test_relative_clip_model_resolves_against_the_model_dir(varied_model_dir, tmp_path, monkeypatch):
    assert ClipCapConfig.from_pretrained(varied_model_dir).clip_model == "clip"
    monkeypatch.chdir(tmp_path)  # "clip" does not exist here
    cap = Captioner.from_pretrained(varied_model_dir)
    assert cap.encoder.name == str(varied_model_dir / "clip")


def test_clip_model_override(varied_model_dir, tmp_path, tokenizer, images, captioner):
    other = tiny.save_clip_dir(tmp_path / "other-clip", tiny.tiny_clip(len(tokenizer), seed=5), tokenizer)
    cap = Captioner.from_pretrained(varied_model_dir, clip_model=str(other))
    assert cap.encoder.name == str(other)
    assert not torch.equal(cap.encoder.encode(images), captioner.encoder.encode(images))
    assert cap.caption(images, max_new_tokens=10) == expected_captions(cap, images, max_new_tokens=10)


def test_encoder_dim_mismatch_is_a_clear_error(varied_model_dir, tmp_path, tokenizer):
    clip8 = tiny.save_clip_dir(tmp_path / "clip8", tiny.tiny_clip(len(tokenizer), projection_dim=8), tokenizer)
    with pytest.raises(ClipCapError, match="gives 8-d features but the model expects clip_dim=16"):
        Captioner.from_pretrained(varied_model_dir, clip_model=str(clip8))


def test_missing_encoder_and_model_errors(varied_model_dir, tmp_path):
    broken = tmp_path / "model"
    shutil.copytree(varied_model_dir, broken, ignore=shutil.ignore_patterns("clip"))
    with pytest.raises(ClipCapError, match=r"cannot load CLIP encoder 'clip'"):
        Captioner.from_pretrained(broken)  # "clip" is neither under the model dir nor a reachable hub id
    with pytest.raises(ClipCapError, match="directory not found"):
        Captioner.from_pretrained(tmp_path / "no-such-model")


def test_device_and_dtype_strings(varied_model_dir, images):
    cap = Captioner.from_pretrained(varied_model_dir, device="auto", dtype="bfloat16")
    expected_device = "cuda" if torch.cuda.is_available() else "cpu"
    assert cap.device.type == expected_device and cap.encoder.device.type == expected_device
    assert next(cap.model.parameters()).dtype == torch.bfloat16 and cap.encoder.dtype == torch.bfloat16
    assert len(cap.caption(images[:2], max_new_tokens=5)) == 2
    with pytest.raises(ClipCapError, match="dtype must be one of float32, float16, bfloat16"):
        Captioner.from_pretrained(varied_model_dir, dtype="float64")


def test_bad_image_raises_image_load_error(captioner, images, tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty.png: empty file"):
        captioner.caption([images[0], tmp_path / "empty.png"])
