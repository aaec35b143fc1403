"""Quality filters and the dataset report of a captioning job (issue 29).

Per caption: `passed` (its CLIPScore reaches `min_clip_score`; always true without one) and `repeated_ngram` (the
first run of REPEAT_NGRAM words that occurs twice in it, a sign of a decoding loop). Per job: captions written,
the distinct-caption ratio, the most frequent captions, score quantiles and a collapse warning when the distinct
ratio falls below `collapse_threshold` (a model that ignores its images writes the same few captions for every
image), plus a histogram of `clip_score` as a PNG.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .errors import ClipCapError
from .options import option
from .rerank import RerankOptions

REPEAT_NGRAM = 4  # words: "a red circle a red circle" repeats, "a small red circle above a small red square" does not
COLLAPSE_THRESHOLD = 0.25  # below it the average caption is written more than four times
TOP_CAPTIONS = 10
QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)
HISTOGRAM = "clip_score_hist.png"
_WORD = re.compile(r"\w+(?:'\w+)?")


@dataclass(kw_only=True)
class ScoreFilterOptions(RerankOptions):
    """Candidates and reranking, plus what a captioning job does with low scores and how it reports."""

    min_clip_score: float | None = option(
        None,
        min=0.0,
        help="mark captions whose CLIPScore is below this as not passed (or leave them out, with `drop_below`)",
        default_text="none: every caption passes",
    )
    drop_below: bool = option(False, help="leave out captions below `min_clip_score` (counted in info.json)")
    collapse_threshold: float = option(
        COLLAPSE_THRESHOLD,
        min=0.0,
        help="warn of mode collapse when the share of distinct captions falls below this",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.drop_below and self.min_clip_score is None:
            raise ClipCapError("`drop_below` needs `min_clip_score`")
        if self.collapse_threshold > 1:
            raise ClipCapError(f"`collapse_threshold` is a share of captions (0 to 1), got {self.collapse_threshold}")

    @property
    def needs_clip(self) -> bool:
        """Whether the job cannot run without CLIPScore (reranking or a score filter)."""
        return self.rerank == "clip" or self.min_clip_score is not None


def repeated_ngram(caption: str, n: int = REPEAT_NGRAM) -> str | None:
    """The first run of `n` words that occurs twice in `caption` (case ignored), or None."""
    words = [w.lower() for w in _WORD.findall(caption)]
    seen = set()
    for i in range(len(words) - n + 1):
        gram = " ".join(words[i : i + n])
        if gram in seen:
            return gram
        seen.add(gram)
    return None


def passed(clip_score: float | None, minimum: float | None) -> bool:
    """Whether a caption's CLIPScore reaches `minimum` (True without one)."""
    return minimum is None or (clip_score is not None and clip_score >= minimum)


def _quantiles(values: list[float]) -> dict[str, float] | None:
    import numpy as np

    if not values:
        return None
    points = np.quantile(np.asarray(values, dtype=np.float64), QUANTILES)
    return {f"p{round(q * 100)}": round(float(v), 4) for q, v in zip(QUANTILES, points, strict=True)}


def dataset_report(
    captions: list[str],
    clip_scores: list[float | None],
    logprobs: list[float | None],
    repeated: list[str | None],
    passed_flags: list[bool],
    dropped: int,
    threshold: float = COLLAPSE_THRESHOLD,
    clip_unavailable: str | None = None,
) -> dict:
    """The report of the captions written (one per row; the kept one where a row has several)."""
    n = len(captions)
    counts = Counter(captions)
    distinct = len(counts) / n if n else None
    report = {
        "captions_written": n,
        "distinct_captions": len(counts),
        "distinct_ratio": round(distinct, 4) if distinct is not None else None,
        "top_captions": [{"caption": c, "count": k} for c, k in counts.most_common(TOP_CAPTIONS)],
        "clip_score_quantiles": _quantiles([s for s in clip_scores if s is not None]),
        "logprob_quantiles": _quantiles([s for s in logprobs if s is not None]),
        "repeated_ngram_captions": sum(r is not None for r in repeated),
        "not_passed": sum(not p for p in passed_flags),
        "dropped_below_min_clip_score": dropped,
        "collapse_threshold": threshold,
        "collapse_warning": None,
    }
    if clip_unavailable:
        report["clip_score_unavailable"] = clip_unavailable
    if distinct is not None and distinct < threshold:
        top, count = counts.most_common(1)[0]
        report["collapse_warning"] = (
            f"only {len(counts)} distinct captions among {n} ({distinct:.1%}, below the collapse threshold "
            f"{threshold:.0%}); the most frequent, {top!r}, is written {count} times: the model may ignore its images"
        )
    return report


def write_histogram(clip_scores: list[float], path: Path) -> Path | None:
    """A histogram of the CLIPScores as a PNG at `path` (written atomically); None when there is no score."""
    from .data.store import replace_atomically

    if not clip_scores:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ClipCapError("the clip_score histogram needs matplotlib: pip install 'clipcap-hf[train]'") from None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(clip_scores, bins=max(10, min(50, int(math.sqrt(len(clip_scores))) + 1)), color="#4a7bd0")
    ax.set_xlabel("clip_score (CLIPScore)")
    ax.set_ylabel("captions")
    ax.set_title(f"CLIPScore of {len(clip_scores)} captions")
    fig.tight_layout()
    replace_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return path


def report_line(report: dict) -> str:
    """The report in one line of text."""
    ratio = report["distinct_ratio"]
    distinct = f", {ratio:.1%} distinct" if ratio is not None else ""
    parts = [f"{report['captions_written']} captions written{distinct}"]
    q = report["clip_score_quantiles"]
    if q:
        parts.append(f"clip_score p5/p50/p95 {q['p5']:.3f}/{q['p50']:.3f}/{q['p95']:.3f}")
    if report["not_passed"] or report["dropped_below_min_clip_score"]:
        kept, left = report["not_passed"], report["dropped_below_min_clip_score"]
        parts.append(f"below the minimum clip_score: {kept} kept, {left} left out")
    if report["repeated_ngram_captions"]:
        parts.append(f"{report['repeated_ngram_captions']} with a repeated {REPEAT_NGRAM}-gram")
    top = "; ".join(f"{t['caption']!r} x{t['count']}" for t in report["top_captions"])
    parts.append(f"most frequent: {top}")
    if report["collapse_warning"]:
        parts.insert(0, f"WARNING: mode collapse: {report['collapse_warning']}")
    return " | ".join(parts)
