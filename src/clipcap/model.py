"""ClipCapModel: a mapping network in front of any HF causal LM.

The mapper turns a CLIP embedding into k prefix vectors in the LM's embedding space; the LM continues the prefix
with the caption. The LM may be fine-tuned (`tune_lm=True`, the paper's MLP variant) or frozen (the Transformer
variant): a frozen LM gets no gradients and no optimizer state, but gradients still flow through it into the mapper.

A model dir holds config.json (with the LM's own config, so nothing is fetched to rebuild it) and
model.safetensors. By default the LM weights are saved too, so the dir is self-contained; a frozen LM may instead be
saved by reference (`save_pretrained(..., save_lm=False)`), and is then loaded from `config.lm` again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
from transformers.utils import ModelOutput

from .config import CONFIG_NAME, ClipCapConfig
from .errors import ClipCapError
from .hub import load_causal_lm, resolve_dir
from .mapping import MLPMapper, TokenTransformerMapper, TransformerMapper

WEIGHTS_NAME = "model.safetensors"
IGNORE_INDEX = -100
_FROM_CONFIG = object()  # sentinel: "use config.stop_token_id"


@dataclass
class ClipCapOutput(ModelOutput):
    """loss (when labels are given), logits (B, k+T, V) and the prefix (B, k, hidden)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    prefix: torch.Tensor | None = None


def build_mapper(config: ClipCapConfig, lm_hidden: int) -> nn.Module:
    if config.mapping == "mlp":
        return MLPMapper(config.clip_dim, lm_hidden, config.prefix_length)
    if config.token_shape is not None:
        num_tokens, token_dim = config.token_shape
        return TokenTransformerMapper(
            token_dim,
            num_tokens,
            lm_hidden,
            config.prefix_length,
            num_layers=config.num_layers,
            num_heads=config.num_heads,
        )
    return TransformerMapper(
        config.clip_dim,
        lm_hidden,
        config.prefix_length,
        config.clip_length,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
    )


def lm_from_config(lm_config: dict, dtype: torch.dtype | None = None) -> nn.Module:
    """Build an LM with random weights from its saved config dict (no network, no weight download)."""
    data = dict(lm_config)
    config = AutoConfig.for_model(data.pop("model_type"), **data)
    return AutoModelForCausalLM.from_config(config).to(dtype)


class ClipCapModel(nn.Module):
    """Mapper + causal LM. `ClipCapModel(config)` loads the pretrained LM named by `config.lm`;
    pass `lm=` to use an LM object you already have."""

    def __init__(self, config: ClipCapConfig, lm: nn.Module | None = None):
        super().__init__()
        self.config = config
        self.lm = lm if lm is not None else load_causal_lm(config.lm)
        embeddings = self.lm.get_input_embeddings()
        self.lm_hidden = embeddings.embedding_dim
        config.lm_config = self.lm.config.to_dict()
        self.mapper = build_mapper(config, self.lm_hidden).to(embeddings.weight.dtype)
        if not config.tune_lm:
            self.lm.requires_grad_(False)
            self.lm.eval()

    # -- forward -----------------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> ClipCapModel:
        super().train(mode)
        if not self.config.tune_lm:
            self.lm.eval()  # a frozen LM keeps dropout off, as in the original ClipCaptionPrefix
        return self

    def prefix(self, clip_embeds: torch.Tensor) -> torch.Tensor:
        """Map CLIP embeddings (B, clip_dim) to prefix embeddings (B, k, lm_hidden), or image tokens (B, T, D) when
        config.token_shape is set to (B, T + k, lm_hidden)."""
        tokens = self.config.token_shape
        expected = tuple(tokens) if tokens is not None else (self.config.clip_dim,)
        if tuple(clip_embeds.shape[1:]) != expected:
            what = "image tokens" if tokens is not None else "CLIP embeddings"
            raise ClipCapError(
                f"this model reads {what} of shape (B, {', '.join(map(str, expected))}), got {tuple(clip_embeds.shape)}"
            )
        param = next(self.mapper.parameters())
        x = clip_embeds.to(device=param.device, dtype=param.dtype)
        if self.config.normalize_prefix:
            x = F.normalize(x, dim=-1)
        return self.mapper(x)

    def forward(
        self,
        clip_embeds: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> ClipCapOutput:
        """Logits over prefix + caption. `labels` (B, T) are token ids, -100 where ignored; padding positions
        (attention_mask == 0) and the k prefix positions never count in the loss."""
        prefix = self.prefix(clip_embeds)
        tokens = self.lm.get_input_embeddings()(input_ids)
        embeds = torch.cat((prefix.to(tokens.dtype), tokens), dim=1)
        b, k = prefix.shape[:2]
        mask = None
        if attention_mask is not None:
            mask = torch.cat((attention_mask.new_ones(b, k), attention_mask), dim=1)
        full_labels = None
        if labels is not None:
            if attention_mask is not None:
                labels = labels.masked_fill(attention_mask == 0, IGNORE_INDEX)
            full_labels = torch.cat((labels.new_full((b, k), IGNORE_INDEX), labels), dim=1)
        out = self.lm(inputs_embeds=embeds, attention_mask=mask, labels=full_labels)
        return ClipCapOutput(loss=out.loss, logits=out.logits, prefix=prefix)

    # -- generation --------------------------------------------------------------------------------------------
    @property
    def pad_token_id(self) -> int:
        for value in (self.config.pad_token_id, self.lm.config.pad_token_id, self.lm.config.eos_token_id):
            if isinstance(value, int):
                return value
        return 0

    @torch.no_grad()
    def generate(
        self,
        clip_embeds: torch.Tensor,
        max_new_tokens: int = 67,
        num_beams: int = 1,
        do_sample: bool = False,
        num_return_sequences: int = 1,
        stop_token_id=_FROM_CONFIG,
        **generate_kwargs,
    ) -> torch.LongTensor:
        """Caption token ids (B*num_return_sequences, T_new): new tokens only, rows padded with the pad id after
        their stop token. The prefix is built once; decoding (KV cache, beams, sampling) is the LM's own
        `generate`. `stop_token_id=None` disables stopping; extra kwargs (temperature, top_p, ...) go to it."""
        stop = self.config.stop_token_id if stop_token_id is _FROM_CONFIG else stop_token_id
        prefix = self.prefix(clip_embeds).to(self.lm.get_input_embeddings().weight.dtype)
        mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
        # A fresh GenerationConfig: the LM's own defaults (GPT-2's eos 50256, a chat LM's sampling or repetition
        # settings) must not change our decoding. generate() fills every field left None from the LM's
        # generation_config, so every field starts at transformers' global default, and "never stop" is not None
        # but an id one past the vocabulary, which the LM can never emit.
        never = self.lm.config.get_text_config().vocab_size
        pad = self.pad_token_id
        ours = dict(
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            do_sample=do_sample,
            num_return_sequences=num_return_sequences,
            eos_token_id=never if stop is None else stop,
            pad_token_id=pad,
            bos_token_id=None,
            **generate_kwargs,
        )
        defaults = GenerationConfig._get_default_generation_params()
        defaults.pop("max_length")  # max_new_tokens decides; both set makes transformers warn
        generation_config = GenerationConfig(**{**defaults, **ours})
        ids = self.lm.generate(inputs_embeds=prefix, attention_mask=mask, generation_config=generation_config)
        if stop is None:
            return ids
        # Beam search pads finished rows with the eos id when the pad id is 0; enforce the pad id after each stop.
        is_stop = (ids == stop).long()
        return ids.masked_fill(is_stop.cumsum(1) - is_stop > 0, pad)

    # -- persistence -------------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, save_lm: bool = True) -> None:
        """Write config.json + model.safetensors. `save_lm=False` (frozen LM only) keeps just the mapper and
        refers to the LM by `config.lm`."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(path)
        if save_lm:
            save_model(self, str(path / WEIGHTS_NAME))  # handles tied weights (lm_head = wte)
        elif self.config.tune_lm:
            raise ClipCapError("save_lm=False is only for a frozen LM: a tuned LM's weights must be saved")
        else:
            state = {f"mapper.{k}": v.contiguous() for k, v in self.mapper.state_dict().items()}
            save_file(state, str(path / WEIGHTS_NAME))

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> ClipCapModel:
        """Load a model dir (or an HF Hub repo holding one)."""
        path = resolve_dir(name_or_path)
        if not (path / CONFIG_NAME).is_file():
            raise ClipCapError(f"{path} is not a ClipCap model dir (no {CONFIG_NAME})")
        config = ClipCapConfig.from_pretrained(path)
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            raise ClipCapError(f"{path} has no {WEIGHTS_NAME}")
        try:
            with safe_open(str(weights), framework="pt") as f:
                keys = list(f.keys())
                saved_dtype = f.get_tensor(keys[0]).dtype if keys else None
        except (SafetensorError, OSError) as e:
            raise ClipCapError(f"{weights} is not a readable safetensors file: {e}") from None
        if any(k.startswith("lm.") for k in keys):
            if config.lm_config is None:
                raise ClipCapError(f"{path / CONFIG_NAME} has no lm_config to rebuild the language model")
            model = cls(config, lm=lm_from_config(config.lm_config, saved_dtype))
            missing, unexpected = load_model(model, str(weights), strict=False)
        else:
            model = cls(config)  # LM saved by reference: load it from config.lm
            state = {k.removeprefix("mapper."): v for k, v in load_file(str(weights)).items()}
            missing, unexpected = model.mapper.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ClipCapError(
                f"{weights} does not match config.json: missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]}"
            )
        if device is not None or dtype is not None:
            model.to(device=device, dtype=dtype)
        return model.eval()
