"""Caption metrics: the coco-caption reference scorer and CLIPScore / RefCLIPScore, as pure functions.

Numbers must be comparable with published ones, so the n-gram metrics are pycocoevalcap itself (coco-caption: the
Stanford PTB tokenizer, BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, SPICE), never a re-implementation. Its tokenizer, METEOR
and SPICE run on Java; without Java, BLEU, ROUGE-L and CIDEr are still computed, on `python_tokenize` output, and the
result says so. SPICE also needs Stanford CoreNLP jars that pycocoevalcap downloads on first use: when they are not
installed SPICE is reported unavailable with the reason (we never download while scoring, and never fake a number).

CLIPScore (Hessel et al. 2021) is 2.5 * max(cos(image, "A photo depicts " + caption), 0) with any HF CLIP-family
model; RefCLIPScore is the harmonic mean of it and max(max_r cos(caption, reference_r), 0).
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import DEVNULL
from unittest import mock

import torch
import torch.nn.functional as F

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
        raise ClipCapError("scoring needs pycocoevalcap: pip install 'clipcap-hf[eval]'") from None


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
    from pycocoevalcap.tokenizer import ptbtokenizer

    # PTB reads one caption per line: any line break inside a caption would shift every later caption.
    # Empty captions are kept out of its input for the same reason (they tokenize to "" anyway).
    flat = [" ".join(c.split()) for caps in captions.values() for c in caps]
    todo = {i: [{"caption": c}] for i, c in enumerate(flat) if c}
    # pycocoevalcap lets the Java tokenizer print its token rate on our stderr: give it a Popen that discards it.
    quiet = types.SimpleNamespace(PIPE=subprocess.PIPE, Popen=functools.partial(subprocess.Popen, stderr=DEVNULL))
    with mock.patch.object(ptbtokenizer, "subprocess", quiet):
        done = ptbtokenizer.PTBTokenizer().tokenize(todo) if todo else {}
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
def _text_features(encoder, texts: list[str], batch_size: int, desc: str, progress: bool) -> torch.Tensor:
    from tqdm.auto import tqdm

    starts = range(0, len(texts), batch_size)
    chunks = [
        encoder.encode_text(texts[i : i + batch_size], batch_size=batch_size)
        for i in tqdm(starts, desc=desc, unit="batch", leave=False, disable=not progress)
    ]
    return F.normalize(torch.cat(chunks).float(), dim=-1) if chunks else torch.empty(0)


def clip_score(
    captions: list[str],
    encoder,
    images: list | None = None,
    image_features: torch.Tensor | None = None,
    references: list[list[str]] | None = None,
    batch_size: int = 64,
    progress: bool = False,
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
    prompts = [CLIPSCORE_PREFIX + c for c in captions]
    candidate = _text_features(encoder, prompts, batch_size, "CLIPScore", progress).cpu()
    per = CLIPSCORE_WEIGHT * (image * candidate).sum(-1).clamp(min=0)
    out = {"CLIPScore": float(per.mean()), "per_image": {"CLIPScore": per.tolist()}}
    if references is not None:
        owner = torch.tensor([i for i, refs in enumerate(references) for _ in refs], dtype=torch.long)
        flat = [CLIPSCORE_PREFIX + r for refs in references for r in refs]
        ref = _text_features(encoder, flat, batch_size, "RefCLIPScore", progress).cpu()
        best = torch.full((len(captions),), -1.0).scatter_reduce(
            0, owner, (candidate[owner] * ref).sum(-1), reduce="amax"
        )
        best = best.clamp(min=0)
        total = per + best
        harmonic = torch.where(total > 0, 2 * per * best / total.clamp(min=1e-12), torch.zeros_like(total))
        out["RefCLIPScore"] = float(harmonic.mean())
        out["per_image"]["RefCLIPScore"] = harmonic.tolist()
    return out
