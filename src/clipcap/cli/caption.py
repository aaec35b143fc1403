"""`clipcap caption`: image files, directories and globs -> one caption record per image on stdout."""

from __future__ import annotations

import csv
import glob
import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from ..decoding import DecodingOptions, generate_kwargs
from ..devices import DEVICE_HELP
from ..errors import ClipCapError
from ..images import ImageLoadError, is_image_file, open_image
from ..options import option


@dataclass(kw_only=True)
class CaptionConfig(DecodingOptions):
    """The images to caption, the model, and how the records are written."""

    images: list[str] = option(
        positional=True, metavar="IMAGE_OR_DIR_OR_GLOB", help="image files, directories (searched recursively) or globs"
    )
    model: str = option(help="model dir (or HF Hub id) to caption with")
    num_captions: int = option(1, min=1, help="captions per image: the best beams (needs beams >= N) or samples")
    batch_size: int = option(32, min=1, help="images encoded and decoded together")
    format: str = option("jsonl", choices=("jsonl", "csv"), help="stdout format")
    clip_model: str | None = option(None, help="CLIP encoder dir or id", default_text="the one the model config names")
    device: str = option("auto", help=DEVICE_HELP)
    dtype: str | None = option(
        None,
        choices=("float32", "float16", "bfloat16"),
        help="weights and compute dtype (float16/bfloat16 are for GPUs)",
        default_text="as saved",
    )


def find_images(inputs: Iterable[str | Path]) -> list[Path]:
    """Expand image files, directories (recursively) and glob patterns, in the order given, without duplicates.

    Directories and globs contribute the files with an image extension; a file named explicitly is always kept
    (even a missing one, so that it is reported). Raises ClipCapError when nothing at all is found."""
    inputs = [str(item) for item in inputs]
    found: dict[Path, None] = {}
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            matches = sorted(p for p in path.rglob("*") if is_image_file(p) and p.is_file())
        elif path.exists() or not any(c in item for c in "*?["):
            matches = [path]
        else:
            hits = (Path(p) for p in glob.glob(str(path), recursive=True))
            matches = sorted(p for p in hits if is_image_file(p) and p.is_file())
        found.update(dict.fromkeys(matches))
    if not found:
        raise ClipCapError(f"no images found in {', '.join(inputs)}")
    return list(found)


class RecordWriter:
    """Caption records as JSON lines ({"image", "caption"} or {"image", "captions"}) or CSV with a header."""

    def __init__(self, out: TextIO, fmt: str, num_captions: int):
        self.out, self.fmt, self.n = out, fmt, num_captions
        if fmt == "csv":
            self.csv = csv.writer(out)
            columns = ["caption"] if num_captions == 1 else [f"caption_{i + 1}" for i in range(num_captions)]
            self.csv.writerow(["image", *columns])

    def write(self, image: str, caption: str | list[str]) -> None:
        captions = [caption] if isinstance(caption, str) else caption
        if self.fmt == "csv":
            self.csv.writerow([image, *captions])
        else:
            record = {"image": image, "caption": caption} if self.n == 1 else {"image": image, "captions": captions}
            self.out.write(json.dumps(record, ensure_ascii=False) + "\n")


def _display(path: Path) -> str:
    # A file name that is not valid UTF-8 (kept by Python as lone surrogates) is shown with U+FFFD instead.
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def run(cfg: CaptionConfig, progress: bool = True, out: TextIO | None = None, errors: TextIO | None = None) -> int:
    """Caption `cfg.images`, writing one record per image to `out` as each batch finishes; a bad image is skipped
    with one line on `errors`. Fails only when nothing is found or no image could be captioned."""
    from tqdm.auto import tqdm

    from ..captioner import Captioner

    out = out if out is not None else sys.stdout
    errors = errors if errors is not None else sys.stderr
    paths = find_images(cfg.images)
    captioner = Captioner.from_pretrained(
        cfg.model, clip_model=cfg.clip_model, device=cfg.device, dtype=cfg.dtype, batch_size=cfg.batch_size
    )
    decoding = generate_kwargs(cfg, captioner.decoding_defaults)
    if cfg.num_captions > decoding["num_beams"] and not decoding["do_sample"]:
        raise ClipCapError(
            f"{cfg.num_captions} captions per image need at least {cfg.num_captions} beams (`num_beams`) or "
            "sampling (`do_sample`)"
        )
    writer = RecordWriter(out, cfg.format, cfg.num_captions)
    captioned = skipped = 0
    bar = tqdm(total=len(paths), unit="img", desc="captioning", file=errors, disable=not progress or len(paths) < 2)

    def flush(batch: list) -> None:
        nonlocal captioned
        images = [img for _, img in batch]
        captions = captioner.caption(images, num_return_sequences=cfg.num_captions, **decoding)
        for (path, _), caption in zip(batch, captions, strict=True):
            writer.write(_display(path), caption)
        out.flush()  # records stream out batch by batch
        captioned += len(batch)
        bar.update(len(batch))
        batch.clear()

    batch: list = []
    with bar:
        for path in paths:
            try:
                batch.append((path, open_image(path, name=_display(path))))
            except ImageLoadError as e:
                bar.write(f"skipped {e}", file=errors)
                skipped += 1
                bar.update(1)
            if len(batch) == cfg.batch_size:
                flush(batch)
        if batch:
            flush(batch)
    if not captioned:
        raise ClipCapError(f"none of the {len(paths)} images could be captioned (reasons above)")
    if progress:
        print(f"captioned {captioned} images, skipped {skipped}", file=errors)
    return 0
