"""`clipcap caption`: images, a dataset source or an embedding store -> captions, streamed to stdout (one record per
image as its batch finishes) or, with an output dir, written as resumable shards (`clipcap.caption_job`)."""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass
from typing import TextIO

from ..caption_job import INFO, SKIPPED, CaptionJobConfig, caption_job, caption_stream, input_kind
from ..caption_report import report_line
from ..errors import ClipCapError
from ..options import option
from ..ray_engine import EngineOptions


@dataclass(kw_only=True)
class CaptionConfig(EngineOptions, CaptionJobConfig):
    """The inputs to caption, the model, and how the records are written."""

    format: str = option("jsonl", choices=("jsonl", "csv"), help="stdout format (without an output dir)")


class RecordWriter:
    """Caption records as JSON lines ({"image", "caption", "clip_score", "logprob", ...} or {"image", "captions",
    "clip_scores", "logprobs"}, led by "key" for a dataset source or store: the fields of the --out rows) or CSV with
    a header (the captions, then clip_score and logprob with one caption per image)."""

    def __init__(self, out: TextIO, fmt: str, num_captions: int, keyed: bool = False):
        self.out, self.fmt, self.n, self.keyed = out, fmt, num_captions, keyed
        if fmt == "csv":
            self.csv = csv.writer(out)
            columns = ["caption", "clip_score", "logprob"]
            columns = columns if num_captions == 1 else [f"caption_{i + 1}" for i in range(num_captions)]
            self.csv.writerow([*(["key"] if keyed else []), "image", *columns])

    def write(self, key: str, image: str | None, captions: list[str], fields: dict | None = None) -> None:
        fields = fields or ({"caption": captions[0]} if self.n == 1 else {"captions": captions})
        if self.fmt == "csv":
            scores = [fields.get("clip_score"), fields.get("logprob")] if self.n == 1 else []
            self.csv.writerow([*([key] if self.keyed else []), image, *captions, *scores])
            return
        record = {"key": key} if self.keyed else {}
        record["image"] = image
        record.update(fields)
        self.out.write(json.dumps(record, ensure_ascii=False) + "\n")


def run(cfg: CaptionConfig, progress: bool = True, out: TextIO | None = None, errors: TextIO | None = None) -> int:
    """Caption `cfg.inputs`: with `cfg.out`, into resumable shards there; otherwise one record per image to `out` as
    each batch finishes, a bad image skipped with one line on `errors`. Fails when no image could be captioned."""
    errors = errors if errors is not None else sys.stderr
    if cfg.out is not None:
        return _run_job(cfg, progress, errors)
    if cfg.engine != "local":
        raise ClipCapError(f"engine {cfg.engine} writes sharded output: give it an output dir (`out`)")
    from tqdm.auto import tqdm

    out = out if out is not None else sys.stdout
    writer = RecordWriter(out, cfg.format, cfg.num_captions, keyed=input_kind(cfg) != "images")
    captioned = skipped = dropped = 0
    for item in caption_stream(cfg, progress):
        if item.captions is None:
            tqdm.write(f"skipped {item.image or item.key}: {item.reason}", file=errors)
            skipped += 1
            continue
        captioned += 1
        if item.dropped:
            dropped += 1
            continue
        writer.write(item.key, item.image, item.captions, item.fields)
        out.flush()  # records stream out as they are captioned
    if not captioned:
        raise ClipCapError(f"none of the {skipped} images could be captioned (reasons above)")
    if progress:
        left_out = f", left out {dropped} below --min-clip-score" if cfg.drop_below else ""
        print(f"captioned {captioned} images, skipped {skipped}{left_out}", file=errors)
    return 0


def _run_job(cfg: CaptionConfig, progress: bool, errors: TextIO) -> int:
    if cfg.engine == "ray":
        from ..ray_engine import caption_job_ray
        from .engine import quiet_ray

        quiet_ray()
        result = caption_job_ray(cfg, cfg, progress)
    else:
        result = caption_job(cfg, progress)
    info = result.info
    if info is None:
        if progress:
            print(f"rank {result.rank} done; the last process to finish writes {result.out / INFO}", file=errors)
        return 0
    listed = f"listed in {result.out / SKIPPED}"
    if not info["num_captioned"]:
        raise ClipCapError(f"none of the {info['num_items']} images could be captioned ({listed})")
    if progress:
        reasons = ", ".join(f"{k} {v}" for k, v in info["skipped_by_reason"].items())
        skipped = f"skipped {info['num_skipped']}" + (f" ({reasons}), {listed}" if info["num_skipped"] else "")
        print(
            f"captioned {info['num_captioned']} of {info['num_items']} images into {info['num_shards']} "
            f"{info['shard_format']} shards in {result.out / 'captions'}; {skipped}",
            file=errors,
        )
    report = info.get("report")
    if report is not None and (progress or report["collapse_warning"]):
        print(f"report ({result.out / INFO}): {report_line(report)}", file=errors)
    return 0
