"""Caption decoding from a prefix: our generation settings over any LM's own `generate`, and the stop/pad rule.

Shared by ClipCapModel (PyTorch LM) and ExportedModel (ONNX Runtime LM behind a GenerationMixin wrapper), so both
decode with exactly the same settings.
"""

from __future__ import annotations

import contextlib
import difflib
import logging

import torch
from transformers import GenerationConfig

from .errors import ClipCapError
from .limits import check_decoding, context_length

FROM_CONFIG = object()  # sentinel for stop_token_id: "use config.stop_token_id"


class _NoUnpaddedNotice(logging.Filter):
    """transformers 5 drops an all-ones attention mask before decoding; GPT-2 then advises passing a mask whenever a
    finished row feeds back its pad (= stop) id. Nothing is padded there and no user can act on it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "passing in an `attention_mask`" not in record.getMessage()


@contextlib.contextmanager
def _unpadded_notice_hidden():
    logger, notice = logging.getLogger("transformers.modeling_utils"), _NoUnpaddedNotice()
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


def pad_token_id(pad: int | None, lm_config) -> int:
    """The pad id: ours (`ClipCapConfig.pad_token_id`), else the LM's pad id, else its eos id, else 0."""
    for value in (pad, lm_config.pad_token_id, lm_config.eos_token_id):
        if isinstance(value, int):
            return value
    return 0


def check_generate_options(options) -> None:
    """Refuse a decoding option `generate` does not know (a typo such as `num_beam` would otherwise be kept on the
    GenerationConfig and do nothing): one error naming it, the closest known names, and where the list is."""
    known = GenerationConfig().to_dict()
    unknown = [name for name in options if name not in known]
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "e.g. num_beams, max_new_tokens, temperature, top_p"
        raise ClipCapError(
            f"unknown decoding option {', '.join(unknown)}: {hint} (decoding options are transformers' "
            "GenerationConfig fields)"
        )


@torch.no_grad()
def generate_from_prefix(
    lm,
    prefix: torch.Tensor,
    stop: int | None,
    pad: int,
    max_new_tokens: int = 67,
    num_beams: int = 1,
    do_sample: bool = False,
    num_return_sequences: int = 1,
    attention_mask: torch.Tensor | None = None,
    **generate_kwargs,
) -> torch.LongTensor:
    """Caption token ids (B*num_return_sequences, T_new) continuing `prefix` (B, T, hidden) with `lm.generate`:
    new tokens only, rows padded with `pad` after their `stop` token (`stop=None`: never stop). `attention_mask`
    (B, T) marks left padding in a prefix followed by prompts of different lengths. Settings outside
    `limits` (beams, sequences, tokens, the prefix and new tokens past the LM's context) are one ClipCapError
    before anything is generated."""
    check_generate_options(generate_kwargs)
    check_decoding(
        num_beams=num_beams,
        max_new_tokens=max_new_tokens,
        num_return_sequences=num_return_sequences,
        do_sample=do_sample,
        temperature=generate_kwargs.get("temperature"),
        top_p=generate_kwargs.get("top_p"),
        repetition_penalty=generate_kwargs.get("repetition_penalty"),
        context=context_length(lm.config),
        prefix_tokens=prefix.shape[1],
        candidates=True,  # the widest bound: this is also how candidate lists are generated
    )
    mask = attention_mask
    if mask is None:
        mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
    # A fresh GenerationConfig: the LM's own defaults (GPT-2's eos 50256, a chat LM's sampling or repetition
    # settings) must not change our decoding. generate() fills every field left None from the LM's
    # generation_config, so every field starts at transformers' global default, and "never stop" is not None
    # but an id one past the vocabulary, which the LM can never emit.
    never = lm.config.get_text_config().vocab_size
    ours = dict(
        generate_kwargs,  # what a caller (a pipeline, sampling options) adds; the fields below are ours
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        do_sample=do_sample,
        num_return_sequences=num_return_sequences,
        eos_token_id=never if stop is None else stop,
        pad_token_id=pad,
        bos_token_id=None,
        return_dict_in_generate=False,
    )
    defaults = GenerationConfig._get_default_generation_params()
    defaults.pop("max_length")  # max_new_tokens decides; both set makes transformers warn
    generation_config = GenerationConfig(**{**defaults, **ours})
    with _unpadded_notice_hidden():
        ids = lm.generate(inputs_embeds=prefix, attention_mask=mask, generation_config=generation_config)
    if stop is None:
        return ids
    # Beam search pads finished rows with the eos id when the pad id is 0; enforce the pad id after each stop.
    is_stop = (ids == stop).long()
    return ids.masked_fill(is_stop.cumsum(1) - is_stop > 0, pad)
