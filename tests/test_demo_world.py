"""The shapes world: deterministic, follows docs/design.md §7, keeps novel compositions out of ClipCap's splits."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from clipcap.demo import world as shapes
from clipcap.errors import ClipCapError

COUNTS = {"pretrain": 60, "train": 60, "val": 5, "test": 10, "novel": 30}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    return json.loads(shapes.generate_world(out, COUNTS, seed=3, progress=False).read_text()), out


def test_splits_counts_and_files(world):
    data, out = world
    by_split = {s: [e for e in data["images"] if e["split"] == s] for s in shapes.SPLITS}
    assert {s: len(v) for s, v in by_split.items()} == COUNTS
    for entry in data["images"]:
        img = Image.open(out / entry["filepath"] / entry["filename"])
        assert img.size == (40, 40) and img.mode == "RGB"
        assert len(entry["sentences"]) == 5
        assert len({s["raw"] for s in entry["sentences"]}) == 5


def test_same_seed_same_world(tmp_path, world):
    data, out = world
    again = json.loads(shapes.generate_world(tmp_path, COUNTS, seed=3, progress=False).read_text())
    assert again == data
    name = data["images"][7]["filename"]
    assert (tmp_path / "images" / name).read_bytes() == (out / "images" / name).read_bytes()
    other = json.loads(shapes.generate_world(tmp_path / "b", COUNTS, seed=4, progress=False).read_text())
    assert [e["sentences"] for e in other["images"]] != [e["sentences"] for e in data["images"]]


def test_a_split_does_not_depend_on_the_others_counts(tmp_path, world):
    data, _ = world
    only_test = json.loads(
        shapes.generate_world(
            tmp_path, {s: 0 for s in shapes.SPLITS} | {"test": 10}, seed=3, progress=False
        ).read_text()
    )

    def raw(entries):
        return [[s["raw"] for s in e["sentences"]] + [e["objects"]] for e in entries]

    assert raw(only_test["images"]) == raw(e for e in data["images"] if e["split"] == "test")


def test_novel_compositions_only_in_pretrain_and_novel(world):
    data, _ = world
    for entry in data["images"]:
        truth = {(o["colour"], o["shape"]) for o in entry["objects"]}
        novel = bool(truth & set(shapes.NOVEL))
        if entry["split"] in ("train", "val", "test"):
            assert not novel
            assert not any(set(shapes.object_pairs(s["raw"])) & set(shapes.NOVEL) for s in entry["sentences"])
        elif entry["split"] == "novel":
            assert novel


def test_pretrain_covers_the_whole_world(tmp_path):
    data = json.loads(
        shapes.generate_world(tmp_path, {s: 0 for s in shapes.SPLITS} | {"pretrain": 400}, progress=False).read_text()
    )
    seen = {(o["colour"], o["shape"]) for e in data["images"] for o in e["objects"]}
    assert seen == {(c, s) for c in shapes.COLOURS for s in shapes.SHAPES}


def test_captions_name_every_object_as_colour_before_shape(world):
    data, _ = world
    for entry in data["images"]:
        truth = sorted((o["colour"], o["shape"]) for o in entry["objects"])
        for sentence in entry["sentences"]:
            raw = sentence["raw"]
            assert raw == raw.lower() and raw.endswith(".")
            assert sorted(shapes.object_pairs(raw)) == truth
            assert " a orange" not in raw and not raw.startswith("a orange")


def test_layout_matches_geometry(world):
    data, _ = world
    for entry in data["images"]:
        objs = entry["objects"]
        for o in objs:
            x0, y0, x1, y1 = o["box"]
            assert 0 <= x0 < x1 <= 40 and 0 <= y0 < y1 <= 40
            side = x1 - x0
            assert side == pytest.approx(shapes.SIZES[o["size"]] * 40, rel=0.11)
        if len(objs) == 2:
            a, b = (np.array(o["box"]) for o in objs)
            assert not shapes._overlap(a, b, margin=0)
            ca, cb = (a[:2] + a[2:]) / 2, (b[:2] + b[2:]) / 2
            expected = {"left of": ca[0] < cb[0], "right of": ca[0] > cb[0], "above": ca[1] < cb[1]}
            assert expected.get(entry["layout"], ca[1] > cb[1])


def test_render_draws_the_colour_on_a_light_background():
    rng = np.random.default_rng(0)
    scene = shapes.sample_scene(rng)
    pixels = np.asarray(shapes.render(scene, 40)).reshape(-1, 3)
    assert (pixels.min(axis=1) >= 200).mean() > 0.4  # background channels 200-255
    for obj in scene.objects:
        assert np.abs(pixels.astype(int) - obj.rgb).sum(axis=1).min() <= 6


def test_object_pairs():
    assert shapes.object_pairs("a large purple triangle above a small Red circle.") == [
        ("purple", "triangle"),
        ("red", "circle"),
    ]
    assert shapes.object_pairs("a purple large triangle.") == []  # colour not attached to the shape


def test_binding_accuracy_counts_exactly():
    refs = [
        ["a red circle on the left."],
        ["a purple triangle at the top."],
        ["a blue square above a green circle."],
        ["a yellow circle below an orange square."],
    ]
    preds = [
        "a small red circle on the left.",  # right
        "a purple square at the top.",  # wrong shape
        "a blue square above a green circle.",  # both right
        "a yellow circle below a red square.",  # one of two
    ]
    acc = shapes.binding_accuracy(preds, refs)
    assert acc["single"] == 0.5
    assert acc["objects"] == 4 / 6
    assert acc["images_exact"] == 0.5
    assert (acc["num_images"], acc["num_single"], acc["num_objects"]) == (4, 2, 6)


def test_bad_arguments_raise(tmp_path):
    with pytest.raises(ClipCapError, match="unknown shapes-world split"):
        shapes.generate_world(tmp_path, {"training": 3})
    with pytest.raises(ClipCapError, match="image_size"):
        shapes.generate_world(tmp_path, image_size=4)
    with pytest.raises(ClipCapError, match="predictions"):
        shapes.binding_accuracy(["a."], [])


def test_read_caption_reads_objects_relation_and_position():
    said = shapes.read_caption("There is a large Red circle to the left of a green square.")
    assert said.objects == (("large", "red", "circle"), (None, "green", "square"))
    assert said.relation == "left of" and said.position is None
    assert shapes.read_caption("a small blue triangle at the bottom.").position == "bottom"
    assert shapes.read_caption("a red circle and a green square.").relation is None  # no relation phrase
    assert shapes.read_caption("a red circle above below a green square.").relation is None  # two: ambiguous
    assert shapes.read_caption("a red circle on the left on the right.").position is None
    assert shapes.read_caption("").objects == ()


REFS = ["a large red circle to the left of a small green square.", "a green square to the right of a red circle."]
SAME = ["a small red circle above a large red circle."]  # two objects of one colour and shape: sizes tell them apart


@pytest.mark.parametrize(
    ("prediction", "references", "error"),
    [
        ("a red circle to the left of a green square.", REFS, None),
        ("a green square to the right of a red circle.", REFS, None),  # the other order of mention
        ("a small green square to the right of a large red circle.", REFS, None),
        ("a green square to the left of a red circle.", REFS, "relation reversed"),
        ("a red circle to the right of a green square.", REFS, "relation reversed"),
        ("a red circle above a green square.", REFS, "relation on the wrong axis"),
        ("a red circle and a green square.", REFS, "no relation stated"),
        ("a red circle to the left of a red circle.", REFS, "one object named twice"),
        ("a green circle to the left of a red square.", REFS, "colours and shapes bound the other way"),
        ("a red circle to the left of a blue square.", REFS, "one object: wrong colour"),
        ("a red circle to the left of a green circle.", REFS, "one object: wrong shape"),
        ("a red circle to the left of a blue triangle.", REFS, "one object: wrong object"),
        ("a blue triangle to the left of a yellow circle.", REFS, "both objects wrong"),
        ("a red circle on the left.", REFS, "wrong number of objects"),
        ("a large red circle below a small red circle.", SAME, None),
        ("a small red circle below a large red circle.", SAME, "relation reversed"),
        ("a red circle below a red circle.", SAME, None),  # no sizes: either object may be meant
        ("a red circle on the left.", ["a small red circle on the left."], None),
        ("a red circle on the right.", ["a small red circle on the left."], "wrong position"),
        ("a red square on the left.", ["a red circle on the left."], "wrong shape"),
        ("a blue circle on the left.", ["a red circle on the left."], "wrong colour"),
        ("a blue square on the left.", ["a red circle on the left."], "wrong object"),
    ],
)
def test_caption_error_names_what_is_wrong(prediction, references, error):
    assert shapes.caption_error(prediction, references) == error


def test_relation_accuracy_counts_exactly():
    refs = [REFS, REFS, REFS, SAME, ["a red circle on the left."], ["a red circle on the left."]]
    preds = [
        "a green square to the right of a red circle.",  # exact, relation right
        "a red circle to the right of a green square.",  # exact, relation reversed
        "a red circle to the left of a blue square.",  # one object wrong
        "a red circle.",  # one object of two
        "a red circle on the left.",  # right position
        "a red circle at the top.",  # wrong position
    ]
    acc = shapes.relation_accuracy(preds, refs)
    assert (acc["pairs_exact"], acc["relation_right"], acc["num_pairs"]) == (0.5, 0.25, 4)
    assert acc["position_right"] == 0.5
    assert acc["errors"] == {
        "one object: wrong colour": 1,
        "relation reversed": 1,
        "wrong number of objects": 1,
        "wrong position": 1,
    }
    with pytest.raises(ClipCapError, match="predictions"):
        shapes.relation_accuracy(["a."], [])


def test_world_captions_state_a_relation_that_holds(world):
    data, _ = world
    for entry in data["images"]:
        refs = [s["raw"] for s in entry["sentences"]]
        for raw in refs:  # every reference is a right caption of its own scene
            assert shapes.caption_error(raw, refs) is None, raw


@given(st.text(max_size=200))
def test_read_caption_never_fails(text):
    said = shapes.read_caption(text)
    assert len(said.objects) == len(shapes.object_pairs(text))
    shapes.caption_error(text, REFS)  # any text gets a category or None, never an exception


def test_a_catalogue_world_has_the_same_scenes_and_pictures_in_other_words(tmp_path, world):
    data, out = world
    catalogue = json.loads(
        shapes.generate_world(tmp_path, COUNTS, seed=3, progress=False, style="catalogue").read_text()
    )
    assert data["style"] == "plain" and catalogue["style"] == "catalogue"
    for plain, other in zip(data["images"], catalogue["images"], strict=True):
        assert (other["objects"], other["layout"]) == (plain["objects"], plain["layout"])
        assert (tmp_path / "images" / other["filename"]).read_bytes() == (
            out / "images" / plain["filename"]
        ).read_bytes()
        plain_words = [s["raw"] for s in plain["sentences"]]
        catalogue_words = [s["raw"] for s in other["sentences"]]
        assert not set(plain_words) & set(catalogue_words)
        # each caption says what the plain caption in its place says, in catalogue words
        assert [shapes.read_caption(c) for c in catalogue_words] == [shapes.read_caption(p) for p in plain_words]


def test_catalogue_captions_are_written_and_read_back():
    scene = shapes.Scene(
        (
            shapes.Shape("triangle", "purple", "large", (140, 60, 180), (0, 0, 10, 10)),
            shapes.Shape("circle", "red", "small", (220, 30, 30), (20, 0, 30, 10)),
        ),
        "left of",
        (255, 255, 255),
    )
    texts = shapes.captions(scene, np.random.default_rng(0), n=16, style="catalogue")
    assert "triangle (purple, large) west of circle (red, small)." in texts
    assert "pair circle (red) | east of | triangle (purple)." in texts
    assert shapes.plain_caption("2 shapes: triangle (purple, large) west of circle (red).") == (
        "2 shapes: large purple triangle to the left of red circle."
    )
    assert shapes.plain_caption("west: square (yellow).") == "on the left: yellow square."
    assert shapes.plain_caption("a purple triangle at the top.") == "a purple triangle at the top."
    assert shapes.object_pairs("item square (yellow, small) at middle.") == [("yellow", "square")]
    said = shapes.read_caption("Circle (Red) north of square (blue, large).")
    assert said == shapes.Statement(((None, "red", "circle"), ("large", "blue", "square")), "above")
    # scored exactly like the plain words: a relation reversed is reversed in either style
    refs = ["triangle (purple, large) west of circle (red, small)."]
    assert shapes.caption_error("circle (red) west of triangle (purple).", refs) == "relation reversed"
    assert shapes.caption_error("circle (red) east of triangle (purple).", refs) is None
    with pytest.raises(ClipCapError, match="caption style must be one of plain, catalogue, got 'fancy'"):
        shapes.captions(scene, np.random.default_rng(0), style="fancy")
    with pytest.raises(ClipCapError, match="caption style must be one of plain, catalogue, got 'fancy'"):
        shapes.generate_world(Path("unused"), COUNTS, style="fancy")


@given(st.integers(0, 2**32 - 1), st.sampled_from(shapes.STYLES))
def test_every_caption_of_a_scene_reads_back_as_that_scene(seed, style):
    rng = np.random.default_rng(seed)
    scene = shapes.sample_scene(rng)
    truth = sorted((o.colour, o.shape) for o in scene.objects)
    for text in shapes.captions(scene, rng, n=16, style=style):
        said = shapes.read_caption(text)
        assert said.pairs == truth
        if len(scene.objects) == 1:
            assert said.position == scene.layout
        assert shapes.caption_error(text, [text]) is None


@given(st.text(max_size=200))
def test_plain_caption_never_fails_and_leaves_plain_text_alone(text):
    rewritten = shapes.plain_caption(text)
    assert isinstance(rewritten, str)
    assert shapes.plain_caption(rewritten) == rewritten


def _first_is_upper_or_left(text: str) -> bool:
    return shapes.read_caption(text).relation in ("left of", "above")


@given(st.integers(0, 2**32 - 1), st.sampled_from(shapes.STYLES))
def test_reading_order_names_the_upper_or_left_object_first_and_draws_what_any_order_draws(seed, style):
    scene = shapes.sample_scene(np.random.default_rng(seed))
    either, reading = np.random.default_rng(seed + 1), np.random.default_rng(seed + 1)
    any_texts = shapes.captions(scene, either, n=5, style=style)
    texts = shapes.captions(scene, reading, n=5, style=style, order="reading")
    assert either.random() == reading.random()  # the same draws: the scenes after it do not change
    assert len(texts) == 5
    assert all(shapes.caption_error(t, [t]) is None for t in texts)
    if len(scene.objects) == 1:
        assert texts == any_texts
        return
    assert all(_first_is_upper_or_left(t) for t in texts)
    # each caption is one the order "any" drew, turned round where it named the other object first
    assert [_skeleton(t) for t in texts] == [_skeleton(t) for t in any_texts]
    assert set(texts) <= set(shapes.captions(scene, np.random.default_rng(0), n=16, style=style))


def _skeleton(text: str) -> str:
    """A caption's template and whether it gives sizes, without the objects and the relation."""
    text = shapes._OBJECT_RE.sub(lambda m: "X+size" if m.group(1) else "X", shapes.plain_caption(text))
    return shapes._RELATION_RE.sub("R", re.sub(r"\ban X", "a X", text))


def test_a_reading_order_world_turns_round_only_its_training_captions(tmp_path, world):
    data, out = world
    reading = json.loads(
        shapes.generate_world(tmp_path, COUNTS, seed=3, progress=False, training_order="reading").read_text()
    )
    assert (data["training_order"], reading["training_order"]) == ("any", "reading")
    turned = 0
    for plain, other in zip(data["images"], reading["images"], strict=True):
        assert (other["objects"], other["layout"]) == (plain["objects"], plain["layout"])
        assert (tmp_path / "images" / other["filename"]).read_bytes() == (
            out / "images" / plain["filename"]
        ).read_bytes()
        texts = [s["raw"] for s in other["sentences"]]
        if other["split"] not in ("train", "val") or len(other["objects"]) == 1:
            assert other["sentences"] == plain["sentences"]
            continue
        assert all(_first_is_upper_or_left(t) for t in texts)
        assert [s["sentid"] for s in other["sentences"]] == other["sentids"]
        turned += texts != [s["raw"] for s in plain["sentences"]]
    assert turned > 0
    assert any(
        not _first_is_upper_or_left(s["raw"]) for e in data["images"] for s in e["sentences"] if len(e["objects"]) == 2
    )
    with pytest.raises(ClipCapError, match="caption order must be one of any, reading, got 'random'"):
        shapes.captions(shapes.sample_scene(np.random.default_rng(0)), np.random.default_rng(0), order="random")
    with pytest.raises(ClipCapError, match="training caption order must be one of any, reading, got 'upper'"):
        shapes.generate_world(Path("unused"), COUNTS, training_order="upper")
