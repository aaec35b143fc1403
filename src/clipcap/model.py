"""ClipCap's transformers model classes.

`ClipCapModel`: a mapping network in front of any HF causal LM. The mapper turns a CLIP embedding into k prefix
vectors in the LM's embedding space; the LM continues the prefix (and an optional prompt) with the caption. The LM
may be fine-tuned (`tune_lm=True`, the paper's MLP variant) or frozen (the Transformer variant): a frozen LM gets no
gradients and no optimizer state, but gradients still flow through it into the mapper.

`ClipCapForImageCaptioning`: the complete image-to-text model, the CLIP vision tower + projection in front of a
ClipCapModel. It takes `pixel_values`, generates with the decoding defaults of its `generation_config.json`, and is
what `pipeline("image-text-to-text")` runs.

Both are `PreTrainedModel`s: saving and loading (safetensors, shards, `revision`, `token`, `dtype`, `device_map`,
`push_to_hub`) are transformers'. A model dir holds config.json (with the LM's config as `text_config`, so nothing
is fetched to rebuild it) and the weights. A frozen LM may be saved by reference (`save_pretrained(dir,
save_lm=False)`): the weights then hold only the mapper and the LM is loaded from `config.lm` again (a dir relative
to the model dir, or an HF id). Before transformers reads a local dir, its config and the tensor shapes in its
weight files are checked against each other on the meta device, so a mismatch is one ClipCapError, never a
size-mismatch traceback or an allocation the config asked for.

This file is copied into every saved model dir so that `trust_remote_code=True` loads it with only transformers
installed: it imports nothing from clipcap by name.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput

from .config import CONFIG_NAME, ClipCapConfig
from .errors import ClipCapError
from .generation import FROM_CONFIG, generate_from_prefix, pad_token_id
from .hub import load_causal_lm, looks_like_path, offline_hint, resolve_model_dir_name, transformers_quiet
from .mapping import MLPMapper, TokenMLPMapper, TokenTransformerMapper, TransformerMapper, pool_tokens

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
IGNORE_INDEX = -100
MAX_NEW_TOKENS = 67  # the original's caption length limit


@dataclass
class ClipCapOutput(ModelOutput):
    """loss (when labels are given), logits (B, k+T, V) and the prefix (B, k, hidden)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    prefix: torch.Tensor | None = None


def build_mapper(config: ClipCapConfig, lm_hidden: int) -> nn.Module:
    if config.token_shape is not None:
        num_tokens, token_dim = config.token_shape
        if config.mapping == "mlp":
            return TokenMLPMapper(token_dim, num_tokens, lm_hidden, config.prefix_length)
        return TokenTransformerMapper(
            token_dim,
            num_tokens,
            lm_hidden,
            config.prefix_length,
            num_layers=config.num_layers,
            num_heads=config.num_heads,
        )
    if config.mapping == "mlp":
        return MLPMapper(config.clip_dim, lm_hidden, config.prefix_length)
    return TransformerMapper(
        config.clip_dim,
        lm_hidden,
        config.prefix_length,
        config.clip_length,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
    )


def caption_generation_config(config: ClipCapConfig) -> GenerationConfig:
    """The decoding defaults a complete model carries: greedy, the original's length limit, stop at the stop token."""
    return GenerationConfig(
        max_new_tokens=MAX_NEW_TOKENS,
        num_beams=1,
        do_sample=False,
        eos_token_id=config.stop_token_id,
        pad_token_id=config.pad_token_id,
        bos_token_id=None,
    )


class ClipCapPreTrainedModel(PreTrainedModel):
    """Shared by the ClipCap classes: config class, weight layout, and a `from_pretrained` that checks a dir first."""

    config_class = ClipCapConfig
    base_model_prefix = "model"
    # The attention is the LM's and the vision tower's: the implementation asked for is passed down to them, and
    # each checks its own support (the mapper's attention is plain PyTorch SDPA whatever is asked).
    _supports_sdpa = True
    _supports_flash_attn = True

    def _init_weights(self, module: nn.Module) -> None:
        """Mapper modules keep PyTorch's initialisation, as in the original; the LM and the vision model are
        transformers models that initialise themselves."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *model_args, device=None, **kwargs):
        """Load a model dir or Hub repo with transformers' `from_pretrained` (all its options: `revision`, `token`,
        `dtype`/`torch_dtype`, `device_map`, ...); `device` moves the model there afterwards. A local dir is checked
        first, and every unusable dir is one ClipCapError."""
        name = str(pretrained_model_name_or_path)
        path = Path(name).expanduser()
        if path.is_dir():
            by_reference = _check_model_dir(cls, path)
        elif looks_like_path(name):
            raise ClipCapError(f"model directory not found: {name}")
        else:
            by_reference = None  # a Hub repo: known once loaded
        want_info = kwargs.pop("output_loading_info", False)
        try:
            # for a mapper-only dir transformers would report every LM weight as missing before the LM is in place
            with transformers_quiet(errors_only=bool(by_reference)):
                model, info = super().from_pretrained(name, *model_args, output_loading_info=True, **kwargs)
        except ClipCapError:
            raise
        except OSError as e:
            if path.is_dir():
                raise ClipCapError(f"cannot load {path}: {str(e).splitlines()[0]}") from None
            raise ClipCapError(offline_hint(name, "model")) from None
        except (RuntimeError, ValueError) as e:  # what a Hub repo that was not checked above can still raise
            raise ClipCapError(f"{name} does not match its config.json: {str(e).splitlines()[0]}") from None
        base = model if isinstance(model, ClipCapModel) else model.model
        prefix = "lm." if base is model else "model.lm."
        tied = set(getattr(model, "all_tied_weights_keys", None) or {})
        lm_keys = {prefix + k for k in base.lm.state_dict()}
        missing = set(info["missing_keys"])
        if by_reference is None:
            by_reference = not model.config.tune_lm and lm_keys - tied <= missing
        problems = {
            "missing": sorted(missing - lm_keys if by_reference else missing - tied),
            "unexpected": sorted(k for k in info["unexpected_keys"] if not k.startswith("vision_tower.")),
            "mismatched": sorted(str(k) for k in info.get("mismatched_keys", [])),
        }
        if any(problems.values()):
            raise ClipCapError(
                f"the weights in {name} do not match config.json: "
                + ", ".join(f"{kind} {keys[:3]}" for kind, keys in problems.items() if keys)
            )
        if by_reference:
            base._load_lm_by_reference(path if path.is_dir() else None)
        if base.config.adapter is not None:
            base._load_adapter(name, path.is_dir())
        if device is not None:
            model.to(device)
        model.eval()
        return (model, info) if want_info else model


def _named_loss(lm: nn.Module) -> nn.Module:
    # transformers picks an LM's loss by its class name; GPT2LMHeadModel's matches none, so every loss computed
    # warns that loss_type=None is unrecognized, then uses the causal-LM loss. Name that loss up front.
    if getattr(lm, "loss_type", "") is None:
        lm.loss_type = "ForCausalLM"
    return lm


class ClipCapModel(ClipCapPreTrainedModel):
    """Mapper + causal LM. `ClipCapModel(config)` builds the LM from `config.text_config` (random weights, as
    `from_pretrained` does before loading them) or, when the config has none yet, loads the pretrained LM named by
    `config.lm`; pass `lm=` to use an LM object you already have."""

    def __init__(self, config: ClipCapConfig, lm: nn.Module | None = None):
        super().__init__(config)
        if lm is None:
            if config.text_config is not None:
                # the dtype transformers is loading in (or the default): not the one text_config was saved with
                lm = AutoModelForCausalLM.from_config(config.text_config, dtype=torch.get_default_dtype())
            else:
                lm = load_causal_lm(config.lm)
        self.lm = _named_loss(lm)
        config.text_config = lm.config
        embeddings = lm.get_input_embeddings()
        self.lm_hidden = embeddings.embedding_dim
        self.mapper = build_mapper(config, self.lm_hidden).to(embeddings.weight.dtype)
        if not config.tune_lm:
            self.lm.requires_grad_(False)
            self.lm.eval()
        self.post_init()

    def _load_lm_by_reference(self, model_dir: Path | None) -> None:
        """Put the pretrained LM named by `config.lm` (a dir relative to the model dir, or an HF id) in place of the
        LM built from text_config, for a dir whose weights hold only the mapper."""
        name = resolve_model_dir_name(self.config.lm, model_dir, "language model", "lm")
        dtype = next(self.mapper.parameters()).dtype
        lm = load_causal_lm(name, dtype=dtype).to(next(self.mapper.parameters()).device)
        hidden = lm.get_input_embeddings().embedding_dim
        if hidden != self.lm_hidden:
            raise ClipCapError(
                f"the language model {self.config.lm} has hidden size {hidden}, but the mapper was trained for "
                f"{self.lm_hidden}"
            )
        self.lm = _named_loss(lm).requires_grad_(False).eval()

    def _load_adapter(self, name: str, local: bool) -> None:
        """Put the LM under the PEFT LoRA adapter in the model dir's (or Hub repo's) `config.adapter` folder."""
        try:
            from peft import PeftModel
        except ImportError:
            raise ClipCapError(f"{name} holds a LoRA adapter, which needs peft: pip install peft") from None
        folder = self.config.adapter
        source = {"model_id": str(Path(name) / folder)} if local else {"model_id": name, "subfolder": folder}
        if local and not (Path(name) / folder / "adapter_config.json").is_file():
            raise ClipCapError(f"{name} has no LoRA adapter in {folder}/ (no adapter_config.json), as its config says")
        try:
            with transformers_quiet(errors_only=True), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # peft on transformers 5
                self.lm = PeftModel.from_pretrained(self.lm, **source, is_trainable=False).eval()
        except ClipCapError:
            raise
        except Exception as e:  # noqa: BLE001 - peft raises many kinds for a damaged or mismatched adapter
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ClipCapError(f"cannot load the LoRA adapter in {name} ({folder}/): {first}") from None

    # -- forward -----------------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> ClipCapModel:
        super().train(mode)
        if not self.config.tune_lm and self.config.adapter is None:
            self.lm.eval()  # a frozen LM keeps dropout off, as in the original ClipCaptionPrefix
        return self

    def prefix(self, clip_embeds: torch.Tensor) -> torch.Tensor:
        """Map CLIP embeddings (B, clip_dim) to prefix embeddings (B, k, lm_hidden), or image tokens (B, T, D) when
        config.token_shape is set to (B, T + k, lm_hidden)."""
        self.config.check_mapper_input(tuple(clip_embeds.shape))
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
        return pad_token_id(self.config.pad_token_id, self.lm.config)

    def _prompted_inputs(self, prefix: torch.Tensor, input_ids, attention_mask):
        """Prefix followed by the prompt's embeddings. Left padding of the prompts moves in front of the prefix,
        so every row's prompt ends where generation starts."""
        mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
        if input_ids is None or input_ids.shape[1] == 0:
            return prefix, mask
        input_ids = input_ids.to(prefix.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds = torch.cat((prefix, self.lm.get_input_embeddings()(input_ids).to(prefix.dtype)), dim=1)
        mask = torch.cat((mask, attention_mask.to(mask)), dim=1)
        order = torch.sort(mask, dim=1, stable=True).indices  # padding (0) first, order kept otherwise
        embeds = embeds.gather(1, order.unsqueeze(-1).expand_as(embeds))
        return embeds, mask.gather(1, order)

    @torch.no_grad()
    def generate(
        self,
        clip_embeds: torch.Tensor,
        max_new_tokens: int = MAX_NEW_TOKENS,
        num_beams: int = 1,
        do_sample: bool = False,
        num_return_sequences: int = 1,
        stop_token_id=FROM_CONFIG,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **generate_kwargs,
    ) -> torch.LongTensor:
        """Caption token ids (B*num_return_sequences, T_new): new tokens only, rows padded with the pad id after
        their stop token. `input_ids` (B, T) is a prompt placed after the prefix (left-padded, with its
        `attention_mask`): the caption continues it. The prefix is built once; decoding (KV cache, beams,
        sampling) is the LM's own `generate`. `stop_token_id=None` disables stopping; extra kwargs (temperature,
        top_p, ...) go to it."""
        stop = self.config.stop_token_id if stop_token_id is FROM_CONFIG else stop_token_id
        pad = generate_kwargs.pop("pad_token_id", None)
        prefix = self.prefix(clip_embeds).to(self.lm.get_input_embeddings().weight.dtype)
        embeds, mask = self._prompted_inputs(prefix, input_ids, attention_mask)
        return generate_from_prefix(
            self.lm,
            embeds,
            stop,
            self.pad_token_id if pad is None else pad,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            do_sample=do_sample,
            num_return_sequences=num_return_sequences,
            **generate_kwargs,
        )

    # -- persistence -------------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | Path, save_lm: bool = True, **kwargs) -> None:
        """transformers' `save_pretrained` (config.json + safetensors weights, `max_shard_size`, `push_to_hub`,
        ...). `save_lm=False` (frozen LM only) keeps just the mapper and refers to the LM by `config.lm`. With a LoRA
        adapter (`config.adapter`) the weights hold the mapper, the adapter goes to its folder in PEFT's layout and
        the LM is always referred to by `config.lm`."""
        check_save_options(kwargs)
        if self.config.adapter is not None:
            self.lm.save_pretrained(Path(save_directory) / self.config.adapter)
            save_lm = False
        if not save_lm:
            if self.config.tune_lm:
                raise ClipCapError("save_lm=False is only for a frozen LM: a tuned LM's weights must be saved")
            kwargs["state_dict"] = {k: v for k, v in self.state_dict().items() if k.startswith("mapper.")}
        with transformers_quiet():
            super().save_pretrained(save_directory, **kwargs)


def check_save_options(options: dict) -> None:
    """Refuse a keyword transformers' `save_pretrained` would quietly drop (it keeps unknown ones for `push_to_hub`):
    one error naming it and the accepted ones."""
    import inspect

    from transformers.utils import PushToHubMixin

    known = {*inspect.signature(PreTrainedModel.save_pretrained).parameters}
    known |= {*inspect.signature(PushToHubMixin.push_to_hub).parameters}
    known -= {"self", "kwargs", "save_directory"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ClipCapError(
            f"unknown save_pretrained argument {', '.join(unknown)} (accepted: {', '.join(sorted(known))})"
        )


class ClipCapVisionTower(nn.Module):
    """The image encoder's vision model and projection: pixel_values -> what CLIPModel.get_image_features returns
    (the projected pooled embeddings as pooler_output, the vision model's last hidden states), so ImageEncoder reads
    a tower like any CLIP-family model."""

    def __init__(self, vision_config):
        super().__init__()
        self.config = vision_config
        self.vision_model = AutoModel.from_config(vision_config, dtype=torch.get_default_dtype())
        self.visual_projection = nn.Linear(vision_config.hidden_size, vision_config.projection_dim, bias=False)

    def get_image_features(self, pixel_values: torch.Tensor) -> BaseModelOutputWithPooling:
        out = self.vision_model(pixel_values=pixel_values)
        return BaseModelOutputWithPooling(
            last_hidden_state=out.last_hidden_state, pooler_output=self.visual_projection(out.pooler_output)
        )


class ClipCapForImageCaptioning(ClipCapPreTrainedModel, GenerationMixin):
    """A complete captioning model: vision tower + projection, mapper and LM. `generate(pixel_values, input_ids=
    prompt)` returns the prompt followed by the caption's tokens, like the decoder-only models the
    image-text-to-text pipeline serves."""

    main_input_name = "pixel_values"
    input_modalities = ("image", "text")

    def __init__(self, config: ClipCapConfig, model: ClipCapModel | None = None, vision_tower=None):
        if config.vision_config is None:
            raise ClipCapError(
                "a complete captioning model needs vision_config (the image encoder's vision tower); this config "
                "has none: load it as a ClipCapModel (or with Captioner)"
            )
        super().__init__(config)
        self.vision_tower = vision_tower if vision_tower is not None else ClipCapVisionTower(config.vision_config)
        self.model = model if model is not None else ClipCapModel(config)
        self.generation_config = caption_generation_config(config)
        self.post_init()

    @classmethod
    def from_parts(cls, model: ClipCapModel, encoder: nn.Module) -> ClipCapForImageCaptioning:
        """Join a ClipCapModel and the CLIP-family model whose embeddings it was trained on (or a vision tower)."""
        if isinstance(encoder, ClipCapVisionTower):
            tower = encoder
        else:
            vision, projection = getattr(encoder, "vision_model", None), getattr(encoder, "visual_projection", None)
            if vision is None or not isinstance(projection, nn.Linear):
                raise ClipCapError(
                    f"a complete captioning model needs a CLIP-family encoder with a vision model and a visual "
                    f"projection; {type(encoder).__name__} has none"
                )
            vision_config = type(vision.config).from_dict(vision.config.to_dict())
            vision_config.projection_dim = projection.out_features
            dtype = projection.weight.dtype
            tower = ClipCapVisionTower(vision_config).to(dtype)
            tower.vision_model.load_state_dict(vision.state_dict())
            tower.visual_projection.load_state_dict(projection.state_dict())
            tower.to(projection.weight.device)
        config = ClipCapConfig.from_dict({**model.config.to_dict(), "vision_config": tower.config.to_dict()})
        return cls(config, model=model, vision_tower=tower)

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (B, 3, H, W) -> the (B, clip_dim) pooled, projected embeddings."""
        return self._vision(pixel_values).pooler_output

    def get_mapper_inputs(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (B, 3, H, W) -> what the mapper reads: the pooled embeddings (B, clip_dim), or the vision
        model's last hidden states (B, T, D) pooled to config.token_grid when the model reads image tokens."""
        out = self._vision(pixel_values)
        if self.config.token_shape is None:
            return out.pooler_output
        return pool_tokens(out.last_hidden_state, self.config.token_grid)

    def _vision(self, pixel_values: torch.Tensor) -> BaseModelOutputWithPooling:
        param = next(self.vision_tower.parameters())
        return self.vision_tower.get_image_features(pixel_values.to(param.device, param.dtype))

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> ClipCapOutput:
        """ClipCapModel.forward on what the mapper reads of the images."""
        return self.model(self.get_mapper_inputs(pixel_values), input_ids, attention_mask, labels)

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        **kwargs,
    ) -> torch.LongTensor:
        """Prompt + caption token ids for each image (the prompt part is empty without `input_ids`). Decoding
        settings: this model's generation_config, then `generation_config`, then kwargs; `eos_token_id` is the
        stop token."""
        if pixel_values is None:
            raise ClipCapError("ClipCap captions images: pass pixel_values")
        settings = self.generation_config.to_diff_dict()
        if generation_config is not None:
            settings.update(generation_config.to_diff_dict())
        settings.update(kwargs)
        for key in ("transformers_version", "_from_model_config", "max_length"):
            settings.pop(key, None)
        stop = settings.pop("eos_token_id", None)
        if isinstance(stop, list):
            stop = stop[0] if stop else None
        new = self.model.generate(
            self.get_mapper_inputs(pixel_values),
            stop_token_id=stop,
            input_ids=input_ids,
            attention_mask=attention_mask,
            **settings,
        )
        if input_ids is None:
            return new
        prompt = input_ids.to(new.device).repeat_interleave(settings.get("num_return_sequences", 1), dim=0)
        return torch.cat((prompt, new), dim=1)

    def save_pretrained(self, save_directory: str | Path, **kwargs) -> None:
        """transformers' `save_pretrained`; the dir's auto_map also names ClipCapModel for AutoModel."""
        check_save_options(kwargs)
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        auto_map.setdefault("AutoModel", f"{ClipCapModel.__module__.split('.')[-1]}.{ClipCapModel.__name__}")
        self.config.auto_map = auto_map
        with transformers_quiet():
            super().save_pretrained(save_directory, **kwargs)


# -- checking a model dir before transformers reads it ---------------------------------------------------------------
def saved_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape in a dir's safetensors weights (one file or shards with an index), headers only."""
    index = path / WEIGHTS_INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ClipCapError(f"{index} is not a valid safetensors index: {type(e).__name__}: {e}") from None
        if not all(isinstance(f, str) and "/" not in f and "\\" not in f for f in files):
            raise ClipCapError(f"{index} names weight files outside the model dir")
    elif (path / WEIGHTS_NAME).is_file():
        files = [WEIGHTS_NAME]
    else:
        raise ClipCapError(f"{path} has no {WEIGHTS_NAME}")
    shapes: dict[str, tuple[int, ...]] = {}
    for name in files:
        file = path / name
        try:
            with safe_open(str(file), framework="pt") as f:
                names = f.keys()
                for key in names:
                    shapes[key] = tuple(f.get_slice(key).get_shape())
        except (SafetensorError, OSError, ValueError) as e:
            raise ClipCapError(f"{file} is not a readable safetensors file: {str(e).splitlines()[0]}") from None
    return shapes


def _check_model_dir(cls: type[ClipCapPreTrainedModel], path: Path) -> bool:
    """Raise ClipCapError unless the dir's config builds a model whose tensor names and shapes are the ones in its
    weight files. Returns True when the LM is saved by reference (weights hold only the mapper)."""
    config = ClipCapConfig.from_pretrained(path)
    if config.text_config is None:
        raise ClipCapError(f"{path / CONFIG_NAME} has no text_config to rebuild the language model")
    saved = saved_shapes(path)
    complete = cls is not ClipCapModel
    if complete and not any(k.startswith("vision_tower.") for k in saved):
        raise ClipCapError(f"{path} holds no vision tower: load it as a ClipCapModel (or with Captioner)")
    try:
        with torch.device("meta"):  # shapes only: nothing the config asks for is allocated
            skeleton = cls(config)
    except ClipCapError:
        raise
    except Exception as e:  # noqa: BLE001 - an untrusted text_config / vision_config can fail in any model class
        raise ClipCapError(
            f"{path / CONFIG_NAME} describes a model that cannot be built: {type(e).__name__}: {str(e).splitlines()[0]}"
        ) from None
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    tied = getattr(skeleton, "all_tied_weights_keys", None) or {}
    if not complete:  # a complete model's dir also loads as its ClipCapModel part
        saved = {k.removeprefix("model."): v for k, v in saved.items() if not k.startswith("vision_tower.")}
    lm_prefix = "model.lm." if complete else "lm."
    mapper_prefix = lm_prefix.replace("lm.", "mapper.")
    by_reference = not any(k.startswith(lm_prefix) for k in saved) and any(k.startswith(mapper_prefix) for k in saved)
    if by_reference and config.tune_lm:
        raise ClipCapError(f"{path} holds no language model weights, but its config says the LM was tuned")
    present = set(saved)
    missing = sorted(
        k
        for k in expected
        if k not in present
        and not (by_reference and k.startswith(lm_prefix))
        and not (k in tied and tied[k] in present)
        and not any(target in present for target, source in tied.items() if source == k)
    )
    unexpected = sorted(present - set(expected))
    both = sorted(present & set(expected))
    mismatched = [f"{k} {saved[k]} vs {expected[k]}" for k in both if saved[k] != expected[k]]
    if missing or unexpected or mismatched:
        details = {"missing": missing, "unexpected": unexpected, "shape (file vs config)": mismatched}
        raise ClipCapError(
            f"the weights in {path} do not match config.json: "
            + "; ".join(f"{kind} {keys[:3]}" for kind, keys in details.items() if keys)
        )
    return by_reference


ClipCapModel.register_for_auto_class("AutoModel")
ClipCapForImageCaptioning.register_for_auto_class("AutoModelForImageTextToText")
