"""Captioner: images -> captions. The high-level API: CLIP encoder + ClipCapModel + tokenizer, batched."""

from __future__ import annotations

import csv
import glob
import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch
from PIL import Image

from .errors import ClipCapError
from .hub import load_tokenizer, resolve_dir
from .model import ClipCapModel

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"})
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def find_images(inputs: Iterable[str | Path]) -> list[Path]:
    """Expand image files, directories (recursively) and glob patterns, in the order given, without duplicates.

    Directories and globs contribute the files with an image extension; a file named explicitly is always kept
    (even a missing one, so that it is reported). Raises ClipCapError when nothing at all is found."""
    inputs = [str(item) for item in inputs]
    found: dict[Path, None] = {}
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        elif path.exists() or not any(c in item for c in "*?["):
            matches = [path]
        else:
            hits = (Path(p) for p in glob.glob(str(path), recursive=True))
            matches = sorted(p for p in hits if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        found.update(dict.fromkeys(matches))
    if not found:
        raise ClipCapError(f"no images found in {', '.join(inputs)}")
    return list(found)


@dataclass
class CaptionReport:
    """What `Captioner.caption_files` did: images captioned and images skipped (each reported on `errors`)."""

    captioned: int = 0
    skipped: int = 0


class _Writer:
    """Caption records as JSON lines ({"image", "caption"} or {"image", "captions"}) or CSV with a header."""

    def __init__(self, out: TextIO, fmt: str, num_captions: int):
        if fmt not in ("jsonl", "csv"):
            raise ClipCapError(f"format must be jsonl or csv, got {fmt!r}")
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


class Captioner:
    """`Captioner.from_pretrained(model_dir).caption(images)` -> list of captions."""

    def __init__(self, model: ClipCapModel, tokenizer, encoder, batch_size: int = 32):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.batch_size = batch_size
        if encoder is not None and encoder.dim != model.config.clip_dim:
            raise ClipCapError(
                f"the encoder {encoder.name} gives {encoder.dim}-d features but the model expects "
                f"clip_dim={model.config.clip_dim}"
            )
        tokens = model.config.token_shape
        if encoder is not None and tokens is not None and encoder.token_dim != tokens[1]:
            raise ClipCapError(
                f"the encoder {encoder.name} gives {encoder.token_dim}-wide image tokens but the model reads "
                f"{tokens[1]}-wide ones"
            )

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        clip_model: str | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        batch_size: int = 32,
    ) -> Captioner:
        """Load the model dir, its tokenizer and the encoder its config names (`clip_model=` overrides;
        a relative `clip_model` in the config resolves against the model dir). `device="auto"` picks cuda when
        available; `dtype` may be a torch dtype or "float32" / "float16" / "bfloat16"."""
        from .encoder import ImageEncoder

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise ClipCapError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
            dtype = DTYPES[dtype]
        path = resolve_dir(name_or_path)
        model = ClipCapModel.from_pretrained(path, device=device, dtype=dtype)
        has_tokenizer = any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))
        tokenizer = load_tokenizer(path if has_tokenizer else model.config.lm)
        name = clip_model or model.config.clip_model
        if not name:
            raise ClipCapError(f"{path}/config.json names no clip_model: pass the encoder with --clip-model")
        if not Path(name).is_absolute() and (path / name).is_dir() and clip_model is None:
            name = str(path / name)
        encoder = ImageEncoder.from_pretrained(name, device=device, dtype=dtype)
        return cls(model, tokenizer, encoder, batch_size=batch_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def model_inputs(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """What the model reads for preprocessed images: pooled CLIP features (B, clip_dim), or the vision tower's
        last hidden states (B, T, D), pooled to the model's token grid, when the model reads image tokens."""
        if self.model.config.token_shape is None:
            return self.encoder.encode_pixels(pixel_values)
        return self.encoder.encode_pixels_and_tokens(pixel_values, self.model.config.token_grid)[1]

    def decode(self, ids: torch.Tensor) -> list[str]:
        """Token rows -> clean strings: cut after the stop token, special tokens dropped, whitespace stripped."""
        stop = self.model.config.stop_token_id
        texts = []
        for row in ids.tolist():
            if stop is not None and stop in row:
                row = row[: row.index(stop) + 1]
            texts.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
        return texts

    def caption_embeddings(
        self,
        clip_embeds: torch.Tensor,
        num_beams: int = 1,
        max_new_tokens: int = 67,
        num_return_sequences: int = 1,
        **generate_kwargs,
    ) -> list[str] | list[list[str]]:
        """Captions for precomputed CLIP embeddings (B, clip_dim), or image tokens (B, T, D) for a model that reads
        them, in batches of `batch_size`."""
        if num_return_sequences > num_beams and not generate_kwargs.get("do_sample"):
            raise ClipCapError(
                f"{num_return_sequences} captions per image need at least {num_return_sequences} beams "
                "(num_beams / --beams) or sampling (do_sample=True)"
            )
        out: list = []
        for i in range(0, len(clip_embeds), self.batch_size):
            ids = self.model.generate(
                clip_embeds[i : i + self.batch_size].to(self.device),
                max_new_tokens=max_new_tokens,
                num_beams=num_beams,
                num_return_sequences=num_return_sequences,
                **generate_kwargs,
            )
            texts = self.decode(ids)
            if num_return_sequences == 1:
                out.extend(texts)
            else:
                out.extend(texts[j : j + num_return_sequences] for j in range(0, len(texts), num_return_sequences))
        return out

    def caption(
        self,
        images,
        num_beams: int = 1,
        max_new_tokens: int = 67,
        num_return_sequences: int = 1,
        **generate_kwargs,
    ) -> list[str] | list[list[str]]:
        """Caption PIL images or paths (one or a list). Returns one string per image, or a list of
        `num_return_sequences` strings per image when that is > 1. A bad image raises ImageLoadError."""
        from .encoder import load_image

        if isinstance(images, (str, Path, Image.Image)):
            images = [images]
        out: list = []
        for i in range(0, len(images), self.batch_size):
            chunk = [load_image(im) for im in images[i : i + self.batch_size]]
            embeds = self.model_inputs(self.encoder.preprocess(chunk))
            out.extend(
                self.caption_embeddings(embeds, num_beams, max_new_tokens, num_return_sequences, **generate_kwargs)
            )
        return out

    def caption_files(
        self,
        inputs: Iterable[str | Path],
        out: TextIO,
        fmt: str = "jsonl",
        errors: TextIO | None = None,
        progress: bool = True,
        num_beams: int = 1,
        max_new_tokens: int = 67,
        num_return_sequences: int = 1,
        **generate_kwargs,
    ) -> CaptionReport:
        """Caption image files, directories (recursive) and globs (see `find_images`), writing one record per
        image to `out` as each batch finishes. A bad image is skipped with one line on `errors` naming it and the
        reason. Raises ClipCapError when nothing is found or no image could be captioned."""
        from tqdm.auto import tqdm

        from .encoder import ImageLoadError, load_image

        errors = errors if errors is not None else sys.stderr
        paths = find_images(inputs)
        writer = _Writer(out, fmt, num_return_sequences)
        report = CaptionReport()
        bar = tqdm(total=len(paths), unit="img", desc="captioning", file=errors, disable=not progress or len(paths) < 2)

        def flush(batch: list[tuple[Path, Image.Image]]) -> None:
            images = [img for _, img in batch]
            captions = self.caption(images, num_beams, max_new_tokens, num_return_sequences, **generate_kwargs)
            for (path, _), caption in zip(batch, captions, strict=True):
                writer.write(str(path), caption)
            out.flush()  # records stream out batch by batch
            report.captioned += len(batch)
            bar.update(len(batch))
            batch.clear()

        batch: list[tuple[Path, Image.Image]] = []
        with bar:
            for path in paths:
                try:
                    batch.append((path, load_image(path)))
                except ImageLoadError as e:
                    bar.write(f"skipped {e}", file=errors)
                    report.skipped += 1
                    bar.update(1)
                if len(batch) == self.batch_size:
                    flush(batch)
            if batch:
                flush(batch)
        if not report.captioned:
            raise ClipCapError(f"none of the {len(paths)} images could be captioned (reasons above)")
        if progress:
            print(f"captioned {report.captioned} images, skipped {report.skipped}", file=errors)
        return report
