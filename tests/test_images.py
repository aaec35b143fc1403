"""Safe image loading: every bad-file class with its reason and kind, every mode, EXIF orientation, animation, bytes."""

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from clipcap import ClipCapError
from clipcap.images import ImageLoadError, open_image

REAL_IMAGES = Path(__file__).resolve().parent / "fixtures" / "real-images"  # MIT, from the original repo


def noise_image(w: int = 64, h: int = 48, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def png_with_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height pixels, with a few bytes of data: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture
def no_pixel_decoding(monkeypatch):
    """Fail the test if PIL starts decoding pixels (i.e. would allocate the image)."""

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"pixels of a {self.size} image were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


# -- bad files: one error type, a clear reason, the file named -------------------------------------------------
def load_error(source, **kwargs) -> ImageLoadError:
    with pytest.raises(ImageLoadError) as info:
        open_image(source, **kwargs)
    assert isinstance(info.value, ClipCapError)
    assert str(info.value) == f"{info.value.source}: {info.value.reason}"
    return info.value


def test_missing_file(tmp_path):
    err = load_error(tmp_path / "nope.jpg")
    assert err.source == str(tmp_path / "nope.jpg") and err.reason == "file not found"


def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert load_error(tmp_path / "empty.jpg").reason == "empty file (0 bytes)"


def test_not_an_image(tmp_path):
    (tmp_path / "notes.jpg").write_text("this is not a picture\n" * 20)
    assert load_error(tmp_path / "notes.jpg").reason == "not an image (unrecognised format)"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_image(tmp_path, fmt):
    buf = io.BytesIO()
    noise_image(128, 128).save(buf, fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    err = load_error(path)
    assert err.reason.startswith("truncated or corrupt image")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # the global switch is restored


def test_decompression_bomb_beyond_pils_limit_is_refused_from_the_header(tmp_path, no_pixel_decoding):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_with_header(100_000, 100_000))  # 10 gigapixels claimed in 120 bytes
    assert "decompression bomb" in load_error(path).reason


def test_image_over_our_cap_but_under_pils_is_refused_from_the_header(tmp_path, no_pixel_decoding):
    path = tmp_path / "big.png"
    path.write_bytes(png_with_header(9_000, 9_000))  # 81 M pixels: PIL only warns, our 64 M cap refuses
    err = load_error(path)
    assert err.reason == "too many pixels (9000x9000 > 64000000; decompression bomb?)"


def test_max_pixels_is_configurable(tmp_path):
    path = tmp_path / "small.png"
    noise_image(100, 50).save(path)
    assert load_error(path, max_pixels=4_999).reason == "too many pixels (100x50 > 4999; decompression bomb?)"
    assert open_image(path, max_pixels=5_000).size == (100, 50)


def test_pil_image_input_is_checked_too():
    err = load_error(noise_image(100, 50), max_pixels=100)
    assert err.source == "<PIL image>" and err.reason.startswith("too many pixels")


# -- modes, orientation, animation -----------------------------------------------------------------------------
def pixels(img: Image.Image) -> list:
    assert img.mode == "RGB"
    return [tuple(p) for p in np.asarray(img).reshape(-1, 3).tolist()]


def round_trip(tmp_path, img: Image.Image, fmt: str = "PNG", **save) -> Image.Image:
    path = tmp_path / f"img.{fmt.lower()}"
    img.save(path, fmt, **save)
    return open_image(path)


def test_palette_to_rgb(tmp_path):
    img = Image.new("P", (2, 1))
    img.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    img.putdata([0, 1])
    assert pixels(round_trip(tmp_path, img)) == [(10, 20, 30), (200, 100, 50)]


def test_palette_with_transparency_shows_white(tmp_path):
    img = Image.new("P", (2, 1))
    img.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    img.putdata([0, 1])
    img.info["transparency"] = 0
    assert pixels(round_trip(tmp_path, img)) == [(255, 255, 255), (200, 100, 50)]


def test_rgba_and_la_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(255, 0, 0, 255), (0, 0, 255, 0), (0, 0, 0, 128)])
    assert pixels(round_trip(tmp_path, rgba)) == [(255, 0, 0), (255, 255, 255), (127, 127, 127)]
    la = Image.new("LA", (2, 1))
    la.putdata([(0, 255), (0, 0)])
    assert pixels(round_trip(tmp_path, la)) == [(0, 0, 0), (255, 255, 255)]


def test_cmyk_to_rgb(tmp_path):
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    assert set(pixels(open_image(cmyk))) == {(255, 0, 0)}
    r, g, b = np.asarray(round_trip(tmp_path, cmyk, "JPEG", quality=95)).reshape(-1, 3).mean(0)
    assert r > 240 and g < 15 and b < 15


def test_sixteen_bit_greyscale_scaled_to_eight_bits(tmp_path):
    arr = np.array([[0, 65535, 32896, 257]], dtype=np.uint16)
    img = Image.fromarray(arr)
    assert img.mode == "I;16"
    assert pixels(round_trip(tmp_path, img)) == [(0, 0, 0), (255, 255, 255), (128, 128, 128), (1, 1, 1)]
    # a dark 16-bit image stays dark: the range of I;16 is 0..65535 whatever the values present
    dark = Image.fromarray(np.array([[0, 255, 200]], dtype=np.uint16))
    assert pixels(round_trip(tmp_path, dark)) == [(0, 0, 0), (1, 1, 1), (1, 1, 1)]


def test_greyscale_and_bilevel_to_rgb(tmp_path):
    grey = Image.fromarray(np.array([[0, 77, 255]], dtype=np.uint8))
    assert pixels(round_trip(tmp_path, grey)) == [(0, 0, 0), (77, 77, 77), (255, 255, 255)]
    bilevel = grey.convert("1")
    assert pixels(round_trip(tmp_path, bilevel)) == [(0, 0, 0), (0, 0, 0), (255, 255, 255)]


def test_exif_orientation_applied(tmp_path):
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :20] = (255, 0, 0)  # left half red
    arr[:, 20:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "rotated.jpg"
    Image.fromarray(arr).save(path, quality=95, exif=exif)
    for source in (path, Image.open(path)):
        img = open_image(source)
        assert img.size == (20, 40)  # portrait after rotation
        top, bottom = np.asarray(img)[5, 10], np.asarray(img)[35, 10]
        assert top[0] > 200 and top[2] < 50  # the left (red) half is now on top
        assert bottom[2] > 200 and bottom[0] < 50


def test_animated_gif_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert set(pixels(open_image(path))) == {(255, 0, 0)}
    opened = Image.open(path)
    assert opened.n_frames == 3
    opened.seek(2)  # a PIL image left on another frame still gives the first one
    assert set(pixels(open_image(opened))) == {(255, 0, 0)}


def test_real_jpegs_load(tmp_path):
    names = sorted(json.loads((REAL_IMAGES / "published_captions.json").read_text())["captions"])
    assert len(names) == 12
    for name in names:
        img = open_image(REAL_IMAGES / name)
        raw = Image.open(REAL_IMAGES / name)
        assert img.mode == "RGB"
        assert sorted(img.size) == sorted(raw.size) and max(img.size) <= 1300
        assert np.asarray(img).std() > 10  # real content, not a blank canvas
