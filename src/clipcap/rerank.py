"""Several candidate captions per image, their quality scores and CLIP reranking (issue 29).

The candidates of a batch come from ONE `generate` call (`num_return_sequences=N`: beam search's N best, or N
samples). Every caption is scored twice:
- `clip_score`: CLIPScore with the model's own CLIP-family encoder, computed by `metrics.clip_score` (the function
  `evaluate` reports), the image side being the embedding the caption was generated from;
- `logprob`: the mean log-probability of its generated tokens (the stop token included) under the model, from one
  batched forward pass over (prefix, prompt, caption).
`rerank="clip"` keeps the candidate with the highest `clip_score + rerank_weight * logprob` (ties keep the search's
order); `rerank="none"` keeps the search's best (or the first sample).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .errors import ClipCapError
from .limits import MAX_CANDIDATES, images_per_run
from .options import check_options, option

RERANKERS = ("none", "clip")
LOGPROB_ROWS = 64  # rows per forward pass for the log-probability: (rows, length, vocabulary) logits in memory


@dataclass(kw_only=True)
class RerankOptions:
    """How many candidate captions each image gets and how the kept one is chosen."""

    candidates: int | None = option(
        None,
        min=1,
        help=f"candidate captions per image (at most {MAX_CANDIDATES}), generated together: the search's N best "
        "(the beam width is N unless set; it must be at least N) or N samples; the others are kept as runners-up",
        default_text="none: one caption",
    )
    rerank: str = option(
        "none",
        choices=RERANKERS,
        help="which candidate is kept: none (the search's best, or the first sample) or clip (the highest CLIPScore "
        "of the caption against the image embedding, with the model's own CLIP text tower)",
    )
    rerank_weight: float = option(
        0.0,
        help="with clip reranking, rank by CLIPScore + F x the mean token log-probability (0: CLIPScore alone)",
    )

    def __post_init__(self) -> None:
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        else:
            check_options(self)
        check_rerank(self.candidates, self.rerank, self.rerank_weight)


def check_rerank(candidates: int | None, rerank: str, weight: float) -> None:
    """Refuse candidate and rerank settings that cannot work, whatever the model."""
    if candidates is not None and (not isinstance(candidates, int) or isinstance(candidates, bool) or candidates < 1):
        raise ClipCapError(f"`candidates` must be a whole number of at least 1, got {candidates!r}")
    if rerank not in RERANKERS:
        raise ClipCapError(f"`rerank` must be one of {', '.join(RERANKERS)}, got {rerank!r}")
    if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight):
        raise ClipCapError(f"`rerank_weight` must be a finite number, got {weight!r}")
    if candidates is not None and candidates > MAX_CANDIDATES:
        raise ClipCapError(f"`candidates` must be at most {MAX_CANDIDATES}, got {candidates}")
    if rerank != "none" and (candidates is None or candidates < 2):
        raise ClipCapError(f"`rerank` {rerank} chooses among candidates: set `candidates` to 2 or more")
    if weight != 0 and rerank == "none":
        raise ClipCapError("`rerank_weight` only applies with `rerank` clip")


def candidate_decoding(decoding: dict, candidates: int | None, beams_given: bool) -> dict:
    """The decoding settings for `candidates` per image: beam search gets `num_beams` = N unless a width was given,
    which must then be at least N; sampling keeps its settings."""
    if candidates is None:
        return decoding
    if decoding.get("do_sample"):
        return decoding
    if not beams_given:
        return {**decoding, "num_beams": max(candidates, decoding["num_beams"])}
    if decoding["num_beams"] < candidates:
        raise ClipCapError(
            f"{candidates} candidates per image need at least {candidates} beams (`num_beams` is "
            f"{decoding['num_beams']}) or sampling (`do_sample`)"
        )
    return decoding


@dataclass
class Candidate:
    """One candidate caption and its scores (None where the score cannot be computed)."""

    caption: str
    clip_score: float | None
    logprob: float | None

    def to_dict(self) -> dict:
        return {"caption": self.caption, "clip_score": self.clip_score, "logprob": self.logprob}


@dataclass
class Scored:
    """The kept caption of one image, its scores and the other candidates (best first)."""

    caption: str
    clip_score: float | None
    logprob: float | None
    runners_up: list[Candidate] = field(default_factory=list)

    @property
    def candidates(self) -> list[Candidate]:
        """Every candidate, the kept one first."""
        return [Candidate(self.caption, self.clip_score, self.logprob), *self.runners_up]


def text_tower_problem(encoder) -> str | None:
    """Why `encoder` cannot give CLIPScore (no text tower or no tokenizer), or None."""
    if encoder is None:
        return "no CLIP encoder is loaded"
    if not hasattr(encoder.model, "get_text_features"):
        return f"the encoder {encoder.name} has no text tower (a {type(encoder.model).__name__})"
    if encoder.tokenizer is None:
        return f"the encoder {encoder.name} has no tokenizer files, so its text tower cannot be used"
    return None


def clip_scores(encoder, captions: list[str], image_features: torch.Tensor, batch_size: int = 64) -> list[float]:
    """CLIPScore of each caption against its row of `image_features`, exactly as `evaluate` computes it."""
    from .metrics import clip_score

    if not captions:
        return []
    return clip_score(captions, encoder, image_features=image_features, batch_size=batch_size)["per_image"]["CLIPScore"]


@torch.no_grad()
def mean_logprobs(model, inputs: torch.Tensor, ids: torch.Tensor, prompt_ids: list[int], stop: int | None) -> list:
    """Mean log-probability of each row of generated `ids` (R, T), cut after its `stop` token, under `model` given
    `inputs` (R rows: the mapper's input of each row) and the prompt; None per row for a model without a
    PyTorch forward pass (an exported model)."""
    if not isinstance(model, torch.nn.Module):
        return [None] * len(ids)
    ids = ids.cpu()
    lengths = []
    for row in ids.tolist():
        lengths.append(row.index(stop) + 1 if stop is not None and stop in row else len(row))
    p = len(prompt_ids)
    full = torch.cat((torch.tensor([prompt_ids] * len(ids), dtype=torch.long).reshape(len(ids), p), ids), dim=1)
    mask = (torch.arange(full.shape[1]) < (p + torch.tensor(lengths)).unsqueeze(1)).long()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(ids), LOGPROB_ROWS):
        chunk, chunk_mask = full[i : i + LOGPROB_ROWS].to(device), mask[i : i + LOGPROB_ROWS].to(device)
        result = model(inputs[i : i + LOGPROB_ROWS].to(device), chunk, attention_mask=chunk_mask)
        k = result.prefix.shape[1]
        # The logits at position j predict token j + 1: the caption's tokens are predicted from k + p - 1 on.
        logits = result.logits[:, k + p - 1 : -1].float()
        targets = chunk[:, p:]
        token = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        counted = chunk_mask[:, p:].float()
        means = (token * counted).sum(1) / counted.sum(1).clamp(min=1)
        out.extend(means.tolist())
    return out


def choose(candidates: list[Candidate], rerank: str, weight: float = 0.0) -> Scored:
    """Order one image's candidates (the search's order for `rerank="none"`, else by CLIPScore + weight x logprob,
    ties kept in the search's order) and keep the first."""
    if rerank == "clip":
        if any(c.clip_score is None for c in candidates) or (weight and any(c.logprob is None for c in candidates)):
            raise ClipCapError("reranking needs every candidate's scores")
        candidates = sorted(candidates, key=lambda c: -(c.clip_score + weight * (c.logprob if weight else 0.0)))
    best, *rest = candidates
    return Scored(best.caption, best.clip_score, best.logprob, rest)


def score_embeddings(
    captioner,
    inputs: torch.Tensor,
    image_features: torch.Tensor | None,
    decoding: dict,
    candidates: int = 1,
    rerank: str = "none",
    rerank_weight: float = 0.0,
    keep_order: bool = False,
) -> list[Scored]:
    """Captions of one batch of mapper inputs (B, ...) with their scores: `candidates` per image from one
    `generate` call, each scored (CLIPScore against `image_features` (B, dim), None when that is None or the
    encoder has no text tower; mean token log-probability), the kept one chosen by `rerank`. `decoding` is what
    `Captioner.decoding` gives (its `prompt` included). `keep_order` leaves the candidates in the search's
    order whatever `rerank` (for several captions per image)."""
    step = images_per_run(len(inputs), decoding["num_beams"], candidates)
    if step < len(inputs):  # generate runs of at most limits.MAX_SEQUENCES sequences, as `caption_with` makes them
        return [
            scored
            for i in range(0, len(inputs), step)
            for scored in score_embeddings(
                captioner,
                inputs[i : i + step],
                None if image_features is None else image_features[i : i + step],
                decoding,
                candidates,
                rerank,
                rerank_weight,
                keep_order,
            )
        ]
    if rerank == "clip":
        problem = "no image embeddings to score against" if image_features is None else None
        problem = problem or text_tower_problem(captioner.encoder)
        if problem:
            raise ClipCapError(f"CLIP reranking needs the text tower of the model's encoder: {problem}")
    decoding = dict(decoding)
    prompt = decoding.pop("prompt", None)
    tokenizer, model = captioner.tokenizer, captioner.model
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    device = captioner.device
    inputs = inputs.to(device)
    prompts = torch.tensor([prompt_ids] * len(inputs), dtype=torch.long) if prompt_ids else None
    ids = model.generate(inputs, num_return_sequences=candidates, input_ids=prompts, **decoding)
    texts = captioner.decode(ids, prompt_ids)
    rows = inputs.repeat_interleave(candidates, dim=0)
    logprobs = mean_logprobs(model, rows, ids, prompt_ids, model.config.stop_token_id)
    scores: list = [None] * len(texts)
    if image_features is not None and text_tower_problem(captioner.encoder) is None:
        features = image_features.repeat_interleave(candidates, dim=0)
        scores = clip_scores(captioner.encoder, texts, features, batch_size=max(64, len(texts)))
    out = []
    for i in range(len(inputs)):
        span = range(i * candidates, (i + 1) * candidates)
        found = [Candidate(texts[j], scores[j], logprobs[j]) for j in span]
        out.append(choose(found, "none" if keep_order else rerank, rerank_weight))
    return out


def image_inputs(captioner, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(what the mapper reads, the pooled image embedding CLIPScore compares with) for preprocessed images, from
    one pass of the vision tower."""
    config = captioner.model.config
    if config.token_shape is None:
        features = captioner.model_inputs(pixel_values)
        return features, features
    pooled, tokens = captioner.encoder.encode_pixels_and_tokens(pixel_values, config.token_grid)
    return tokens, pooled


def caption_images(
    captioner,
    images,
    candidates: int | None = None,
    rerank: str = "none",
    rerank_weight: float = 0.0,
    num_beams: int | None = None,
    max_new_tokens: int | None = None,
    prompt: str | None = None,
    **generate_options,
) -> list[Scored]:
    """`Captioner.caption` with candidates and scores: one `Scored` per image (PIL images or paths)."""
    from .images import open_image

    check_rerank(candidates, rerank, rerank_weight)
    # checked like any caption's settings, before the first image is opened
    decoding = captioner.decoding(None, 1, num_beams, max_new_tokens, prompt=prompt, **generate_options)
    decoding = candidate_decoding(decoding, candidates, beams_given=num_beams is not None)
    out: list[Scored] = []
    for i in range(0, len(images), captioner.batch_size):
        chunk = [open_image(im) for im in images[i : i + captioner.batch_size]]
        inputs, features = image_inputs(captioner, captioner.encoder.preprocess(chunk))
        out += score_embeddings(captioner, inputs, features, decoding, candidates or 1, rerank, rerank_weight)
    return out
