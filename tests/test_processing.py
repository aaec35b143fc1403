"""ClipCapProcessor and ClipCapForImageCaptioning on a tiny complete dir: inputs, prompts, decoding, loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from clipcap import Captioner, ClipCapError, ClipCapForImageCaptioning, ClipCapModel, ClipCapProcessor
from tests import tiny


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40, 30 + 3 * i, 3), dtype=np.uint8)) for i in range(5)]


@pytest.fixture(scope="module")
def captioner(varied_model_dir) -> Captioner:
    return Captioner.from_pretrained(varied_model_dir)


@pytest.fixture(scope="module")
def complete_dir(captioner, tmp_path_factory):
    return captioner.save_pretrained(tmp_path_factory.mktemp("complete"))


@pytest.fixture(scope="module")
def loaded(complete_dir):
    return AutoModelForImageTextToText.from_pretrained(complete_dir), AutoProcessor.from_pretrained(complete_dir)


def test_auto_classes_load_the_clipcap_classes(loaded):
    model, processor = loaded
    assert type(model) is ClipCapForImageCaptioning and type(processor) is ClipCapProcessor


def test_vision_tower_computes_the_encoders_features(captioner, loaded, images):
    model, processor = loaded
    pixels = processor(images=images)["pixel_values"]
    with torch.no_grad():
        expected = captioner.encoder.model.get_image_features(pixel_values=pixels).pooler_output
    assert torch.equal(model.get_image_features(pixels), expected)
    assert torch.equal(captioner.encoder.encode(images), expected)


def test_processor_left_pads_prompts(loaded, images):
    _, processor = loaded
    inputs = processor(images=images[:3], text=["a red", "", "a small blue square"])
    tokenizer = processor.tokenizer
    lengths = [len(tokenizer("a red")["input_ids"]), 0, len(tokenizer("a small blue square")["input_ids"])]
    assert inputs["input_ids"].shape == (3, max(lengths)) and inputs["pixel_values"].shape[0] == 3
    assert inputs["attention_mask"].sum(1).tolist() == lengths
    for row, n in enumerate(lengths):  # padding on the left, the prompt flush right
        assert inputs["attention_mask"][row].tolist() == [0] * (max(lengths) - n) + [1] * n
    assert processor(images=images[:2])["input_ids"].shape == (2, 0)  # no prompt: plain captions
    assert processor(images=images[:2], text="a red")["input_ids"].shape == (2, lengths[0])  # one for all


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(text=["a"]), "one prompt string for all 2 images or one per image"),
        (dict(text=["a", 3]), "one prompt string"),
    ],
)
def test_processor_refuses_bad_prompts(loaded, images, kwargs, message):
    _, processor = loaded
    with pytest.raises(ClipCapError, match=message):
        processor(images=images[:2], **kwargs)
    with pytest.raises(ClipCapError, match="pass images"):
        processor(text="a")


def test_generate_returns_prompt_then_caption_and_batches_like_one_by_one(loaded, images):
    model, processor = loaded
    prompts = ["a red", "", "a small blue square", "two", "a"]
    batch = processor(images=images, text=prompts)
    ids = model.generate(**batch, max_new_tokens=8)
    width = batch["input_ids"].shape[1]
    assert torch.equal(ids[:, :width], batch["input_ids"])
    together = processor.post_process_image_text_to_text(ids)
    alone = []
    for image, prompt in zip(images, prompts, strict=True):
        one = processor(images=[image], text=[prompt])
        alone += processor.post_process_image_text_to_text(model.generate(**one, max_new_tokens=8))
    assert together == alone
    for text, prompt in zip(together, prompts, strict=True):
        assert text.startswith(prompt) and text == text.strip()


def test_generation_config_travels_with_the_model(loaded, images, captioner):
    model, processor = loaded
    assert model.generation_config.eos_token_id == captioner.model.config.stop_token_id
    assert (model.generation_config.max_new_tokens, model.generation_config.num_beams) == (67, 1)
    batch = processor(images=images[:2])
    default = model.generate(**batch)  # greedy, 67 tokens at most, stop at the stop token: as Captioner
    assert processor.post_process_image_text_to_text(default) == captioner.caption(images[:2])
    model.generation_config.num_beams = 3
    try:
        assert torch.equal(model.generate(**batch), model.generate(**batch, num_beams=3))
    finally:
        model.generation_config.num_beams = 1


def test_captioner_prompt_and_several_captions(captioner, images):
    prompt = "a red"
    one = captioner.caption(images, max_new_tokens=8, prompt=prompt)
    assert all(c.startswith(prompt) for c in one)
    several = captioner.caption(images[:2], max_new_tokens=8, prompt=prompt, num_beams=3, num_return_sequences=2)
    assert [len(c) for c in several] == [2, 2] and all(c.startswith(prompt) for row in several for c in row)
    embeds = captioner.encoder.encode(images)
    assert captioner.caption_embeddings(embeds, max_new_tokens=8, prompt=prompt) == one


def test_complete_dir_loads_as_its_clipcap_model(complete_dir, loaded, images):
    model, processor = loaded
    base = ClipCapModel.from_pretrained(complete_dir)
    features = model.get_image_features(processor(images=images)["pixel_values"])
    ids = torch.tensor([[5, 6, 7]] * len(images))
    with torch.no_grad():
        assert torch.equal(base(features, ids).logits, model.model(features, ids).logits)
        assert torch.equal(model(processor(images=images)["pixel_values"], ids).logits, base(features, ids).logits)


def test_plain_dir_is_not_a_complete_model(varied_model_dir):
    with pytest.raises(ClipCapError, match="holds no vision tower: load it as a ClipCapModel"):
        ClipCapForImageCaptioning.from_pretrained(varied_model_dir)


def test_complete_model_needs_a_clip_family_encoder():
    with pytest.raises(ClipCapError, match="needs a CLIP-family encoder .*GPT2LMHeadModel has none"):
        ClipCapForImageCaptioning.from_parts(tiny.tiny_model("mlp"), tiny.tiny_gpt2(300))


def test_a_complete_dir_saves_again_as_one(complete_dir, images, tmp_path):
    captioner = Captioner.from_pretrained(complete_dir)
    again = Captioner.from_pretrained(captioner.save_pretrained(tmp_path / "again"))
    assert again.caption(images, max_new_tokens=8) == captioner.caption(images, max_new_tokens=8)
