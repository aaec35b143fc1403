"""The shapes world's small pretrained encoders: recipe pieces, and that the shipped ones load and work."""

from __future__ import annotations

import json
from itertools import islice

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipcap.demo import encoders as se
from clipcap.demo import world as shapes

TINY = se.EncoderRecipe(
    tokenizer_texts=500,
    clip_patch=8,
    clip_hidden=32,
    clip_layers=1,
    clip_text_layers=1,
    clip_projection=16,
    clip_steps=3,
    clip_batch=16,
    lm_hidden=32,
    lm_layers=1,
    lm_heads=2,
    lm_context=32,
    lm_steps=3,
    lm_batch=4,
    probe_images=90,
)


@pytest.fixture(scope="module")
def tokenizer():
    return se.train_tokenizer(TINY)


def test_tokenizer_keeps_world_words_whole(tokenizer):
    for word in [*shapes.COLOURS, *shapes.SHAPES, "small", "large"]:
        assert tokenizer.tokenize(" " + word) == ["Ġ" + word]
    text = "a large purple triangle to the left of an orange square."
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer.tokenize("square.")[-1] == "."


def test_clip_tokenizer_ends_every_text_with_eos(tokenizer):
    clip_tok = se._clip_tokenizer(tokenizer)
    ids = clip_tok(["a red circle.", "a large blue square on the left."], padding=True)["input_ids"]
    eos = tokenizer.eos_token_id
    assert ids[0][: ids[0].index(eos)] == tokenizer("a red circle.")["input_ids"]
    assert ids[1][-1] == eos and ids[1].count(eos) == 1
    assert tokenizer("a red circle.")["input_ids"][-1] != eos  # the LM's own tokenizer adds nothing


def test_document_stream_is_captions_of_one_scene_each_ended_by_eos(tokenizer):
    ids = list(islice(se.document_stream(0, 40, tokenizer), 400))
    eos = tokenizer.eos_token_id
    texts = tokenizer.decode(ids).split(tokenizer.eos_token)[:-1]
    assert len(texts) > 10 and all(t.endswith(".") and t == t.strip() for t in texts)
    assert ids == list(islice(se.document_stream(0, 40, tokenizer), 400))  # seeded
    assert ids.count(eos) == len(texts)


def test_soft_clip_loss_is_clip_loss_for_distinct_texts_and_shares_duplicates():
    torch.manual_seed(0)
    logits = torch.randn(4, 4)
    labels = torch.arange(4)
    clip = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    assert se._soft_clip_loss(logits, ["a", "b", "c", "d"]).item() == pytest.approx(clip.item(), rel=1e-6)
    # Two identical texts: swapping their columns cannot change the loss.
    swapped = logits[:, [1, 0, 2, 3]]
    same = ["a", "a", "c", "d"]
    assert se._soft_clip_loss(logits, same).item() == pytest.approx(se._soft_clip_loss(swapped, same).item())


def test_extra_negative_texts_only_enter_the_image_side():
    torch.manual_seed(0)
    logits = torch.randn(3, 5)  # 3 images, their 3 captions, then 2 hard negatives
    labels = torch.arange(3)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits[:, :3].t(), labels)) / 2
    assert se._soft_clip_loss(logits, ["a", "b", "c", "x", "y"]).item() == pytest.approx(expected.item(), rel=1e-6)
    # A harder negative (higher logit for image 0) raises the loss.
    harder = logits.clone()
    harder[0, 3] += 5
    assert se._soft_clip_loss(harder, ["a", "b", "c", "x", "y"]) > se._soft_clip_loss(logits, ["a", "b", "c", "x", "y"])


def test_hard_negatives_swap_the_binding_of_two_objects():
    rng = np.random.default_rng(0)
    seen = 0
    for _ in range(200):
        scene = shapes.sample_scene(rng)
        negative = se._hard_negative(scene, rng)
        if len(scene.objects) == 1:
            assert negative is None
            continue
        a, b = scene.objects
        if (a.colour, a.shape) == (b.colour, b.shape):
            assert negative is None
            continue
        seen += 1
        named = sorted(shapes.object_pairs(negative))
        assert sorted(w for p in named for w in p) == sorted([a.colour, a.shape, b.colour, b.shape])  # same words
        assert negative not in shapes.captions(scene, rng, 100)  # describes another picture
        if a.colour != b.colour and a.shape != b.shape:
            assert named != sorted([(a.colour, a.shape), (b.colour, b.shape)])  # bound the other way
    assert seen > 50


def test_attribute_negatives_change_one_attribute_of_one_object():
    rng = np.random.default_rng(0)
    changed = 0
    for _ in range(200):
        scene = shapes.sample_scene(rng)
        negative = se._attribute_negative(scene, rng)
        truth = sorted((o.colour, o.shape) for o in scene.objects)
        named = sorted(shapes.object_pairs(negative))
        assert len(named) == len(truth)
        assert sum(pair not in truth for pair in named) <= 1  # at most one object's colour or shape differs
        changed += named != truth  # otherwise its size changed
    assert 100 < changed < 170  # colour or shape in about 2 of 3 draws


def test_swap_places_swaps_the_objects_and_inverts_the_relation():
    rng = np.random.default_rng(0)
    swapped_any = 0
    for _ in range(200):
        scene = shapes.sample_scene(rng)
        swapped = se.swap_places(scene, 40)
        if len(scene.objects) == 1:
            assert swapped is None
            continue
        if swapped is None:  # the objects, each at the other's place, would overlap
            continue
        swapped_any += 1
        a, b = scene.objects
        moved_a, moved_b = swapped.objects
        assert swapped.layout == shapes.RELATIONS[scene.layout][2]
        for before, after, other in ((a, moved_a, b), (b, moved_b, a)):
            assert (after.colour, after.shape, after.size, after.rgb) == (before.colour, before.shape, before.size,
                                                                          before.rgb)  # fmt: skip
            side = after.box[2] - after.box[0]
            assert side == pytest.approx(before.box[2] - before.box[0])  # its own size
            assert after.box[0] >= 0 and after.box[2] <= 40 and after.box[1] >= 0 and after.box[3] <= 40
            centre = np.add(after.box[:2], after.box[2:]) / 2
            target = np.add(other.box[:2], other.box[2:]) / 2
            assert np.abs(centre - target).max() <= side / 2  # at the other's place (clamped inside the image)
        assert not shapes._overlap(moved_a.box, moved_b.box)
        caption = shapes.captions(swapped, rng, 1)[0]  # a caption of the swapped scene is wrong for the original
        assert shapes.caption_error(caption, shapes.captions(scene, rng, 1)) in ("relation reversed", None)
    assert swapped_any > 60


def test_relation_negatives_keep_the_words_and_move_the_objects():
    rng = np.random.default_rng(1)
    for _ in range(100):
        scene = shapes.sample_scene(rng)
        negative = se._relation_negative(scene, rng)
        truth = shapes.captions(scene, rng, 1)
        assert shapes.read_caption(negative).pairs == shapes.read_caption(truth[0]).pairs  # the same objects
        a, b = (shapes.read_caption(t) for t in (negative, truth[0]))
        if len(scene.objects) == 1:
            assert a.position != b.position
        elif len({(o.colour, o.shape) for o in scene.objects}) == 2:  # two objects told apart by their words
            assert shapes.caption_error(negative, truth) == "relation reversed"


def test_relation_batches_add_swapped_images_with_their_captions(tokenizer):
    from transformers import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil(size={"shortest_edge": 40}, crop_size={"height": 40, "width": 40})
    clip_tok = se._clip_tokenizer(tokenizer)

    def batch(relations):
        stream = se.scene_stream(0, 40)
        return se._clip_batch(stream, TINY, processor, clip_tok, np.random.default_rng(5), relations)

    pixels, _, texts = batch(False)
    assert pixels.shape[0] == TINY.clip_batch
    more, _, more_texts = batch(True)
    extra = more.shape[0] - TINY.clip_batch
    assert extra > 0  # swapped two-object scenes, each an image with its own caption
    torch.testing.assert_close(more[0], pixels[0])  # the same stream of scenes, then the extra images
    assert len(more_texts) >= len(texts) + extra


def test_partial_captions_name_some_attributes():
    rng = np.random.default_rng(0)
    for _ in range(50):
        scene = shapes.sample_scene(rng)
        text = se._partial_caption(scene, rng)
        assert text.endswith(".") and text.count(" and ") == len(scene.objects) - 1
        for obj in scene.objects:
            assert obj.colour in text or obj.shape in text


def test_build_encoders_writes_loadable_hf_dirs(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from clipcap.encoder import ImageEncoder

    out = se.build_encoders(tmp_path, TINY)
    encoder = ImageEncoder.from_pretrained(out / "clip")
    img = shapes.render(shapes.sample_scene(np.random.default_rng(1)), 40)
    assert encoder.encode([img]).shape == (1, 16)
    assert encoder.encode_text(["a red circle."]).shape == (1, 16)
    lm = AutoModelForCausalLM.from_pretrained(out / "lm")
    tok = AutoTokenizer.from_pretrained(out / "lm")
    assert lm.config.vocab_size == len(tok) and lm.config.eos_token_id == tok.eos_token_id
    shipped = json.loads((se.ASSETS / "lm" / "config.json").read_text())
    for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):  # saved with dropout off, as the shipped LM is
        assert getattr(lm.config, key) == shipped[key] == 0.0
    report = json.loads((out / "recipe.json").read_text())
    assert report["recipe"]["clip_steps"] == 3
    probe = report["clip_probe"]
    assert set(probe) == {f"{k}_{s}" for k in ("shape", "colour", "relation") for s in ("in_domain", "novel")}
    assert all(0 <= v <= 1 for v in probe.values())


@pytest.mark.skipif(not (se.ASSETS / "recipe.json").is_file(), reason="shipped encoders not built")
def test_shipped_encoders_read_shape_and_colour():
    """The shipped CLIP's linear-probe figures, measured when it was made, are recorded next to it."""
    report = json.loads((se.ASSETS / "recipe.json").read_text())
    probe = report["clip_probe"]
    assert probe["colour_in_domain"] > 0.95 and probe["shape_in_domain"] > 0.9
    assert probe["shape_novel"] > 0.5  # well above chance (1/3) on compositions the probe never saw
