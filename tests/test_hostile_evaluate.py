"""`clipcap evaluate` on hostile predictions, references, stores and outputs, through the real command."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from clipcap.data.store import StoreWriter
from tests.hostile import clipcap, no_traceback, one_line_error

REFS = {"1": ["a red circle on the left.", "a circle."], "2": ["a blue square.", "a square at the top."]}
PREDS = [{"image_id": 1, "caption": "a red circle."}, {"image_id": 2, "caption": "a blue square."}]


def write(path, obj):
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


def score(preds, refs, *extra, cwd=None):
    return clipcap("evaluate", "--predictions", preds, "--references", refs, "--no-spice", "--no-clipscore", *extra)


@pytest.fixture
def files(tmp_path):
    return write(tmp_path / "p.json", PREDS), write(tmp_path / "r.json", REFS)


@pytest.mark.parametrize(
    "content, fragments",
    [
        (b"\xff\xfe[]", ["is not UTF-8 text"]),
        (b"", ["is not valid JSON"]),
        (b"[1, 2, 3]", ["predictions must be a COCO results list"]),
        (b'[{"image_id": 1}]', ["entry 1 needs one caption string"]),
        (b'{"1": ["two", "captions"]}', ["predictions must be a COCO results list"]),
        (b'[{"image_id": {"nested": 1}, "caption": "x"}]', ["entry 1 needs an image id"]),
        (b'[{"image_id": 1, "caption": "a \\ud800."}]', ["entry 1 needs one caption string (valid Unicode"]),
        (b'[{"image_id": 9, "caption": "x."}]', ["match no reference image"]),
    ],
)
def test_bad_predictions_are_one_line(content, fragments, files, tmp_path):
    preds = tmp_path / "bad.json"
    preds.write_bytes(content)
    one_line_error(score(preds, files[1], "--out", tmp_path / "m.json"), "clipcap evaluate: error:", *fragments)
    assert not (tmp_path / "m.json").exists()


def lavis_coco(tmp_path, with_file_names: bool):
    """COCO-format ground truth as LAVIS/BLIP publish the Karpathy test split: `images` entries without file_name,
    and only `images` + `annotations` at the top level."""
    images = [{"id": int(k), **({"file_name": f"{k}.jpg"} if with_file_names else {})} for k in REFS]
    annotations = [{"image_id": int(k), "caption": c} for k, caps in REFS.items() for c in caps]
    return write(tmp_path / "coco_karpathy_test_gt.json", {"images": images, "annotations": annotations})


@pytest.mark.parametrize("with_file_names", [False, True])
def test_coco_references_without_file_names_or_info_are_scored(with_file_names, files, tmp_path):
    refs = lavis_coco(tmp_path, with_file_names)
    done = score(files[0], refs, "--out", tmp_path / "m.json")
    no_traceback(done)
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["num_images"] == 2 and metrics["CIDEr"] > 0


def test_references_with_bad_entries_are_skipped_and_reported(files, tmp_path):
    refs = write(tmp_path / "r.json", {**REFS, "3": ["a \ud800 surrogate."], "": ["no id."]})
    done = score(files[0], refs, "--out", tmp_path / "m.json")
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["num_images"] == 2 and metrics["skipped"]["count"] == 2
    assert "skipped 2 images" in done.stderr


@pytest.mark.parametrize("kind", ["a-dir", "under-a-file"])
def test_an_unusable_output_is_one_line(kind, files, tmp_path):
    out = tmp_path / "out"
    if kind == "a-dir":
        out.mkdir()
        fragment = "is a directory: name a file"
    else:
        out.write_text("x")
        out, fragment = out / "m.json", "is a file, not a directory"
    one_line_error(score(*files, "--out", out), "clipcap evaluate: error:", fragment)


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--limit", "0"], ["--limit must be at least 1"]),
        (["--beams", "2"], ["--beams only applies when generating"]),
        (["--format", "nosuch"], ["argument --format: invalid choice"]),
        (["--split", "val"], ["no records in split 'val'"]),
    ],
)
def test_bad_options_are_one_line(args, fragments, files, tmp_path):
    refs = lavis_coco(tmp_path, True)
    one_line_error(score(files[0], refs, *args), "clipcap evaluate: error:", *fragments)


def test_a_store_from_another_encoder_is_refused_before_generating(model_dir, tmp_path):
    store = tmp_path / "store"
    with StoreWriter(store, clip_model="/elsewhere/another-clip", clip_dim=16, normalized=False) as w:
        for i in range(3):
            w.add(np.ones(16) * i, f"k{i}", ["a caption."], split="test")
    done = clipcap("evaluate", "--model", model_dir, "--data", store, "--no-spice", "--out", tmp_path / "m.json")
    one_line_error(done, "was embedded with /elsewhere/another-clip, but the model expects embeddings from")


def test_duplicate_images_are_refused_before_generating(model_dir, tmp_path):
    Image.new("RGB", (32, 32), "red").save(tmp_path / "a.png")
    entry = {"filename": "a.png", "cocoid": 7, "split": "test", "sentences": [{"raw": "a red image."}]}
    source = write(tmp_path / "dataset_coco.json", {"images": [entry, entry]})
    done = clipcap("evaluate", "--model", model_dir, "--data", source, "--no-spice", "--out", tmp_path / "m.json")
    one_line_error(done, "names some images twice (duplicate keys, e.g. ['7'])")
