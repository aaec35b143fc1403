"""Evaluating captions: generate with a model and score, or score a file of predictions; one typed result.

`evaluate(EvalConfig(...))` either captions a dataset split (a source whose images are encoded with the model's CLIP,
or an embedding store whose vectors are captioned directly) and scores the captions, or scores a predictions file
against references. Scores come from `metrics` (coco-caption, CLIPScore); nocaps data is also scored per domain, each
domain as its own corpus. `write_results` saves an `EvalResult` as metrics.json + a per-image CSV (+ the predictions in
COCO results format), `format_table` renders it as Markdown.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from .data.references import load_predictions, load_references, match_predictions
from .data.sources import FORMATS, Record, open_record_image, read_source
from .data.store import is_store
from .decoding import DecodingOptions
from .devices import DEVICE_HELP
from .errors import ClipCapError
from .images import IMAGE_EXTENSIONS, ImageLoadError, check_resize
from .limits import MAX_BATCH_SIZE
from .metrics import CLIP_METRICS, NGRAM_METRICS, NOCAPS_DOMAINS, PYTHON_TOKENIZER, clip_score, compute_scores
from .options import option
from .outputs import check_file, write_file
from .rerank import RerankOptions, candidate_decoding, score_embeddings

COMMAND = "clipcap evaluate"


@dataclass(kw_only=True)
class EvalConfig(RerankOptions, DecodingOptions):
    """What to evaluate and how: `model` + `data` (generate, then score) or `predictions` + `references`."""

    model: str | None = option(None, help="model dir (or HF Hub id) to generate captions with")
    data: str | None = option(
        None,
        help="with a model: a dataset source (any format embed reads; images are encoded with the model's CLIP) or "
        "an embedding store dir (its embeddings are captioned)",
    )
    predictions: str | None = option(
        None, help="captions to score: COCO results JSON [{image_id, caption}], caption JSONL, or {id: caption}"
    )
    references: str | None = option(
        None, help="reference captions: COCO/nocaps annotation JSON, Karpathy JSON, JSONL/CSV, or {id: [captions]}"
    )
    out: str = option("metrics.json", help="metrics file; OUT.csv (and OUT.predictions.json) are written beside it")
    overwrite: bool = option(False, help="replace the files an earlier evaluate wrote at OUT")
    split: str | None = option(
        None, help="split to evaluate; 'all' for every image", default_text="test with a model, all otherwise"
    )
    format: str = option("auto", choices=("auto", *FORMATS), help="format of the data / references")
    images: str | None = option(
        None,
        help="image root for sources that name images by relative path (default: the source file's folder); with "
        "predictions, where CLIPScore looks for the images (ID.jpg or the references' file names)",
    )
    batch_size: int = option(32, min=1, max=MAX_BATCH_SIZE, help="images per batch for CLIP and decoding")
    limit: int | None = option(None, min=1, help="evaluate only the first N images of the split (quick checks)")
    clip_model: str | None = option(
        None,
        help="CLIP for CLIPScore (HF id or dir); with a model it also replaces the encoder the model config names",
        default_text="the model's own CLIP; none for predictions, which skips CLIPScore",
    )
    clipscore: bool = option(True, negate="no-clipscore", help="compute CLIPScore / RefCLIPScore")
    spice: bool = option(True, negate="no-spice", help="compute SPICE (slow; needs Java and Stanford CoreNLP jars)")
    device: str = option("auto", help=DEVICE_HELP)

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.model is None) != (self.data is None) or (self.predictions is None) != (self.references is None):
            raise ClipCapError("`model` needs `data`, and `predictions` needs `references`")
        if (self.model is None) == (self.predictions is None):
            raise ClipCapError(
                "evaluate either a model (`model` DIR and `data` SOURCE) or a file of predictions "
                "(`predictions` P and `references` R), not both or neither"
            )
        if self.predictions is not None:
            decoding = [
                n for n in ("num_beams", "max_new_tokens", "length_penalty", "limit", "candidates") if getattr(self, n)
            ]
            if decoding or self.do_sample:
                name = decoding[0] if decoding else "do_sample"
                raise ClipCapError(f"`{name}` only applies when generating (a `model` and `data`)")
            if self.clip_model is not None and not self.clipscore:
                raise ClipCapError(
                    "scoring predictions, `clip_model` is only used for CLIPScore, which `clipscore` turns off"
                )


@dataclass
class EvalResult:
    """Scores of one evaluation: corpus `metrics` (coco-caption, CLIPScore where computed), per nocaps `domains`,
    one row per image, the `settings` it ran with, timings, and what was skipped or could not be computed."""

    metrics: dict[str, float]
    num_images: int
    tokenizer: str
    unavailable: dict[str, str]
    domains: dict[str, dict]
    rows: list[dict]
    settings: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)
    missing_predictions: int = 0
    clipscore_images: int | None = None

    def to_dict(self) -> dict:
        """The metrics.json layout: metrics at the top level, then everything but the per-image rows."""
        out = {**self.metrics, "num_images": self.num_images, "tokenizer": self.tokenizer}
        out["unavailable"] = self.unavailable
        if self.domains:
            out["domains"] = self.domains
        if self.clipscore_images is not None:
            out["clipscore_images"] = self.clipscore_images
        if self.settings.get("predictions") is not None:
            out["missing_predictions"] = self.missing_predictions
        out.update(settings=self.settings, time=self.timings)
        out["skipped"] = {"count": len(self.skipped), "items": self.skipped}
        return out


# -- scoring ---------------------------------------------------------------------------------------------------------
def score(
    predictions: dict[str, str], references: dict[str, Record], clip: dict[str, dict[str, float]], spice: bool
) -> EvalResult:
    """Overall and per-domain scores and per-image rows of `predictions` (id -> caption) against `references`
    (id -> Record, whose `extra["domain"]` groups nocaps images). `clip` maps id -> {"CLIPScore": ...} for the images
    CLIPScore could be computed on."""
    domain = {k: references[k].extra.get("domain") for k in predictions}
    present = set(domain.values()) - {None}
    order = [d for d in NOCAPS_DOMAINS if d in present] + sorted(present - set(NOCAPS_DOMAINS))
    domains = {d: [k for k in predictions if domain[k] == d] for d in order}
    refs = {k: references[k].captions for k in predictions}
    overall = compute_scores(predictions, refs, spice=spice, subsets=domains)

    def with_clip(metrics: dict[str, float], keys: list[str]) -> dict:
        out = dict(metrics)
        for name in CLIP_METRICS:
            values = [clip[k][name] for k in keys if name in clip.get(k, {})]
            if values:
                out[name] = float(sum(values) / len(values))
        return out

    rows = []
    for key, caption in predictions.items():
        row = {"image": key}
        if present:
            row["domain"] = domain[key] or ""
        row.update(prediction=caption, references=refs[key])
        scores = {**overall.per_image[key], **clip.get(key, {})}
        row.update((m, scores[m]) for m in ("CIDEr", "METEOR", "ROUGE-L", "SPICE", *CLIP_METRICS) if m in scores)
        rows.append(row)
    return EvalResult(
        metrics=with_clip(overall.metrics, list(predictions)),
        num_images=len(predictions),
        tokenizer=overall.tokenizer,
        unavailable=dict(overall.unavailable),
        domains={
            d: {**with_clip(overall.subsets[d].metrics, keys), "num_images": len(keys)} for d, keys in domains.items()
        },
        rows=rows,
    )


def _require_pycocoevalcap() -> None:
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError:
        raise ClipCapError("evaluation needs pycocoevalcap: pip install 'clipcap-hf[eval]'") from None


def _encode_images(encoder, sources: list, open_image, batch_size: int, desc: str, progress: bool, token_grid=False):
    """CLIP features of the images that open; bad ones are skipped and reported. Streams, so memory holds one
    batch of pixels. Returns (features (n_ok, dim) on CPU, indices of the images kept, skipped [{image, reason}]).
    `token_grid` other than False: the features are (pooled (n_ok, dim), image tokens (n_ok, T, D)) instead, the
    patch grid pooled to that grid (None: every token)."""
    from tqdm.auto import tqdm

    feats, tokens, kept, skipped = [], [], [], []
    with tqdm(total=len(sources), desc=desc, unit="img", disable=not progress) as bar:
        for start in range(0, len(sources), batch_size):
            batch = []
            for i in range(start, min(start + batch_size, len(sources))):
                try:
                    image = open_image(sources[i])
                    check_resize([image], encoder.processor, [str(getattr(sources[i], "key", sources[i]))])
                    batch.append(image)
                    kept.append(i)
                except ImageLoadError as e:
                    skipped.append({"image": e.source, "reason": e.reason})
            if batch and token_grid is not False:
                pooled, hidden = encoder.encode_pixels_and_tokens(encoder.preprocess(batch), token_grid)
                feats.append(pooled.cpu())
                tokens.append(hidden.cpu())
            elif batch:
                feats.append(encoder.encode_pixels(encoder.preprocess(batch)).cpu())
            bar.update(min(batch_size, len(sources) - start))
    pooled = torch.cat(feats) if feats else torch.empty(0, encoder.dim)
    if token_grid is not False:
        return (pooled, torch.cat(tokens) if tokens else torch.empty(0, 0, encoder.token_dim)), kept, skipped
    return pooled, kept, skipped


def _clip_rows(encoder, keys, captions, features, references, batch_size, progress) -> dict[str, dict[str, float]]:
    scores = clip_score(
        captions, encoder, image_features=features, references=references, batch_size=batch_size, progress=progress
    )
    per = scores["per_image"]
    return {k: {name: per[name][n] for name in per} for n, k in enumerate(keys)}


def _versions() -> dict:
    import transformers

    from .version import __version__

    try:
        pycocoevalcap_version = version("pycocoevalcap")
    except PackageNotFoundError:
        pycocoevalcap_version = "unknown"
    return {
        "clipcap": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "pycocoevalcap": pycocoevalcap_version,
    }


def _strategy(decoding: dict) -> str:
    if decoding.get("do_sample"):
        return "sampling"
    return "greedy" if decoding["num_beams"] == 1 else "beam search"


def _problems(records: list[Record]) -> list[dict]:
    return [{"image": r.image or r.key, "reason": r.problem} for r in records if r.problem]


def _drop_blank_references(records: list[Record]) -> tuple[list[Record | None], list[dict]]:
    """Each record with its blank reference captions dropped, or None (and a skipped entry) when none is left:
    a blank reference scores every caption 0 and would pull the average down without a word."""
    out, skipped = [], []
    for record in records:
        captions = [c for c in record.captions if c.strip()]
        if captions:
            out.append(dataclasses.replace(record, captions=captions))
        else:
            reason = "every reference caption is empty" if record.captions else "no reference captions"
            skipped.append({"image": record.image or record.key, "reason": reason})
            out.append(None)
    return out, skipped


def _unique(records: list[Record], data) -> None:
    twice = [k for k, n in Counter(r.key for r in records).items() if n > 1]
    if twice:
        raise ClipCapError(
            f"{data} names some images twice (duplicate keys, e.g. {twice[:3]}): evaluation needs one row per image"
        )


# -- evaluating a model ------------------------------------------------------------------------------------------
def evaluate_model(cfg: EvalConfig, progress: bool = False) -> EvalResult:
    """Caption the `split` of `cfg.data` with `cfg.model`, then score."""
    from tqdm.auto import tqdm

    from .caption_job import check_store
    from .captioner import Captioner

    _require_pycocoevalcap()  # fail before generating for minutes, not after
    split = "test" if cfg.split is None else None if cfg.split == "all" else cfg.split
    start = time.perf_counter()
    captioner = Captioner.from_pretrained(
        cfg.model, clip_model=cfg.clip_model, device=cfg.device, batch_size=cfg.batch_size
    )
    decoding = captioner.decoding(cfg)  # checked before any image is read
    encoder = captioner.encoder
    tokens = captioner.model.config.token_shape  # a model that reads image tokens is given them
    skipped: list[dict] = []
    if is_store(cfg.data):
        from .data.store import EmbeddingStore

        store = EmbeddingStore(cfg.data, split=split)
        if store.clip_model is None and cfg.rerank != "none":  # before check_store warns that it is taken on trust
            raise ClipCapError(
                f"{cfg.data} does not record which encoder made its embeddings, so candidates cannot be reranked "
                "against them: embed the data with the model's encoder"
            )
        check_store(store, captioner)  # the one store check `caption` makes too
        count = min(store.num_images, cfg.limit) if cfg.limit is not None else store.num_images
        records = [
            Record(store.keys[j], store.image_paths[j] or None, store.image_captions(j), extra=store.extras[j])
            for j in range(count)
        ]
        _unique(records, cfg.data)
        records, blank = _drop_blank_references(records)
        skipped += blank
        kept = [j for j, r in enumerate(records) if r is not None]
        records = [records[j] for j in kept]
        features = inputs = torch.from_numpy(store.image_embeddings(kept))
        if tokens is not None:
            inputs = torch.from_numpy(store.image_tokens(kept))
    else:
        records = []
        for record in read_source(cfg.data, format=cfg.format, images=cfg.images, split=split):
            if cfg.limit is not None and len(records) == cfg.limit:
                break
            if record.problem:
                skipped.extend(_problems([record]))
            else:
                (usable,), blank = _drop_blank_references([record])
                skipped += blank
                records += [usable] if usable is not None else []
        _unique(records, cfg.data)
        grid = False if tokens is None else captioner.model.config.token_grid
        features, kept, bad = _encode_images(
            encoder, records, open_record_image, cfg.batch_size, "encoding images", progress, grid
        )
        features, inputs = features if tokens is not None else (features, features)
        skipped += bad
        records = [records[i] for i in kept]
    if not records:
        raise ClipCapError(f"no images to evaluate in {cfg.data}" + (f" (split {split!r})" if split else ""))

    encoded = time.perf_counter()
    decoding = candidate_decoding(decoding, cfg.candidates, beams_given=cfg.num_beams is not None)
    captions: list[str] = []
    with tqdm(total=len(records), desc="captioning", unit="img", disable=not progress) as bar:
        for i in range(0, len(records), cfg.batch_size):
            chunk = inputs[i : i + cfg.batch_size]
            if cfg.candidates is None:
                captions += captioner.caption_with(chunk, decoding)
            else:  # the kept one of several candidates (rerank.py)
                found = score_embeddings(
                    captioner, chunk, features[i : i + cfg.batch_size], decoding, cfg.candidates, cfg.rerank,
                    cfg.rerank_weight,
                )  # fmt: skip
                captions += [s.caption for s in found]
            bar.update(len(chunk))
    generated = time.perf_counter()

    keys = [r.key for r in records]
    predictions = dict(zip(keys, captions, strict=True))
    clip_reason = None
    if not cfg.clipscore:
        clip_reason = "turned off"
    elif encoder.tokenizer is None:
        clip_reason = f"the encoder {encoder.name} has no tokenizer files, so its text tower cannot be used"
    references = [r.captions for r in records]
    clip_rows = (
        {} if clip_reason else _clip_rows(encoder, keys, captions, features, references, cfg.batch_size, progress)
    )
    result = score(predictions, {r.key: r for r in records}, clip_rows, cfg.spice)
    if clip_reason:
        result.unavailable.update({m: clip_reason for m in CLIP_METRICS})
    result.settings = {
        "model": str(cfg.model),
        "data": str(cfg.data),
        "split": split,
        "limit": cfg.limit,
        **captioner.encoder_info,  # which encoder captioned (and scored): its path or id and weights' hash
        "decoding": {
            "strategy": _strategy(decoding),
            **decoding,
            "length_penalty": decoding["length_penalty"] if decoding["num_beams"] > 1 else None,
            "stop_token_id": captioner.model.config.stop_token_id,
            **{name: getattr(cfg, name) for name in ("candidates", "rerank", "rerank_weight")},
            "batch_size": cfg.batch_size,
        },
        "device": str(captioner.device),
        "dtype": str(next(captioner.model.parameters()).dtype).replace("torch.", ""),
        "versions": _versions(),
    }
    end = time.perf_counter()
    result.timings = {
        "encoding_s": round(encoded - start, 3),
        "generation_s": round(generated - encoded, 3),
        "images_per_s": round(len(records) / max(generated - encoded, 1e-9), 2),
        "scoring_s": round(end - generated, 3),
        "total_s": round(end - start, 3),
    }
    result.skipped = skipped
    return result


# -- evaluating prediction files -----------------------------------------------------------------------------------
def _find_image(key: str, record: Record, pred_image: str | None, root: Path | None) -> str | None:
    candidates = [pred_image, record.image]
    if root is not None:
        candidates += [root / key, *(root / f"{key}{s}" for s in IMAGE_EXTENSIONS)]
    return next((str(c) for c in candidates if c and Path(c).is_file()), None)


def evaluate_predictions(cfg: EvalConfig, progress: bool = False) -> EvalResult:
    """Score `cfg.predictions` against `cfg.references`. CLIPScore/RefCLIPScore need `cfg.clip_model` and the
    images: paths named in the predictions, the references' image files (under `images` for COCO/nocaps annotation
    files) or `images`/ID.jpg."""
    _require_pycocoevalcap()
    start = time.perf_counter()
    split = None if cfg.split in (None, "all") else cfg.split
    preds, pred_images = load_predictions(cfg.predictions)
    records = load_references(cfg.references, format=cfg.format, images=cfg.images, split=split)
    skipped = _problems(records)
    good = [r for r in records if not r.problem]
    matched = match_predictions(preds, pred_images, good)
    empty = sorted(k for k, r in matched.items() if not r.captions)
    if empty:
        raise ClipCapError(f"{len(empty)} predicted images have no reference captions, e.g. {empty[:3]}")
    cleaned, blank = _drop_blank_references(list(matched.values()))
    skipped += blank
    matched = {k: r for k, r in zip(matched, cleaned, strict=True) if r is not None}
    by_key = {record.key: record for record in matched.values()}
    captions = {matched[k].key: c for k, c in preds.items() if k in matched}
    missing = sum(1 for r in good if r.key not in by_key and any(c.strip() for c in r.captions))

    clip_rows: dict[str, dict[str, float]] = {}
    clip_reason = None
    if not cfg.clipscore:
        clip_reason = "turned off"
    elif cfg.clip_model is None:
        clip_reason = "needs a CLIP model: name one as `clip_model` (and where the images are as `images`)"
    else:
        from .encoder import ImageEncoder
        from .images import open_image

        keys, paths = [], []
        for pred_key, record in matched.items():
            path = _find_image(record.key, record, pred_images.get(pred_key), Path(cfg.images) if cfg.images else None)
            if path is None:
                skipped.append({"image": record.key, "reason": "image file not found"})
            else:
                keys.append(record.key)
                paths.append(path)
        if keys:
            encoder = ImageEncoder.from_pretrained(cfg.clip_model, device=cfg.device)
            features, kept, bad = _encode_images(
                encoder, paths, open_image, cfg.batch_size, "CLIP image features", progress
            )
            skipped += bad
            keys = [keys[i] for i in kept]
            refs = [by_key[k].captions for k in keys]
            clip_rows = _clip_rows(encoder, keys, [captions[k] for k in keys], features, refs, cfg.batch_size, progress)
        if not clip_rows:
            clip_reason = "no image file could be found or opened (name the image folder as `images`)"
    result = score(captions, by_key, clip_rows, cfg.spice)
    if clip_reason:
        result.unavailable.update({m: clip_reason for m in CLIP_METRICS})
    elif len(clip_rows) < len(captions):
        result.clipscore_images = len(clip_rows)
    result.missing_predictions = missing
    result.settings = {
        "predictions": str(cfg.predictions),
        "references": str(cfg.references),
        "split": split,
        "clip_model": cfg.clip_model,
        "versions": _versions(),
    }
    result.timings = {"total_s": round(time.perf_counter() - start, 3)}
    result.skipped = skipped
    return result


def evaluate(cfg: EvalConfig, progress: bool = False) -> EvalResult:
    """Evaluate as `cfg` says (a model on data, or predictions against references)."""
    return evaluate_model(cfg, progress) if cfg.model is not None else evaluate_predictions(cfg, progress)


# -- output: metrics.json, per-image CSV, predictions, Markdown table -----------------------------------------------
def _coco_id(key: str):
    return int(key) if key.isdigit() else key


def result_paths(out: str | Path, generated: bool) -> list[Path]:
    """The files `write_results` writes for `out`: OUT, OUT.csv and, after generation, OUT.predictions.json."""
    out = Path(out)
    return [out, out.with_suffix(".csv")] + ([out.with_name(out.stem + ".predictions.json")] if generated else [])


def output_policy(cfg: EvalConfig) -> dict:
    """How `cfg`'s result files meet the output policy (`outputs.py`): not one of the inputs nor inside a dataset
    or store; into the model dir or the image root they may go (a model card reads the model dir's metrics.json)."""
    return {
        "inputs": [cfg.data, cfg.predictions, cfg.references, cfg.clip_model],
        "hosts": [cfg.model, cfg.images],
        "overwrite": cfg.overwrite,
    }


def check_out(cfg: EvalConfig) -> None:
    """Refuse `cfg.out` (or a file beside it) as `write_results` would, before the evaluation starts."""
    for path in result_paths(cfg.out, cfg.model is not None):
        check_file(path, COMMAND, **output_policy(cfg))


def write_results(
    result: EvalResult,
    out: str | Path = "metrics.json",
    *,
    inputs: Iterable = (),
    hosts: Iterable = (),
    overwrite: bool = False,
) -> list[Path]:
    """Write `out` (metrics.json: everything but the per-image rows), OUT.csv (one row per image: prediction,
    references, per-image CIDEr, CLIPScore, ...) and, after generation, OUT.predictions.json (COCO results format,
    ready to rescore or to submit to the nocaps server). The files follow the output policy (`outputs.py`: never
    an input, an existing file only when an earlier evaluate wrote it and `overwrite` is set); each is written whole
    or not at all. Returns the paths written."""
    paths = result_paths(out, "model" in result.settings)
    where = dict(inputs=list(inputs), hosts=list(hosts), overwrite=overwrite)
    for path in paths:  # all of them before any is written
        check_file(path, COMMAND, **where)
    columns = list(dict.fromkeys(c for row in result.rows for c in row))

    def write_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            for row in result.rows:
                writer.writerow({**row, "references": json.dumps(row["references"], ensure_ascii=False)})

    metrics = json.dumps(result.to_dict(), indent=2, default=str) + "\n"
    writers = [lambda tmp: tmp.write_text(metrics), write_csv]
    if len(paths) == 3:
        results = [{"image_id": _coco_id(r["image"]), "caption": r["prediction"]} for r in result.rows]
        text = json.dumps(results, indent=1, ensure_ascii=False) + "\n"
        writers.append(lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return [write_file(path, COMMAND, write, **where) for path, write in zip(paths, writers, strict=True)]


def format_table(result: EvalResult) -> str:
    """The metrics as a Markdown table (×100, the coco-caption convention): one row overall, one per nocaps
    domain; notes below it say which tokenizer ran, what could not be computed and why, and the decoding used."""
    python_tok = result.tokenizer == PYTHON_TOKENIZER
    unavailable = result.unavailable
    names = [m for m in (*NGRAM_METRICS, *CLIP_METRICS) if m in result.metrics or m in unavailable]
    header = [
        f"{m}*" if python_tok and m in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr") else m
        for m in names
    ]
    rows = [("overall", {**result.metrics, "num_images": result.num_images}), *result.domains.items()]
    lines = [
        "| split | images | " + " | ".join(header) + " |",
        "|---|---:|" + "---:|" * len(names),
    ]
    for label, metrics in rows:
        cells = [f"{100 * metrics[m]:.2f}" if m in metrics else "n/a" for m in names]
        lines.append(f"| {label} | {metrics['num_images']} | " + " | ".join(cells) + " |")
    notes = ["", "Scores ×100 (coco-caption convention; CIDEr is CIDEr-D)."]
    if python_tok:
        notes.append(
            "* tokenized with clipcap's Python tokenizer because Java is missing: close to, but not guaranteed "
            "equal to, coco-caption's PTB tokenizer; do not compare these digits with published numbers."
        )
    notes += [f"{m}: n/a, {reason}" for m, reason in unavailable.items()]
    decoding = result.settings.get("decoding")
    if decoding:
        notes.append(
            f"Decoding: {decoding['strategy']} (num_beams={decoding['num_beams']}, max_new_tokens="
            f"{decoding['max_new_tokens']}); {result.num_images} images captioned in "
            f"{result.timings['generation_s']:.1f} s ({result.timings['images_per_s']:.1f} img/s); "
            f"total {result.timings['total_s']:.1f} s."
        )
    if result.skipped:
        notes.append(f"Skipped {len(result.skipped)} images (see metrics.json).")
    return "\n".join(lines + notes)
