"""What a training run starts from: its store, a fresh model or an existing one (`init_from`), the tokenizer, and
the Accelerate accelerator with its experiment tracker. `train.py` runs the loop over what these build."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .config import ClipCapConfig
from .errors import ClipCapError
from .hub import TOKENIZER_FILES, load_tokenizer, resolve_model_dir_name
from .model import ClipCapModel

if TYPE_CHECKING:
    from .train import TrainConfig

logger = logging.getLogger("clipcap.train")


def tracker_check(report_to: str) -> str | None:
    """Accelerate's name for the `report_to` tracker (None for none), after checking its package is installed."""
    if report_to == "none":
        return None
    package = {"tensorboard": "tensorboard", "wandb": "wandb"}[report_to]
    try:
        if report_to == "tensorboard":
            import torch.utils.tensorboard  # noqa: F401 - needs the tensorboard package
        else:
            import wandb  # noqa: F401
    except ImportError:
        raise ClipCapError(f"`report_to` {report_to} needs the {package} package: pip install {package}") from None
    return report_to


def make_accelerator(mixed_precision: str, report_to: str = "none", run_dir: Path | None = None):
    from accelerate import Accelerator

    if mixed_precision == "auto":
        mixed_precision = "no"
        if torch.cuda.is_available():
            mixed_precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    # Without an accelerator, accelerate only recognises a torchrun launch as CPU DDP (gloo) when told cpu=True.
    has_accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    tracker = tracker_check(report_to)
    return Accelerator(
        mixed_precision=mixed_precision,
        cpu=not has_accelerator,
        log_with=tracker,
        project_dir=str(run_dir) if tracker else None,
    )


def open_store(cfg: TrainConfig):
    """The training store, checked against the text-only setting."""
    from .data.store import EmbeddingStore

    store = EmbeddingStore(cfg.data, split=cfg.split)
    if cfg.text_only and store.modality != "text":
        raise ClipCapError(
            f"`text_only` trains on CLIP text embeddings, but {cfg.data} holds image embeddings: "
            "make the store with `clipcap embed` in text-only mode"
        )
    if store.modality == "text" and not cfg.text_only:
        raise ClipCapError(f"{cfg.data} holds CLIP text embeddings: train on it with `text_only` (noise injection)")
    if cfg.tokens and store.token_shape is None:
        raise ClipCapError(f"{cfg.data} holds no image tokens: make the store with `clipcap embed` and `tokens`")
    return store


def lm_positions(model: ClipCapModel) -> int | None:
    for name in ("n_positions", "max_position_embeddings"):
        if isinstance(getattr(model.lm.config, name, None), int):
            return getattr(model.lm.config, name)
    return None


def store_encoder(store) -> str | None:
    """The store's encoder name; a relative path would later resolve against the model dir: where it really is."""
    name = store.clip_model
    if name and not Path(name).is_absolute() and Path(name).is_dir():
        name = str(Path(name).resolve())
    return name


def recorded_lm(name: str, by_reference: bool) -> str:
    """What config.json records as `lm` for the LM the user named. A Hub id stays a Hub id. A local dir is
    recorded by its absolute path only when the model dir will refer to its LM (`by_reference`: a LoRA dir holds
    the mapper and the adapter, not the LM); otherwise the dir holds the LM's weights and tokenizer, the name is only
    a record of where they came from, and it is kept as the user gave it, no path of this machine added."""
    if by_reference and not Path(name).expanduser().is_absolute() and Path(name).expanduser().is_dir():
        return str(Path(name).expanduser().resolve())
    return name


def start_from(cfg: TrainConfig, store) -> TrainConfig:
    """`cfg` with the options its `init_from` model decides taken from that model's config. An option set to
    something else than its default must agree with the model; the model must take the store's embedding size.
    Reads only config.json, so a mismatch is found before any weights load."""
    source = cfg.init_from
    config = ClipCapConfig.from_pretrained(source)
    if config.clip_dim != store.clip_dim:
        raise ClipCapError(
            f"{source} maps {config.clip_dim}-d CLIP embeddings, but {cfg.data} holds {store.clip_dim}-d embeddings"
        )
    if config.adapter is not None:
        raise ClipCapError(
            f"{source} holds a LoRA adapter: merge it into its LM first (merge_lora), then start from that"
        )
    if cfg.lora_r and config.tune_lm:
        raise ClipCapError(
            f"{source} has a tuned LM, which LoRA would have to save in full: start LoRA from a frozen-LM model or "
            "from the base LM"
        )
    lm = config.lm
    # the model holds its LM's weights, so only a LoRA start needs the name to load (load_start_model)
    with contextlib.suppress(ClipCapError):
        lm = resolve_model_dir_name(lm, source if Path(source).is_dir() else None, "language model", "lm")
    decided = dict(mapping=config.mapping, prefix_length=config.prefix_length, lm=lm)
    if config.mapping == "transformer":  # the MLP mapper has neither
        decided.update(clip_length=config.clip_length, num_layers=config.num_layers)
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    for name, value in decided.items():
        given = getattr(cfg, name)
        if given != defaults[name] and given not in (value, getattr(config, name)):
            raise ClipCapError(f"`{name}` {given!r} contradicts {source}, whose model has {value!r}")
    encoder = store_encoder(store)
    if encoder and config.clip_model and Path(encoder).name != Path(config.clip_model).name:
        logger.warning(
            "%s was trained on embeddings of %s, %s holds %s ones", source, config.clip_model, cfg.data, encoder
        )
    where = str(Path(source).resolve()) if Path(source).is_dir() else source
    return dataclasses.replace(cfg, init_from=where, **decided)


def load_start_model(cfg: TrainConfig, store) -> ClipCapModel:
    """The `init_from` model (cfg from `start_from`), set to train on the store: the LM tuned or frozen as `cfg`
    says, the store's encoder recorded."""
    model = ClipCapModel.from_pretrained(cfg.init_from).float()
    model.config.tune_lm = cfg.lm_tuned
    model.lm.requires_grad_(cfg.lm_tuned)
    model.config.clip_model = store_encoder(store)
    if cfg.lora_r:  # the LoRA dir will refer to its base LM: the name the model gives it must find it
        source = Path(cfg.init_from)
        lm = resolve_model_dir_name(model.config.lm, source if source.is_dir() else None, "language model", "lm")
        model.config.lm = recorded_lm(lm, by_reference=True)
    model.config.normalize_prefix = bool(model.config.normalize_prefix or store.normalized or cfg.text_only)
    return model


def start_tokenizer(cfg: TrainConfig):
    """The tokenizer of the `init_from` model dir when it has one, else the LM's."""
    source = Path(cfg.init_from) if cfg.init_from else None
    if source is not None and source.is_dir() and any((source / f).is_file() for f in TOKENIZER_FILES):
        return load_tokenizer(source)
    return load_tokenizer(cfg.lm)


def build_model(cfg: TrainConfig, store, tokenizer) -> ClipCapModel:
    """A fresh ClipCap model for the store's embeddings: the LM named by `cfg.lm`, a new mapper."""
    name = store_encoder(store)
    lm = recorded_lm(cfg.lm, by_reference=bool(cfg.lora_r))
    transformer = cfg.mapping == "transformer"
    config = ClipCapConfig(
        lm=lm,
        clip_model=name,
        clip_dim=store.clip_dim,
        prefix_length=cfg.prefix_length,
        clip_length=(cfg.clip_length or cfg.prefix_length) if transformer and not cfg.tokens else None,
        mapping=cfg.mapping,
        num_layers=cfg.num_layers,
        tune_lm=cfg.lm_tuned,
        # The Captioner feeds raw encoder features: normalise them as the training embeddings were.
        normalize_prefix=bool(store.normalized or cfg.text_only) and not cfg.tokens,
        stop_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        token_shape=list(store.token_shape) if cfg.tokens else None,
        token_grid=store.token_grid if cfg.tokens else None,
    )
    # fp32 master weights whatever dtype the LM was saved in; autocast gives bf16/fp16 compute on GPU.
    return ClipCapModel(config).float()


def caption_budget(cfg: TrainConfig, model: ClipCapModel) -> int:
    """Longest caption in tokens that fits the LM's positions after the prefix."""
    positions, k = lm_positions(model), model.config.prefix_tokens
    if positions is None or k + cfg.max_caption_tokens <= positions:
        return cfg.max_caption_tokens
    if k >= positions:
        raise ClipCapError(f"a prefix of {k} vectors leaves no room in the LM's {positions} positions")
    logger.info("captions capped at %d tokens: the LM has %d positions and the prefix %d", positions - k, positions, k)
    return positions - k
