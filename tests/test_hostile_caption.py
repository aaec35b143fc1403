"""`clipcap caption` on hostile input, through the real command: bad images are skipped and reported one line each,
bad models, globs, devices, flags and closed output pipes end in one line (or quietly), never a traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from tests.hostile import clipcap, no_traceback, one_line_error
from tests.test_images import png_with_header
from tests.test_sources import truncated_jpeg


@pytest.fixture(scope="module")
def hostile_images(tmp_path_factory):
    """Two good images among one file of every hostile kind a folder can hold."""
    root = tmp_path_factory.mktemp("hostile-images")
    Image.new("RGB", (40, 40), (200, 30, 30)).save(root / "good1.png")
    Image.new("RGB", (40, 40), (30, 30, 200)).save(root / "good2.jpg")
    (root / "empty.png").write_bytes(b"")
    (root / "text.jpg").write_text("I am not a picture")
    (root / "cut.jpg").write_bytes(truncated_jpeg(1))
    (root / "bomb.png").write_bytes(png_with_header(20000, 20000))
    (root / "zeros.gif").write_bytes(b"\x00" * 4096)
    (root / "dir.png").mkdir()  # a directory with an image name
    (root / "loop.png").symlink_to(root / "loop.png")  # a symlink to itself
    os.mkfifo(root / "pipe.jpg")  # a FIFO would block a naive reader forever
    name = os.fsencode(root) + b"/bad-\xff\xfe-name.png"  # a file name that is not UTF-8
    Image.new("RGB", (40, 40), (30, 200, 30)).save(name.decode("utf-8", "surrogateescape"))
    return root


def records(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


def test_a_folder_of_hostile_files_captions_the_good_ones_and_reports_the_rest(model_dir, hostile_images):
    done = clipcap("caption", hostile_images, "--model", model_dir, "--max-new-tokens", 3, "--quiet")
    no_traceback(done)
    assert done.returncode == 0, done.stderr
    names = sorted(os.path.basename(r["image"]) for r in records(done.stdout))
    assert names == ["bad-\\xff\\xfe-name.png", "good1.png", "good2.jpg"]  # the bytes kept, escaped
    skipped = [line for line in done.stderr.splitlines() if line.startswith("skipped ")]
    for bad in ("empty.png", "text.jpg", "cut.jpg", "bomb.png", "zeros.gif", "loop.png", "pipe.jpg"):
        assert sum(bad in line for line in skipped) == 1, (bad, done.stderr)
    assert any("loop.png: broken symbolic link" in line for line in skipped), done.stderr
    assert any("pipe.jpg: not a regular file" in line for line in skipped), done.stderr
    assert len(done.stderr.strip().splitlines()) == len(skipped)  # one line per bad file, nothing else (--quiet)


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["nothing/*.png"], ["no images found in nothing/*.png"]),
        (["x.png", "--beams", "0"], ["--beams must be at least 1, got 0"]),
        (["x.png", "--batch-size", "-3"], ["--batch-size must be at least 1"]),
        (["x.png", "--format", "xml"], ["argument --format: invalid choice: 'xml'"]),
        (["x.png", "--max-new-tokens", "lots"], ["argument --max-new-tokens: invalid int value"]),
        (["x.png", "--num-captions", "3"], ["3 captions per image need at least 3 beams"]),
        (["x.png", "--device", "cuda"], ["device 'cuda' is not available here"]),
        (["x.png", "--device", "tpu9"], ["unknown device 'tpu9'"]),
        (["x.png", "--dtype", "float64"], ["argument --dtype: invalid choice"]),
        (["x.png", "--clip-model", "/nowhere/clip"], ["/nowhere/clip"]),
    ],
)
def test_bad_arguments_are_one_line(args, fragments, model_dir, hostile_images):
    done = clipcap("caption", *args, "--model", model_dir, cwd=hostile_images)
    one_line_error(done, "clipcap caption: error:", *fragments)


@pytest.mark.parametrize(
    "damage, fragment",
    [
        ("missing", "model directory not found"),
        ("config-not-json", "config.json"),
        ("config-a-list", "config.json"),
        ("weights-truncated", "model.safetensors"),
        ("weights-missing", "model.safetensors"),
        ("a-file", "model directory not found"),
    ],
)
def test_a_broken_model_dir_is_one_line(damage, fragment, model_dir, hostile_images, tmp_path):
    broken = tmp_path / "model"
    if damage == "a-file":
        broken.write_text("not a dir")
    elif damage != "missing":
        shutil.copytree(model_dir, broken)
        if damage == "config-not-json":
            (broken / "config.json").write_bytes(b"{\xff not json")
        elif damage == "config-a-list":
            (broken / "config.json").write_text("[1, 2, 3]")
        elif damage == "weights-truncated":
            data = (broken / "model.safetensors").read_bytes()
            (broken / "model.safetensors").write_bytes(data[: len(data) // 3])
        else:
            (broken / "model.safetensors").unlink()
    done = clipcap("caption", hostile_images / "good1.png", "--model", broken)
    one_line_error(done, "clipcap caption: error:", fragment)


def test_a_closed_output_pipe_ends_quietly(model_dir, hostile_images):
    """`clipcap caption DIR | head -n 1`: the reader goes away after one record."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    many = [hostile_images / "good1.png"] + [hostile_images / "good2.jpg"] * 8
    args = [*many, "--model", model_dir, "--batch-size", "1", "--max-new-tokens", "2", "--quiet"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "clipcap.cli", "caption", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    first = proc.stdout.readline()
    proc.stdout.close()  # what `head -n 1` does after its line
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert json.loads(first)["image"].endswith("good1.png")
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err, err
    assert proc.returncode in (0, 141), err
