"""`clipcap caption`: inputs, formats, bad images, exit status, flags."""

import csv
import io
import json

import numpy as np
import pytest
from PIL import Image

from clipcap import Captioner
from clipcap.cli import main
from tests.test_images import REAL_IMAGES, png_with_header


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """photos/{0,1}.png, photos/sub/{2.jpg, 3.png} and photos/notes.txt."""
    root = tmp_path_factory.mktemp("photos")
    (root / "sub").mkdir()
    for i, name in enumerate(["0.png", "1.png", "sub/2.jpg", "sub/3.png"]):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 256, (32, 36 + i, 3), dtype=np.uint8)).save(root / name)
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def reference(varied_model_dir, photos):
    """Captions from the Python API, keyed by file name (greedy, 10 tokens)."""
    paths = sorted(photos.rglob("*.png")) + sorted(photos.rglob("*.jpg"))
    captions = Captioner.from_pretrained(varied_model_dir).caption(paths, max_new_tokens=10)
    return {p.name: c for p, c in zip(paths, captions, strict=True)}


def run(capsys, *argv):
    code = main(["caption", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def records(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


def test_files_directories_and_globs_to_jsonl(capsys, varied_model_dir, photos, reference):
    code, out, err = run(
        capsys,
        photos / "0.png",
        photos / "sub",
        str(photos / "*.png"),
        "--model",
        varied_model_dir,
        "--max-new-tokens",
        10,
    )
    assert code == 0
    rows = records(out)
    # the explicit file first, then the directory (recursive, sorted), then the glob's new match; no duplicates
    assert [r["image"] for r in rows] == [str(photos / n) for n in ("0.png", "sub/2.jpg", "sub/3.png", "1.png")]
    assert all(list(r) == ["image", "caption", "clip_score", "logprob", "repeated_ngram", "passed"] for r in rows)
    assert {r["image"].rsplit("/", 1)[1]: r["caption"] for r in rows} == reference
    assert "captioned 4 images, skipped 0" in err


def test_bad_images_are_reported_and_the_rest_captioned(capsys, tmp_path, varied_model_dir, photos, reference):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "bomb.png").write_bytes(png_with_header(50_000, 50_000))
    cut = (photos / "1.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(cut[: len(cut) // 2])
    args = [tmp_path / "empty.jpg", photos / "0.png", photos / "notes.txt", tmp_path / "bomb.png"]
    args += [tmp_path / "missing.jpg", tmp_path / "cut.png", photos / "1.png"]
    code, out, err = run(capsys, *args, "--model", varied_model_dir, "--max-new-tokens", 10, "--batch-size", 1)
    assert code == 0
    assert [(r["image"], r["caption"]) for r in records(out)] == [
        (str(photos / "0.png"), reference["0.png"]),
        (str(photos / "1.png"), reference["1.png"]),
    ]
    lines = [line for line in err.splitlines() if line.startswith("skipped ")]
    assert lines[0] == f"skipped {tmp_path / 'empty.jpg'}: empty file (0 bytes)"
    assert lines[1] == f"skipped {photos / 'notes.txt'}: not an image (unrecognised format)"
    assert lines[2].startswith(f"skipped {tmp_path / 'bomb.png'}: ") and "decompression bomb" in lines[2]
    assert lines[3] == f"skipped {tmp_path / 'missing.jpg'}: file not found"
    assert lines[4].startswith(f"skipped {tmp_path / 'cut.png'}: truncated or corrupt image")
    assert len(lines) == 5
    assert "captioned 2 images, skipped 5" in err
    assert "Traceback" not in err


def test_nothing_captioned_exits_non_zero(capsys, tmp_path, varied_model_dir, photos):
    code, out, err = run(capsys, photos / "notes.txt", tmp_path / "missing.png", "--model", varied_model_dir)
    assert code == 2 and out == ""
    assert f"skipped {photos / 'notes.txt'}: not an image" in err
    assert (
        err.strip().splitlines()[-1]
        == "clipcap caption: error: none of the 2 images could be captioned (reasons above)"
    )


def test_no_input_matched_is_a_clear_error(capsys, tmp_path, varied_model_dir):
    code, out, err = run(capsys, str(tmp_path / "*.jpg"), "--model", varied_model_dir)
    assert code == 2 and out == ""
    assert err == f"clipcap caption: error: no images found in {tmp_path / '*.jpg'}\n"


def test_csv_output(capsys, varied_model_dir, photos, reference):
    code, out, _ = run(capsys, photos / "sub", "--model", varied_model_dir, "--max-new-tokens", 10, "--format", "csv")
    assert code == 0
    rows = list(csv.reader(io.StringIO(out)))
    assert [r[:2] for r in rows] == [
        ["image", "caption"],
        [str(photos / "sub/2.jpg"), reference["2.jpg"]],
        [str(photos / "sub/3.png"), reference["3.png"]],
    ]
    assert rows[0][2:] == ["clip_score", "logprob"] and all(float(r[3]) < 0 for r in rows[1:])


def test_several_captions_per_image(capsys, varied_model_dir, photos):
    expected = Captioner.from_pretrained(varied_model_dir).caption(
        [photos / "0.png", photos / "1.png"], num_beams=3, num_return_sequences=2, max_new_tokens=6
    )
    common = ["--model", varied_model_dir, "--beams", 3, "--num-captions", 2, "--max-new-tokens", 6]
    code, out, _ = run(capsys, photos / "0.png", photos / "1.png", *common)
    assert code == 0
    assert [r["captions"] for r in records(out)] == expected
    assert all(list(r) == ["image", "captions", "clip_scores", "logprobs"] for r in records(out))
    assert all(len(r["clip_scores"]) == len(r["logprobs"]) == 2 for r in records(out))
    code, out, _ = run(capsys, photos / "0.png", photos / "1.png", *common, "--format", "csv")
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0] == ["image", "caption_1", "caption_2"]
    assert [r[1:] for r in rows[1:]] == expected


def test_more_captions_than_beams_is_a_user_error(capsys, varied_model_dir, photos):
    code, out, err = run(capsys, photos / "0.png", "--model", varied_model_dir, "--num-captions", 3)
    assert code == 2 and out == ""
    assert "3 captions per image need at least 3 beams" in err and "Traceback" not in err


def test_progress_bar_on_stderr_and_quiet(capsys, varied_model_dir, photos):
    code, out, err = run(capsys, photos, "--model", varied_model_dir, "--max-new-tokens", 3, "--batch-size", 2)
    assert code == 0 and len(records(out)) == 4  # stdout holds only the records
    assert "captioning" in err and "4/4" in err
    code, out, err = run(capsys, photos, "--model", varied_model_dir, "--max-new-tokens", 3, "--quiet")
    assert code == 0 and len(records(out)) == 4 and err == ""


def test_device_dtype_and_clip_model_flags(capsys, varied_model_dir, photos, reference):
    common = [photos / "0.png", "--model", varied_model_dir, "--max-new-tokens", 10, "--device", "cpu"]
    code, out, _ = run(capsys, *common, "--clip-model", varied_model_dir / "clip", "--dtype", "float32")
    assert code == 0 and records(out)[0]["caption"] == reference["0.png"]
    code, out, _ = run(capsys, *common, "--dtype", "bfloat16")
    assert code == 0 and isinstance(records(out)[0]["caption"], str)
    code, out, err = run(capsys, *common, "--clip-model", photos)
    assert code == 2 and out == "" and "cannot load a CLIP-family encoder" in err


def test_missing_model_dir(capsys, tmp_path, photos):
    code, out, err = run(capsys, photos / "0.png", "--model", tmp_path / "nope")
    assert code == 2 and out == ""
    assert err == f"clipcap caption: error: model directory not found: {tmp_path / 'nope'}\n"


def test_help_and_flag_validation(capsys):
    with pytest.raises(SystemExit) as info:
        main(["caption", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--model", "--beams", "--max-new-tokens", "--num-captions", "--batch-size", "--format"):
        assert flag in text
    for flag in ("--clip-model", "--device", "--dtype", "--quiet"):
        assert flag in text
    assert main(["caption", "x.jpg", "--model", "m", "--beams", "0"]) == 2
    assert capsys.readouterr().err == "clipcap caption: error: --beams must be at least 1, got 0\n"


def test_real_photographs_directory(capsys, varied_model_dir):
    code, out, err = run(capsys, REAL_IMAGES, "--model", varied_model_dir, "--max-new-tokens", 4, "--quiet")
    assert code == 0 and err == ""
    photographs = sorted(str(p) for p in REAL_IMAGES.glob("*.jpg"))  # the 12 JPEGs, not the README or json
    assert sorted(r["image"] for r in records(out)) == photographs
