"""Caption evaluation: the coco-caption reference scorer, CLIPScore / RefCLIPScore, nocaps domains, result tables.

Numbers must be comparable with published ones, so the n-gram metrics are pycocoevalcap itself (coco-caption: the
Stanford PTB tokenizer, BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, SPICE), never a re-implementation. Its tokenizer, METEOR
and SPICE run on Java; without Java, BLEU, ROUGE-L and CIDEr are still computed, on `python_tokenize` output, and the
result says so. SPICE also needs Stanford CoreNLP jars that pycocoevalcap downloads on first use: when they are not
installed SPICE is reported unavailable with the reason (we never download while scoring, and never fake a number).

CLIPScore (Hessel et al. 2021) is 2.5 * max(cos(image, "A photo depicts " + caption), 0) with any HF CLIP-family
model; RefCLIPScore is the harmonic mean of it and max(max_r cos(caption, reference_r), 0).
"""

from __future__ import annotations

import csv
import functools
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .errors import ClipCapError

NGRAM_METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE")
CLIP_METRICS = ("CLIPScore", "RefCLIPScore")
NOCAPS_DOMAINS = ("in-domain", "near-domain", "out-domain")
CLIPSCORE_PREFIX = "A photo depicts "
CLIPSCORE_WEIGHT = 2.5
PTB_TOKENIZER = "ptb"  # coco-caption's Stanford PTB tokenizer (Java)
PYTHON_TOKENIZER = "python"  # `python_tokenize`: the fallback without Java
JAVA_HINT = (
    "install a Java runtime (Debian/Ubuntu: apt-get install default-jre-headless; macOS: brew install openjdk; "
    "conda: conda install -c conda-forge openjdk) and make sure `java` is on PATH"
)


def _require_pycocoevalcap() -> None:
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError:
        raise ClipCapError("evaluation needs pycocoevalcap: pip install 'clipcap[eval]'") from None


# -- Java --------------------------------------------------------------------------------------------------------
@functools.cache
def _java_runs(java: str) -> str | None:
    try:
        subprocess.run([java, "-version"], capture_output=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError) as e:
        return f"`{java} -version` failed ({e})"
    return None


def java_problem() -> str | None:
    """None when a working `java` is on PATH, else the reason there is none."""
    java = shutil.which("java")
    return "no `java` found on PATH" if java is None else _java_runs(java)


# -- tokenization ------------------------------------------------------------------------------------------------
# Words (keeping inner hyphens, dots and slashes: "t-shirt", "3.5"), PTB's split clitics ("do n't", "dog 's"), and any
# other non-space character as its own token.
_TOKEN = re.compile(r"\w+(?=n't\b)|n't\b|'(?:s|m|d|ll|re|ve)\b|\w+(?:[-./]\w+)*|\S")
# coco-caption drops these after PTB tokenization; PTB writes brackets and quotes as tokens that list covers.
_PTB_PUNCTUATION = frozenset(
    ["''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";", '"', "(", ")", "{", "}"]
)


def python_tokenize(caption: str) -> str:
    """Tokenize like coco-caption without Java: lower-case, split punctuation and the clitics PTB splits
    ('s, n't, 're, ...), drop the punctuation coco-caption drops, join with single spaces. Same output as the PTB
    tokenizer on ordinary captions, but not on every construct (abbreviations, brackets), so scores made with it
    are labelled and are not for comparison with published numbers."""
    return " ".join(t for t in _TOKEN.findall(caption.lower()) if t not in _PTB_PUNCTUATION)


def _ptb_tokenize(captions: dict) -> dict:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # PTB reads one caption per line: any line break inside a caption would shift every later caption.
    # Empty captions are kept out of its input for the same reason (they tokenize to "" anyway).
    flat = [" ".join(c.split()) for caps in captions.values() for c in caps]
    todo = {i: [{"caption": c}] for i, c in enumerate(flat) if c}
    done = PTBTokenizer().tokenize(todo) if todo else {}
    if len(done) != len(todo):
        raise RuntimeError("the PTB tokenizer returned a different number of captions than it was given")
    tokens = iter([done[i][0] if i in done else "" for i in range(len(flat))])
    return {key: [next(tokens) for _ in caps] for key, caps in captions.items()}


# -- coco-caption scores -----------------------------------------------------------------------------------------
@dataclass
class CaptionScores:
    """Corpus-level `metrics`, `per_image` scores (id -> metric -> value), metrics that could not be computed
    (`unavailable`: metric -> reason), the `tokenizer` used ("ptb" or "python") and the scores of named `subsets`."""

    metrics: dict[str, float]
    per_image: dict[object, dict[str, float]]
    unavailable: dict[str, str] = field(default_factory=dict)
    tokenizer: str = PTB_TOKENIZER
    subsets: dict[str, CaptionScores] = field(default_factory=dict)


@functools.cache
def _meteor():
    # One METEOR JVM per process: starting it (loading its paraphrase table) costs seconds per call otherwise.
    from pycocoevalcap.meteor.meteor import Meteor

    return Meteor()


def _spice_problem() -> str | None:
    from pycocoevalcap.spice import get_stanford_models

    lib = Path(get_stanford_models.SPICEDIR) / get_stanford_models.SPICELIB
    jars = [lib / f"{get_stanford_models.JAR}{suffix}.jar" for suffix in ("", "-models")]
    missing = [j.name for j in jars if not j.is_file()]
    if not missing:
        return None
    return (
        f"SPICE needs Stanford CoreNLP ({', '.join(missing)} in {lib}), which pycocoevalcap downloads from the "
        "Stanford NLP site on first use; clipcap never downloads while scoring. On a machine with network run "
        "`python -c 'from pycocoevalcap.spice.get_stanford_models import get_stanford_models as g; g()'` once"
    )


def _tokenize(gts: dict, res: dict) -> tuple[dict, dict, str, str | None]:
    """(tokenized gts, tokenized res, tokenizer name, why Java cannot be used or None)."""
    java = java_problem()
    if java is None:
        try:
            return _ptb_tokenize(gts), _ptb_tokenize(res), PTB_TOKENIZER, None
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            java = f"the PTB tokenizer failed ({e})"
    gts = {i: [python_tokenize(c) for c in caps] for i, caps in gts.items()}
    res = {i: [python_tokenize(c) for c in caps] for i, caps in res.items()}
    return gts, res, PYTHON_TOKENIZER, java


def _score_tokenized(gts: dict, res: dict, tokenizer: str, java: str | None, spice: bool) -> CaptionScores:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    unavailable: dict[str, str] = {}
    if java is not None:
        for name in ("METEOR", "SPICE"):
            unavailable[name] = (
                f"{name} runs on Java: {java}. To compute METEOR and SPICE, and BLEU/ROUGE-L/CIDEr with "
                f"coco-caption's PTB tokenizer, {JAVA_HINT}"
            )
    ids = list(gts)
    per_image: dict[object, dict[str, float]] = {i: {} for i in ids}
    metrics: dict[str, float] = {}

    def record(name: str, corpus: float, values: Iterable[float]) -> None:
        metrics[name] = float(corpus)
        for i, v in zip(ids, values, strict=True):
            per_image[i][name] = float(v)

    bleu, bleu_per = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        record(f"BLEU-{n + 1}", bleu[n], bleu_per[n])
    if java is None:
        try:
            record("METEOR", *_meteor().compute_score(gts, res))
        except (OSError, ValueError) as e:
            _meteor.cache_clear()
            unavailable["METEOR"] = f"the METEOR jar failed ({e})"
    record("ROUGE-L", *Rouge().compute_score(gts, res))
    record("CIDEr", *Cider().compute_score(gts, res))
    if spice and "SPICE" not in unavailable:
        problem = _spice_problem()
        if problem is None:
            from pycocoevalcap.spice.spice import Spice

            try:
                corpus, values = Spice().compute_score(gts, res)
                record("SPICE", corpus, [v["All"]["f"] for v in values])
            except (OSError, ValueError, KeyError, subprocess.SubprocessError) as e:
                unavailable["SPICE"] = f"the SPICE jar failed ({e})"
        else:
            unavailable["SPICE"] = problem
    return CaptionScores(metrics, per_image, unavailable, tokenizer)


def compute_scores(
    predictions: Mapping[object, str],
    references: Mapping[object, list[str]],
    spice: bool = True,
    subsets: Mapping[str, Iterable] | None = None,
) -> CaptionScores:
    """coco-caption scores of `predictions` (id -> caption) against `references` (id -> captions), over the ids
    of `predictions`. Corpus-level: CIDEr-D's idf comes from these references, so a subset scores differently.
    `subsets` (name -> ids, e.g. nocaps domains) are also scored, each as its own corpus, into `.subsets`."""
    _require_pycocoevalcap()
    if not predictions:
        raise ClipCapError("nothing to score: no predictions")
    missing = [i for i in predictions if i not in references]
    if missing:
        raise ClipCapError(f"{len(missing)} predictions have no references, e.g. {missing[:3]}")
    empty = [i for i in predictions if not references[i]]
    if empty:
        raise ClipCapError(f"{len(empty)} images have an empty reference list, e.g. {empty[:3]}")
    bad = [i for i, c in predictions.items() if not isinstance(c, str)]
    if bad:
        raise ClipCapError(f"predictions must be one string per image; not so for {bad[:3]}")
    gts = {i: list(references[i]) for i in predictions}
    res = {i: [predictions[i]] for i in predictions}
    # Tokenize once (PTB handles each caption on its own line), then score the whole set and every subset.
    gts, res, tokenizer, java = _tokenize(gts, res)
    scores = _score_tokenized(gts, res, tokenizer, java, spice)
    for name, ids in (subsets or {}).items():
        ids = list(ids)
        sub_gts, sub_res = {i: gts[i] for i in ids}, {i: res[i] for i in ids}
        scores.subsets[name] = _score_tokenized(sub_gts, sub_res, tokenizer, java, spice)
    return scores


def score_captions(
    predictions: Mapping[object, str], references: Mapping[object, list[str]], spice: bool = True
) -> dict[str, float]:
    """coco-caption metrics {"BLEU-1".."BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE"} of `predictions`
    (id -> caption) against `references` (id -> captions); metrics that cannot run here are left out
    (`compute_scores` says why, and gives per-image values)."""
    return compute_scores(predictions, references, spice=spice).metrics


# -- CLIPScore ---------------------------------------------------------------------------------------------------
def _text_features(encoder, texts: list[str], batch_size: int, desc: str) -> torch.Tensor:
    chunks = [
        encoder.encode_text(texts[i : i + batch_size], batch_size=batch_size)
        for i in tqdm(range(0, len(texts), batch_size), desc=desc, unit="batch", leave=False, disable=None)
    ]
    return F.normalize(torch.cat(chunks).float(), dim=-1) if chunks else torch.empty(0)


def clip_score(
    captions: list[str],
    encoder,
    images: list | None = None,
    image_features: torch.Tensor | None = None,
    references: list[list[str]] | None = None,
    batch_size: int = 64,
) -> dict:
    """CLIPScore (and RefCLIPScore when `references` is given) of one caption per image, with `encoder` (an
    ImageEncoder, or an HF CLIP id/dir to load). Images come as `images` (PIL or paths) or precomputed
    `image_features` (N, dim) from the same CLIP. Returns {"CLIPScore": mean, "RefCLIPScore": mean,
    "per_image": {"CLIPScore": [...], "RefCLIPScore": [...]}}."""
    from .encoder import ImageEncoder

    if not isinstance(encoder, ImageEncoder):
        encoder = ImageEncoder.from_pretrained(encoder)
    if (images is None) == (image_features is None):
        raise ClipCapError("clip_score needs exactly one of images= or image_features=")
    if image_features is None:
        image_features = encoder.encode(images, batch_size=batch_size)
    if len(image_features) != len(captions):
        raise ClipCapError(f"{len(captions)} captions for {len(image_features)} images")
    if references is not None and len(references) != len(captions):
        raise ClipCapError(f"{len(captions)} captions but {len(references)} reference lists")
    image = F.normalize(image_features.float(), dim=-1).cpu()
    candidate = _text_features(encoder, [CLIPSCORE_PREFIX + c for c in captions], batch_size, "CLIPScore").cpu()
    per = CLIPSCORE_WEIGHT * (image * candidate).sum(-1).clamp(min=0)
    out = {"CLIPScore": float(per.mean()), "per_image": {"CLIPScore": per.tolist()}}
    if references is not None:
        owner = torch.tensor([i for i, refs in enumerate(references) for _ in refs], dtype=torch.long)
        flat = [CLIPSCORE_PREFIX + r for refs in references for r in refs]
        ref = _text_features(encoder, flat, batch_size, "RefCLIPScore").cpu()
        best = torch.full((len(captions),), -1.0).scatter_reduce(
            0, owner, (candidate[owner] * ref).sum(-1), reduce="amax"
        )
        best = best.clamp(min=0)
        total = per + best
        harmonic = torch.where(total > 0, 2 * per * best / total.clamp(min=1e-12), torch.zeros_like(total))
        out["RefCLIPScore"] = float(harmonic.mean())
        out["per_image"]["RefCLIPScore"] = harmonic.tolist()
    return out


# -- reading predictions and references --------------------------------------------------------------------------
def _read_json_or_jsonl(path: Path):
    if not path.is_file():
        raise ClipCapError(f"file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ClipCapError(f"{path} is not valid JSON ({e})") from None


def load_predictions(path: str | Path) -> tuple[dict[str, str], dict[str, str]]:
    """Predictions as (id -> caption, id -> image path where the file names one). Accepts the COCO results format
    `[{"image_id", "caption"}]`, `clipcap caption` JSONL (`{"image", "caption"}` per line) and `{id: caption}`."""
    path = Path(path)
    data = _read_json_or_jsonl(path)
    if isinstance(data, dict) and all(isinstance(v, str) for v in data.values()):
        return {str(k): v for k, v in data.items()}, {}
    if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
        raise ClipCapError(
            f"{path}: predictions must be a COCO results list [{{'image_id', 'caption'}}], JSONL rows "
            "{'image', 'caption'} or a JSON object {id: caption}"
        )
    captions: dict[str, str] = {}
    images: dict[str, str] = {}
    for n, row in enumerate(data, 1):
        key = next((row[k] for k in ("image_id", "key", "image") if row.get(k) is not None), None)
        caption = row.get("caption", row.get("captions"))
        if isinstance(caption, list) and len(caption) == 1:
            caption = caption[0]
        if key is None or not isinstance(caption, str):
            raise ClipCapError(f"{path}: entry {n} needs an image id ('image_id' or 'image') and one caption string")
        key = str(key)
        if key in captions:
            raise ClipCapError(f"{path}: image {key} has more than one prediction (entry {n})")
        captions[key] = caption
        if isinstance(row.get("image"), str):
            images[key] = row["image"]
    return captions, images


@dataclass
class _Item:
    """One image to score: its id, reference captions, nocaps domain (or None) and image location."""

    key: str
    references: list[str]
    domain: str | None = None
    image: str | None = None


def load_references(
    path: str | Path, format: str = "auto", images: str | Path | None = None, split: str | None = None
) -> list[_Item]:
    """Reference captions per image from `{id: [captions]}` JSON or any dataset source `read_source` reads (COCO
    and nocaps annotation files, Karpathy splits, JSONL, CSV, ...)."""
    path = Path(path)
    if path.suffix.lower() == ".json" and format == "auto":
        data = _read_json_or_jsonl(path)
        if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
            return [_Item(str(k), [str(c) for c in v]) for k, v in data.items()]
    from .data.sources import read_source

    return [
        _Item(r.key, list(r.captions), r.extra.get("domain"), r.image)
        for r in read_source(path, format=format, images=images, split=split)
    ]


def _aliases(item: _Item) -> set[str]:
    names = {item.key}
    if item.image:
        names |= {item.image, Path(item.image).name, Path(item.image).stem}
    return names


def _match(predictions: dict[str, str], pred_images: dict[str, str], items: list[_Item]) -> dict[str, _Item]:
    """Prediction id -> reference item: by id, else by image path, file name or stem (unambiguous ones only)."""
    by_name: dict[str, _Item | None] = {}
    for item in items:
        for name in _aliases(item):
            by_name[name] = item if by_name.get(name, item) is item else None
    matched: dict[str, _Item] = {}
    claimed: dict[str, str] = {}
    unmatched = []
    for key in predictions:
        image = pred_images.get(key, key)
        candidates = (key, image, Path(image).name, Path(image).stem)
        item = next((by_name[c] for c in candidates if by_name.get(c) is not None), None)
        if item is None:
            unmatched.append(key)
        elif item.key in claimed:
            raise ClipCapError(f"predictions {claimed[item.key]!r} and {key!r} are for the same image {item.key!r}")
        else:
            matched[key] = item
            claimed[item.key] = key
    if unmatched:
        raise ClipCapError(
            f"{len(unmatched)} of {len(predictions)} predictions match no reference image, e.g. {unmatched[:3]} "
            "(ids are matched by image id, then by image path, file name or file stem)"
        )
    return matched


# -- scoring a set of images, per nocaps domain --------------------------------------------------------------------
def _score(predictions: dict[str, str], items: dict[str, _Item], clip: dict[str, dict[str, float]], spice: bool):
    """Overall and per-domain scores, per-image rows. `clip` maps image id -> {"CLIPScore": .., ...} for the images
    CLIPScore could be computed on."""
    present = {items[k].domain for k in predictions} - {None}
    order = [d for d in NOCAPS_DOMAINS if d in present] + sorted(present - set(NOCAPS_DOMAINS))
    domains = {d: [k for k in predictions if items[k].domain == d] for d in order}
    references = {k: items[k].references for k in predictions}
    overall = compute_scores(predictions, references, spice=spice, subsets=domains)

    def with_clip(metrics: dict[str, float], keys: list[str]) -> dict:
        out = dict(metrics)
        for name in CLIP_METRICS:
            values = [clip[k][name] for k in keys if name in clip.get(k, {})]
            if values:
                out[name] = float(sum(values) / len(values))
        return {**out, "num_images": len(keys)}

    result = with_clip(overall.metrics, list(predictions))
    result["tokenizer"] = overall.tokenizer
    result["unavailable"] = dict(overall.unavailable)
    if domains:
        result["domains"] = {d: with_clip(overall.subsets[d].metrics, keys) for d, keys in domains.items()}
    rows = []
    for key, caption in predictions.items():
        row = {"image": key}
        if present:
            row["domain"] = items[key].domain or ""
        row.update(prediction=caption, references=items[key].references)
        scores = {**overall.per_image[key], **clip.get(key, {})}
        row.update((m, scores[m]) for m in ("CIDEr", "METEOR", "ROUGE-L", "SPICE", *CLIP_METRICS) if m in scores)
        rows.append(row)
    result["per_image"] = rows
    return result


def _encode_images(encoder, sources: list, open_image, batch_size: int, desc: str, token_grid=False):
    """CLIP features of the images that open; bad ones are skipped and reported. Streams, so memory holds one
    batch of pixels. Returns (features (n_ok, dim) on CPU, indices of the images kept, skipped [{image, reason}]).
    `token_grid` other than False: the features are (pooled (n_ok, dim), image tokens (n_ok, T, D)) instead, the
    patch grid pooled to that grid (None: every token)."""
    from .encoder import ImageLoadError

    feats, tokens, kept, skipped = [], [], [], []
    with tqdm(total=len(sources), desc=desc, unit="img", disable=None) as bar:
        for start in range(0, len(sources), batch_size):
            batch = []
            for i in range(start, min(start + batch_size, len(sources))):
                try:
                    batch.append(open_image(sources[i]))
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


def _clip_rows(encoder, keys, captions, features, references, batch_size) -> dict[str, dict[str, float]]:
    scores = clip_score(captions, encoder, image_features=features, references=references, batch_size=batch_size)
    per = scores["per_image"]
    return {k: {name: per[name][n] for name in per} for n, k in enumerate(keys)}


def _report_skipped(skipped: list[dict]) -> dict:
    if skipped:
        counts: dict[str, int] = {}
        for s in skipped:
            reason = s["reason"].split(" (", 1)[0]
            counts[reason] = counts.get(reason, 0) + 1
        summary = ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items()))
        print(f"skipped {len(skipped)} images: {summary} (listed under 'skipped' in metrics.json)", file=sys.stderr)
    return {"count": len(skipped), "items": skipped}


def _versions() -> dict:
    import transformers

    from . import __version__

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


# -- evaluating a model ------------------------------------------------------------------------------------------
def _is_store(data) -> bool:
    path = Path(data)
    return path.is_dir() and any((path / d).is_dir() for d in ("img_emb", "text_emb"))


def evaluate_model(
    model_dir: str | Path,
    data: str | Path,
    split: str | None = "test",
    format: str = "auto",
    images: str | Path | None = None,
    num_beams: int = 5,
    max_new_tokens: int = 67,
    length_penalty: float = 1.0,
    batch_size: int = 32,
    clip_model: str | None = None,
    clipscore: bool = True,
    spice: bool = True,
    limit: int | None = None,
    device: str | None = None,
) -> dict:
    """Caption the `split` of `data` (a dataset source, images encoded with the model's CLIP, or an embedding
    store dir, its embeddings captioned directly) with batched beam search (`num_beams=1`: greedy; scores divided
    by length**length_penalty, 1.0 = the paper's length normalisation), then score.
    Returns the metrics (overall, and per nocaps domain under "domains"), the decoding settings, timings, skipped
    images and "per_image" rows; `write_results` saves it, `format_table` renders it."""
    from .captioner import Captioner

    if num_beams < 1 or max_new_tokens < 1 or batch_size < 1:
        raise ClipCapError("num_beams, max_new_tokens and batch_size must be positive")
    _require_pycocoevalcap()  # fail before generating for minutes, not after
    start = time.perf_counter()
    captioner = Captioner.from_pretrained(model_dir, clip_model=clip_model, device=device, batch_size=batch_size)
    encoder = captioner.encoder
    tokens = captioner.model.config.token_shape  # a model that reads image tokens is given them
    skipped: list[dict] = []
    if _is_store(data):
        from .data.store import EmbeddingStore

        store = EmbeddingStore(data, split=split)
        if store.modality != "image":
            raise ClipCapError(f"{data} holds {store.modality} embeddings: evaluate on image embeddings or a source")
        if store.clip_dim != captioner.model.config.clip_dim:
            raise ClipCapError(
                f"{data} holds {store.clip_dim}-d embeddings but the model expects {captioner.model.config.clip_dim}"
            )
        count = min(store.num_images, limit) if limit is not None else store.num_images
        items = [
            _Item(store.keys[j], store.image_captions(j), store.extras[j].get("domain"), store.image_paths[j])
            for j in range(count)
        ]
        features = torch.from_numpy(store.image_embeddings(range(count)))
        inputs = features
        if tokens is not None:
            if [*(store.token_shape or ())] != tokens or store.token_grid != captioner.model.config.token_grid:
                raise ClipCapError(
                    f"{data} holds image tokens {store.token_shape} (grid {store.token_grid}) but the model reads "
                    f"{tuple(tokens)} (grid {captioner.model.config.token_grid})"
                )
            inputs = torch.from_numpy(store.image_tokens(range(count)))
    else:
        from .data.sources import open_record_image, read_source

        records = []
        for record in read_source(data, format=format, images=images, split=split):
            if limit is not None and len(records) == limit:
                break
            if record.captions:
                records.append(record)
            else:
                skipped.append({"image": record.image or record.key, "reason": "no reference captions"})
        grid = False if tokens is None else captioner.model.config.token_grid
        features, kept, bad = _encode_images(encoder, records, open_record_image, batch_size, "encoding images", grid)
        features, inputs = features if tokens is not None else (features, features)
        skipped += bad
        records = [records[i] for i in kept]
        items = [_Item(r.key, list(r.captions), r.extra.get("domain"), r.image) for r in records]
    if not items:
        raise ClipCapError(f"no images to evaluate in {data}" + (f" (split {split!r})" if split else ""))

    encoded = time.perf_counter()
    captions: list[str] = []
    with tqdm(total=len(items), desc="captioning", unit="img", disable=None) as bar:
        for i in range(0, len(items), batch_size):
            chunk = inputs[i : i + batch_size]
            captions += captioner.caption_embeddings(
                chunk, num_beams=num_beams, max_new_tokens=max_new_tokens, length_penalty=length_penalty
            )
            bar.update(len(chunk))
    generated = time.perf_counter()

    keys = [it.key for it in items]
    predictions = dict(zip(keys, captions, strict=True))
    by_key = {it.key: it for it in items}
    if len(by_key) != len(items):
        raise ClipCapError(f"{data} names some images twice (duplicate keys): evaluation needs one row per image")
    clip_reason = None
    if not clipscore:
        clip_reason = "turned off (--no-clipscore)"
    elif encoder.tokenizer is None:
        clip_reason = f"the encoder {encoder.name} has no tokenizer files, so its text tower cannot be used"
    references = [it.references for it in items]
    clip_rows = {} if clip_reason else _clip_rows(encoder, keys, captions, features, references, batch_size)
    result = _score(predictions, by_key, clip_rows, spice)
    if clip_reason:
        result["unavailable"].update({m: clip_reason for m in CLIP_METRICS})
    result["settings"] = {
        "model": str(model_dir),
        "data": str(data),
        "split": split,
        "limit": limit,
        "clip_model": encoder.name,
        "decoding": {
            "strategy": "greedy" if num_beams == 1 else "beam search",
            "num_beams": num_beams,
            "max_new_tokens": max_new_tokens,
            "do_sample": False,
            "length_penalty": length_penalty if num_beams > 1 else None,
            "stop_token_id": captioner.model.config.stop_token_id,
            "batch_size": batch_size,
        },
        "device": str(captioner.device),
        "dtype": str(next(captioner.model.parameters()).dtype).replace("torch.", ""),
        "versions": _versions(),
    }
    end = time.perf_counter()
    result["time"] = {
        "encoding_s": round(encoded - start, 3),
        "generation_s": round(generated - encoded, 3),
        "images_per_s": round(len(items) / max(generated - encoded, 1e-9), 2),
        "scoring_s": round(end - generated, 3),
        "total_s": round(end - start, 3),
    }
    result["skipped"] = _report_skipped(skipped)
    return result


# -- evaluating prediction files -----------------------------------------------------------------------------------
def _find_image(key: str, item: _Item, pred_image: str | None, root: Path | None) -> str | None:
    from .data.sources import IMAGE_EXTENSIONS

    candidates = [pred_image, item.image]
    if root is not None:
        candidates += [root / key, *(root / f"{key}{s}" for s in IMAGE_EXTENSIONS)]
    return next((str(c) for c in candidates if c and Path(c).is_file()), None)


def evaluate_predictions(
    predictions: str | Path,
    references: str | Path,
    format: str = "auto",
    images: str | Path | None = None,
    split: str | None = None,
    clip_model: str | None = None,
    clipscore: bool = True,
    spice: bool = True,
    batch_size: int = 64,
    device: str | None = None,
) -> dict:
    """Score a predictions file against a references file (formats: `load_predictions`, `load_references`).
    CLIPScore/RefCLIPScore need `clip_model` (HF CLIP id or dir) and the images: paths named in the predictions,
    the references' image files (under `images` for COCO/nocaps annotation files) or `images`/ID.jpg."""
    _require_pycocoevalcap()
    start = time.perf_counter()
    preds, pred_images = load_predictions(predictions)
    reference_items = load_references(references, format=format, images=images, split=split)
    matched = _match(preds, pred_images, reference_items)
    by_key = {item.key: item for item in matched.values()}
    captions = {matched[k].key: c for k, c in preds.items()}
    missing = sum(1 for it in reference_items if it.key not in by_key and it.references)
    if missing:
        print(
            f"note: {missing} reference images have no prediction; scoring the {len(captions)} that do", file=sys.stderr
        )

    skipped: list[dict] = []
    clip_rows: dict[str, dict[str, float]] = {}
    clip_reason = None
    if not clipscore:
        clip_reason = "turned off (--no-clipscore)"
    elif clip_model is None:
        clip_reason = "needs a CLIP model: pass --clip-model (and --images for the image files)"
    else:
        from .encoder import ImageEncoder, load_image

        keys, paths = [], []
        for pred_key, item in matched.items():
            path = _find_image(item.key, item, pred_images.get(pred_key), Path(images) if images else None)
            if path is None:
                skipped.append({"image": item.key, "reason": "image file not found"})
            else:
                keys.append(item.key)
                paths.append(path)
        if keys:
            encoder = ImageEncoder.from_pretrained(clip_model, device=device)
            features, kept, bad = _encode_images(encoder, paths, load_image, batch_size, "CLIP image features")
            skipped += bad
            keys = [keys[i] for i in kept]
            refs = [by_key[k].references for k in keys]
            clip_rows = _clip_rows(encoder, keys, [captions[k] for k in keys], features, refs, batch_size)
        if not clip_rows:
            clip_reason = "no image file could be found or opened (pass --images DIR)"
    result = _score(captions, by_key, clip_rows, spice)
    if clip_reason:
        result["unavailable"].update({m: clip_reason for m in CLIP_METRICS})
    elif len(clip_rows) < len(captions):
        result["clipscore_images"] = len(clip_rows)
    result["missing_predictions"] = missing
    result["settings"] = {
        "predictions": str(predictions),
        "references": str(references),
        "split": split,
        "clip_model": clip_model,
        "versions": _versions(),
    }
    result["time"] = {"total_s": round(time.perf_counter() - start, 3)}
    result["skipped"] = _report_skipped(skipped)
    return result


# -- output: metrics.json, per-image CSV, predictions, Markdown table -----------------------------------------------
def _coco_id(key: str):
    return int(key) if key.isdigit() else key


def write_results(result: dict, out: str | Path = "metrics.json") -> list[Path]:
    """Write `out` (metrics.json: everything but the per-image rows), OUT.csv (one row per image: prediction,
    references, per-image CIDEr, CLIPScore, ...) and, after generation, OUT.predictions.json (COCO results format,
    ready for `clipcap evaluate --predictions` or the nocaps server). Returns the paths written."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = result.get("per_image", [])
    metrics = {k: v for k, v in result.items() if k != "per_image"}
    out.write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    written = [out]
    table = out.with_suffix(".csv")
    columns = list(dict.fromkeys(c for row in rows for c in row))
    with open(table, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "references": json.dumps(row["references"], ensure_ascii=False)})
    written.append(table)
    if "model" in result.get("settings", {}):
        predictions = out.with_name(out.stem + ".predictions.json")
        results = [{"image_id": _coco_id(r["image"]), "caption": r["prediction"]} for r in rows]
        predictions.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
        written.append(predictions)
    return written


def format_table(result: dict) -> str:
    """The metrics as a Markdown table (×100, the coco-caption convention): one row overall, one per nocaps
    domain; notes below it say which tokenizer ran, what could not be computed and why, and the decoding used."""
    python_tok = result.get("tokenizer") == PYTHON_TOKENIZER
    unavailable = result.get("unavailable", {})
    names = [m for m in (*NGRAM_METRICS, *CLIP_METRICS) if m in result or m in unavailable]
    header = [
        f"{m}*" if python_tok and m in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr") else m
        for m in names
    ]
    rows = [("overall", result), *result.get("domains", {}).items()]
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
    settings = result.get("settings", {})
    decoding = settings.get("decoding")
    timing = result.get("time", {})
    if decoding:
        notes.append(
            f"Decoding: {decoding['strategy']} (num_beams={decoding['num_beams']}, max_new_tokens="
            f"{decoding['max_new_tokens']}); {result['num_images']} images captioned in {timing['generation_s']:.1f} s "
            f"({timing['images_per_s']:.1f} img/s); total {timing['total_s']:.1f} s."
        )
    if result.get("skipped", {}).get("count"):
        notes.append(f"Skipped {result['skipped']['count']} images (see metrics.json).")
    return "\n".join(lines + notes)


def evaluate(
    model: str | Path | None = None,
    data: str | Path | None = None,
    predictions: str | Path | None = None,
    references: str | Path | None = None,
    out: str | Path | None = "metrics.json",
    split: str | None = None,
    format: str = "auto",
    images: str | Path | None = None,
    clip_model: str | None = None,
    clipscore: bool = True,
    spice: bool = True,
    batch_size: int | None = None,
    device: str | None = None,
    num_beams: int | None = None,
    max_new_tokens: int | None = None,
    length_penalty: float | None = None,
    limit: int | None = None,
) -> dict:
    """`clipcap evaluate`: either `model` + `data` (generate, then score; `split` defaults to "test", "all" keeps
    every image) or `predictions` + `references`. Writes the results under `out` (see `write_results`) unless it
    is None, and returns them. Options left None take `evaluate_model` / `evaluate_predictions` defaults."""
    if (model is None) != (data is None) or (predictions is None) != (references is None):
        raise ClipCapError("--model needs --data, and --predictions needs --references")
    if (model is None) == (predictions is None):
        raise ClipCapError(
            "evaluate either a model (--model DIR --data SOURCE) or a file of predictions "
            "(--predictions P --references R), not both or neither"
        )
    if split is None and model is not None:
        split = "test"
    split = None if split == "all" else split
    common = {"format": format, "images": images, "clip_model": clip_model, "clipscore": clipscore, "spice": spice}
    common.update({k: v for k, v in {"batch_size": batch_size, "device": device}.items() if v is not None})
    generation = {
        "num_beams": num_beams,
        "max_new_tokens": max_new_tokens,
        "length_penalty": length_penalty,
        "limit": limit,
    }
    generation = {k: v for k, v in generation.items() if v is not None}
    if model is not None:
        result = evaluate_model(model, data, split=split, **common, **generation)
    elif generation:
        flags = ", ".join("--" + {"num_beams": "beams"}.get(k, k).replace("_", "-") for k in generation)
        raise ClipCapError(f"{flags} only apply when generating (--model DIR --data SOURCE)")
    else:
        result = evaluate_predictions(predictions, references, split=split, **common)
    if out is not None:
        for path in write_results(result, out):
            print(f"wrote {path}", file=sys.stderr)
    return result
