"""Dataset readers: a tiny fixture of every format, built on the fly, read back as the same Records."""

from __future__ import annotations

import csv
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from clipcap.data.sources import Record, detect_format, find_images, open_record_image, read_images, read_source
from clipcap.errors import ClipCapError
from clipcap.images import ImageLoadError


# -- fixture builders (also used by test_embed.py) ----------------------------------------------------------------
def image_bytes(seed: int, fmt: str = "PNG", size: int = 40) -> bytes:
    """A small image whose pixels are determined by `seed`, so tests can tell images apart after reading."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def truncated_jpeg(seed: int) -> bytes:
    data = image_bytes(seed, "JPEG")
    return data[: len(data) * 2 // 3]  # header intact, scan data cut


def write_image(path: Path, seed: int, fmt: str = "PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(seed, fmt))
    return path


def bad_image_files(root: Path) -> dict[str, Path]:
    """One file per class of bad image, keyed by the reason class load_image reports."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "empty.png").write_bytes(b"")
    (root / "text.png").write_text("this is not an image")
    (root / "truncated.jpg").write_bytes(truncated_jpeg(7))
    bomb = root / "bomb.png"
    Image.new("1", (9000, 9000)).save(bomb)  # 81 M pixels declared in a few-KB file
    return {
        "empty file": root / "empty.png",
        "not an image": root / "text.png",
        "truncated or corrupt image": root / "truncated.jpg",
        "too many pixels": bomb,
        "file not found": root / "missing.png",
    }


def add_to_tar(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def karpathy_json(path: Path, images_root: Path, n: int = 6, splits=("train", "val", "test", "restval", "novel")):
    """A dataset_coco.json in Karpathy's schema with its images written under images_root/val2014."""
    items = []
    for i in range(n):
        name = f"COCO_val2014_{i:012d}.jpg"
        write_image(images_root / "val2014" / name, seed=i, fmt="JPEG")
        items.append(
            {
                "filepath": "val2014",
                "filename": name,
                "imgid": i,
                "cocoid": 100 + i,
                "split": splits[i % len(splits)],
                "sentences": [{"raw": f"image {i} caption {j}.", "tokens": ["x"]} for j in range(2)],
            }
        )
    path.write_text(json.dumps({"images": items, "dataset": "coco"}))
    return path


# -- Karpathy / COCO / nocaps -------------------------------------------------------------------------------------
def test_karpathy(tmp_path):
    src = karpathy_json(tmp_path / "dataset_coco.json", tmp_path / "imgs", n=6)
    assert detect_format(src) == "karpathy"
    records = list(read_source(src, images=tmp_path / "imgs"))
    assert [r.key for r in records] == [str(100 + i) for i in range(6)]
    assert [r.split for r in records] == ["train", "val", "test", "train", "novel", "train"]  # restval -> train
    assert records[1].captions == ["image 1 caption 0.", "image 1 caption 1."]
    assert records[1].image == str(tmp_path / "imgs" / "val2014" / "COCO_val2014_000000000001.jpg")
    assert records[1].extra == {"cocoid": 101, "imgid": 1}
    assert np.array_equal(np.asarray(open_record_image(records[1])), np.asarray(Image.open(records[1].image)))
    assert [r.key for r in read_source(src, images=tmp_path / "imgs", split="train")] == ["100", "103", "105"]
    assert [r.key for r in read_source(src, split="novel")] == ["104"]
    with pytest.raises(ClipCapError, match=r"no records in split 'restval'.*novel, test, train, val"):
        list(read_source(src, split="restval"))


def test_karpathy_flickr_schema(tmp_path):
    """Flickr8k/30k Karpathy files: no filepath, no cocoid; images sit directly under the root."""
    write_image(tmp_path / "flickr" / "1000_a.jpg", 1, "JPEG")
    obj = {"images": [{"filename": "1000_a.jpg", "imgid": 0, "split": "test", "sentences": [{"raw": "a dog."}]}]}
    (tmp_path / "dataset_flickr8k.json").write_text(json.dumps(obj))
    (rec,) = read_source(tmp_path / "dataset_flickr8k.json", images=tmp_path / "flickr")
    assert rec == Record("1000_a", str(tmp_path / "flickr" / "1000_a.jpg"), ["a dog."], "test", {"imgid": 0})


def coco_json(path: Path, images_root: Path, nocaps: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    images = []
    for i in range(3):
        write_image(images_root / f"{i:04d}.jpg", i, "JPEG")
        im = {"id": 10 + i, "file_name": f"{i:04d}.jpg", "height": 40, "width": 40}
        if nocaps:
            im.update(domain=["in-domain", "near-domain", "out-domain"][i], open_images_id=f"oi{i}")
        images.append(im)
    anns = [{"id": n, "image_id": 10 + n % 3, "caption": f"caption {n} of {10 + n % 3}."} for n in range(7)]
    path.write_text(json.dumps({"info": {}, "images": images, "annotations": anns}))
    return path


def test_coco_captions(tmp_path):
    src = coco_json(tmp_path / "annotations" / "captions_val2014.json", tmp_path / "val2014")
    assert detect_format(src) == "coco"
    records = list(read_source(src, images=tmp_path / "val2014"))
    assert [r.key for r in records] == ["10", "11", "12"]
    assert records[0].captions == ["caption 0 of 10.", "caption 3 of 10.", "caption 6 of 10."]
    assert records[2].captions == ["caption 2 of 12.", "caption 5 of 12."]
    assert {r.split for r in records} == {"val"}
    assert records[1].extra == {"image_id": 11}
    assert Path(records[1].image).is_file()


def test_nocaps_keeps_domain(tmp_path):
    src = coco_json(tmp_path / "nocaps_val_4500_captions.json", tmp_path / "imgs", nocaps=True)
    assert detect_format(src) == "nocaps"
    records = list(read_source(src, images=tmp_path / "imgs"))
    assert [r.extra["domain"] for r in records] == ["in-domain", "near-domain", "out-domain"]
    assert records[2].extra == {"image_id": 12, "domain": "out-domain", "open_images_id": "oi2"}


# -- Conceptual Captions + img2dataset -----------------------------------------------------------------------------
def cc_fixture(tmp_path: Path, as_tar: bool = False) -> tuple[Path, Path]:
    """A CC TSV of 5 rows; img2dataset downloaded rows 0, 2, 3, 4 (row 1 failed), so keys drift from rows."""
    tsv = tmp_path / "Train_GCC-training.tsv"
    rows = [(f"cc caption {n}", f"http://example.com/{n}.jpg") for n in range(5)]
    tsv.write_text("".join(f"{c}\t{u}\n" for c, u in rows))
    out = tmp_path / "cc_images"
    downloaded = [0, 2, 3, 4]
    if as_tar:
        out.mkdir()
        with tarfile.open(out / "00000.tar", "w") as tar:
            for k, n in enumerate(downloaded):
                key = f"{k:09d}"
                add_to_tar(tar, f"{key}.jpg", image_bytes(n, "JPEG"))
                add_to_tar(tar, f"{key}.txt", rows[n][0].encode())
                add_to_tar(
                    tar, f"{key}.json", json.dumps({"url": rows[n][1], "key": key, "status": "success"}).encode()
                )
    else:
        for k, n in enumerate(downloaded):
            key = f"{k:09d}"
            write_image(out / "00000" / f"{key}.jpg", n, "JPEG")
            (out / "00000" / f"{key}.txt").write_text(rows[n][0])
            (out / "00000" / f"{key}.json").write_text(json.dumps({"url": rows[n][1], "key": key}))
    return tsv, out


@pytest.mark.parametrize("as_tar", [False, True])
def test_cc_matches_images_by_url_not_position(tmp_path, as_tar):
    tsv, out = cc_fixture(tmp_path, as_tar)
    assert detect_format(tsv) == "cc"
    records = list(read_source(tsv, images=out))
    assert [r.captions for r in records] == [[f"cc caption {n}"] for n in range(5)]
    assert {r.split for r in records} == {"train"}
    assert records[1].image is None and records[1].key == "row1"
    with pytest.raises(ImageLoadError, match="image not downloaded"):
        open_record_image(records[1])
    for n in (0, 2, 3, 4):  # each caption gets the pixels of its own URL's image
        expected = np.asarray(Image.open(io.BytesIO(image_bytes(n, "JPEG"))).convert("RGB"))
        assert np.array_equal(np.asarray(open_record_image(records[n])), expected)
    assert records[2].key == "000000001"


def test_cc_without_sidecars_or_images(tmp_path):
    tsv, _ = cc_fixture(tmp_path)
    (tmp_path / "bare").mkdir()
    write_image(tmp_path / "bare" / "000000000.jpg", 0)
    with pytest.raises(ClipCapError, match="no img2dataset .json sidecars"):
        list(read_source(tsv, images=tmp_path / "bare"))
    text_only = list(read_source(tsv))  # no images: captions only, for `embed --text-only`
    assert [r.captions[0] for r in text_only] == [f"cc caption {n}" for n in range(5)]
    assert all(r.image is None for r in text_only)


# -- tables ---------------------------------------------------------------------------------------------------------
TABLE_ROWS = [
    {"image": "a.png", "caption": "a first.", "split": "train"},
    {"image": "b.png", "caption": "b only.", "split": "val"},
    {"image": "a.png", "caption": "a second.", "split": "train"},
]


def _check_table_records(records, root: Path):
    assert [(r.key, r.captions, r.split) for r in records] == [
        ("a.png", ["a first.", "a second."], "train"),
        ("b.png", ["b only."], "val"),
    ]
    assert records[0].image == str(root / "a.png")


def test_csv_jsonl_parquet(tmp_path):
    with open(tmp_path / "data.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "caption", "split"])
        w.writeheader()
        w.writerows(TABLE_ROWS)
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TABLE_ROWS))
    pq.write_table(pa.Table.from_pylist(TABLE_ROWS), tmp_path / "data.parquet")
    for name, fmt in (("data.csv", "csv"), ("data.jsonl", "jsonl"), ("data.parquet", "parquet")):
        assert detect_format(tmp_path / name) == fmt
        _check_table_records(list(read_source(tmp_path / name)), tmp_path)
    assert [r.key for r in read_source(tmp_path / "data.csv", split="val")] == ["b.png"]


def test_jsonl_caption_lists_and_custom_columns(tmp_path):
    rows = [{"id": 7, "file": "x.png", "texts": ["one.", "two."], "source": "web"}]
    (tmp_path / "d.jsonl").write_text(json.dumps(rows[0]) + "\n")
    (rec,) = read_source(tmp_path / "d.jsonl", images="/data", image_column="file", caption_column="texts")
    assert rec == Record("7", "/data/x.png", ["one.", "two."], None, {"source": "web"})
    with pytest.raises(ClipCapError, match="no image column among id, file, texts, source; name it with `image_"):
        list(read_source(tmp_path / "d.jsonl"))
    with pytest.raises(ClipCapError, match="no caption column 'caption'"):
        list(read_source(tmp_path / "d.jsonl", image_column="file", caption_column="caption"))
    # a line that is not a JSON object is one bad item, reported; the others are read
    (tmp_path / "broken.jsonl").write_text('{"image": "a.png", "caption": "a."}\n{oops\n[1]\n')
    good, broken, listed = read_source(tmp_path / "broken.jsonl")
    assert (good.key, good.captions, good.problem) == ("a.png", ["a."], None)
    assert broken.problem.startswith("line 2 is not valid JSON") and listed.problem == "line 3 is not a JSON object"


# -- folder and webdataset ------------------------------------------------------------------------------------------
def test_folder_with_sidecars(tmp_path):
    root = tmp_path / "folder"
    write_image(root / "cat.png", 1)
    (root / "cat.txt").write_text("a cat.\n\na sleeping cat.\n")
    write_image(root / "sub" / "dog.jpg", 2, "JPEG")
    (root / "sub" / "dog.txt").write_text("a dog.")
    (root / "sub" / "dog.json").write_text(json.dumps({"url": "http://x/dog.jpg"}))
    write_image(root / "nocap.png", 3)
    (root / "notes.md").write_text("ignored")
    assert detect_format(root) == "folder"
    records = list(read_source(root))
    assert [(r.key, r.captions) for r in records] == [
        ("cat", ["a cat.", "a sleeping cat."]),
        ("nocap", []),
        ("sub/dog", ["a dog."]),
    ]
    assert records[2].extra == {"url": "http://x/dog.jpg"} and records[2].image == str(root / "sub" / "dog.jpg")


def webdataset_shards(root: Path, n_shards: int = 2, per_shard: int = 3) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(n_shards):
        path = root / f"shard-{s:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for k in range(per_shard):
                key = f"{s:05d}{k:04d}"
                add_to_tar(tar, f"{key}.jpg", image_bytes(s * 10 + k, "JPEG"))
                add_to_tar(tar, f"{key}.txt", f"shard {s} item {k}.".encode())
                add_to_tar(tar, f"{key}.json", json.dumps({"key": key, "url": f"u{s}{k}"}).encode())
        paths.append(path)
    return paths


def test_webdataset_shards(tmp_path):
    shards = webdataset_shards(tmp_path / "wds")
    for source in (tmp_path / "wds", str(tmp_path / "wds" / "shard-{00000..00001}.tar"), str(tmp_path / "wds/*.tar")):
        assert detect_format(source) == "webdataset"
        records = list(read_source(source))
        assert [r.key for r in records] == [
            "000000000",
            "000000001",
            "000000002",
            "000010000",
            "000010001",
            "000010002",
        ]
    assert records[4].captions == ["shard 1 item 1."] and records[4].extra == {"key": "000010001", "url": "u11"}
    assert records[4].image == f"{shards[1]}::000010001.jpg"
    expected = np.asarray(Image.open(io.BytesIO(image_bytes(11, "JPEG"))).convert("RGB"))
    assert np.array_equal(np.asarray(open_record_image(records[4])), expected)
    assert [r.key for r in read_source(shards[0])] == ["000000000", "000000001", "000000002"]


def test_webdataset_bad_members(tmp_path):
    path = tmp_path / "bad.tar"
    with tarfile.open(path, "w") as tar:
        add_to_tar(tar, "dir/empty.jpg", b"")
        add_to_tar(tar, "dir/empty.txt", b"e.")
        add_to_tar(tar, "dir/junk.png", b"not an image at all")
        add_to_tar(tar, "dir/cut.jpg", truncated_jpeg(3))
        add_to_tar(tar, "dir/textonly.txt", b"no image here.")
    records = {r.key: r for r in read_source(path)}
    assert records["dir/textonly"].image is None and records["dir/textonly"].captions == ["no image here."]
    for key, reason in (("dir/empty", "empty file"), ("dir/junk", "not an image"), ("dir/cut", "truncated")):
        with pytest.raises(ImageLoadError, match=reason) as err:
            open_record_image(records[key])
        assert err.value.source == records[key].image
    with pytest.raises(ImageLoadError, match="file not found"):
        open_record_image(f"{path}::dir/absent.jpg")
    with pytest.raises(ImageLoadError, match="no image"):
        open_record_image(records["dir/textonly"])


def test_every_bad_image_class_is_an_image_load_error(tmp_path):
    for reason, path in bad_image_files(tmp_path / "bad").items():
        with pytest.raises(ImageLoadError, match=reason):
            open_record_image(Record("k", str(path), ["c."]))


def test_detection_and_user_errors(tmp_path):
    with pytest.raises(ClipCapError, match="source not found"):
        list(read_source(tmp_path / "missing.json"))
    (tmp_path / "x.bin").write_bytes(b"?")
    with pytest.raises(ClipCapError, match="cannot tell the format"):
        detect_format(tmp_path / "x.bin")
    (tmp_path / "odd.json").write_text("[1, 2]")
    with pytest.raises(ClipCapError, match="unrecognised JSON"):
        detect_format(tmp_path / "odd.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ClipCapError, match="not valid JSON"):
        list(read_source(tmp_path / "bad.json"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ClipCapError, match="neither images nor .tar"):
        detect_format(tmp_path / "empty_dir")
    with pytest.raises(ClipCapError, match="unknown format 'tfrecord'"):
        list(read_source(tmp_path / "x.bin", format="tfrecord"))
    with pytest.raises(ClipCapError, match="shard not found"):
        list(read_source(str(tmp_path / "s-{0..1}.tar")))


# -- plain images (what `clipcap caption` takes) -------------------------------------------------------------
def test_find_images_files_dirs_and_globs(tmp_path, monkeypatch):
    for name in ("a.jpg", "b.PNG", "notes.txt", "sub/c.webp", "sub/deeper/d.jpeg", "sub/deeper/e.json", "x[1].png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    P = type(tmp_path)
    # a directory: recursive, image extensions only (any case), sorted
    assert find_images(["sub"]) == [P("sub/c.webp"), P("sub/deeper/d.jpeg")]
    # globs, including recursive ones; files named explicitly are kept whatever their extension
    assert find_images(["*.jpg", "notes.txt"]) == [P("a.jpg"), P("notes.txt")]
    assert find_images(["**/*.jp*g"]) == [P("a.jpg"), P("sub/deeper/d.jpeg")]
    # order of the inputs, duplicates dropped; an existing file whose name looks like a glob is taken literally
    assert find_images(["b.PNG", ".", "x[1].png"]) == [
        P("b.PNG"),
        P("a.jpg"),
        P("sub/c.webp"),
        P("sub/deeper/d.jpeg"),
        P("x[1].png"),
    ]
    # a missing file is kept so that it is reported; nothing found at all is an error
    assert find_images(["missing.jpg"]) == [P("missing.jpg")]
    (tmp_path / "no-images").mkdir()
    (tmp_path / "no-images" / "readme.txt").write_text("x")
    with pytest.raises(ClipCapError, match=r"no images found in \*\.gif, no-images$"):
        find_images(["*.gif", "no-images"])


def test_read_images_keys_by_an_escaped_path_and_opens_the_real_one(tmp_path):
    name = os.fsencode(tmp_path) + b"/bad-\xff-name.png"
    Image.new("RGB", (8, 8)).save(name.decode("utf-8", "surrogateescape"))
    (tmp_path / "good.jpg").write_bytes(image_bytes(0, "JPEG"))
    records = list(read_images([tmp_path]))
    assert [r.key for r in records] == [f"{tmp_path}/bad-\\xff-name.png", f"{tmp_path}/good.jpg"]
    assert all(r.captions == [] and r.problem is None for r in records)
    assert open_record_image(records[0]).size == (8, 8)  # the image is the real (undecodable) name


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_a_table_without_captions_is_images_to_caption_when_captions_are_not_required(tmp_path, fmt):
    rows = [{"image": "a.jpg", "width": 3}, {"image": "b.jpg", "width": 4}]
    path = tmp_path / f"t.{fmt}"
    if fmt == "csv":
        path.write_text("image,width\na.jpg,3\nb.jpg,4\n")
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(ClipCapError, match="no caption column"):
        list(read_source(path))
    records = list(read_source(path, require_captions=False))
    assert [(r.key, r.image, r.captions) for r in records] == [
        ("a.jpg", str(tmp_path / "a.jpg"), []),
        ("b.jpg", str(tmp_path / "b.jpg"), []),
    ]
    assert [r.extra["width"] for r in records] == (["3", "4"] if fmt == "csv" else [3, 4])
