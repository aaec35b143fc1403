"""LoRA on the language model, through peft: adapters for training, and merging them into a plain model dir.

With LoRA the LM's own weights never change; low-rank adapters on its attention projections train with the mapper.
A LoRA model dir holds the mapper's weights, the adapter in PEFT's layout (`adapter/adapter_config.json`,
`adapter/adapter_model.safetensors`) and a reference to the base LM (`config.lm`), so it is a few MB whatever the LM's
size; `ClipCapModel.from_pretrained` puts the adapter back on the LM. `merge_lora` writes the same model as an
ordinary dir with the adapter folded into the LM's weights (what export and push take).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path

from .errors import ClipCapError
from .hub import load_tokenizer, resolve_model_dir_name
from .model import ClipCapModel
from .options import check_options, option
from .outputs import MODEL_DIR, check_dir, write_dir

ADAPTER = "adapter"  # the model dir's folder for the adapter
COMMAND = "clipcap merge-lora"


def _peft():
    try:
        import peft
    except ImportError:
        raise ClipCapError("LoRA needs peft: pip install 'clipcap-hf[train]'") from None
    return peft


def add_lora(
    model: ClipCapModel, r: int, alpha: float, dropout: float, target_modules: list[str] | None = None
) -> ClipCapModel:
    """Put trainable LoRA adapters (rank `r`, scaling `alpha`/`r`) on `model`'s frozen LM, in place. Without
    `target_modules` peft's defaults for the LM's architecture apply (its attention projections)."""
    peft = _peft()
    if model.config.tune_lm:
        raise ClipCapError("LoRA adapts an LM that stays as it is: this model's LM is tuned")
    lm_type = model.lm.config.model_type
    if target_modules:
        check_target_modules(model.lm, target_modules)
    config = peft.LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules) if target_modules else None,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        with warnings.catch_warnings():
            # GPT-2's attention is a Conv1D (weights stored transposed): peft notices and transposes by itself
            warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # peft on transformers 5
            model.lm = peft.get_peft_model(model.lm, config)
    except ValueError:
        if target_modules:
            raise ClipCapError(
                f"LoRA target modules {', '.join(target_modules)} match no layer the adapters support in the "
                f"{lm_type} LM"
            ) from None
        raise ClipCapError(
            f"peft knows no default LoRA target modules for a {lm_type} LM: name them (`lora_target_modules`)"
        ) from None
    model.config.adapter = ADAPTER
    return model


def check_target_modules(lm, targets: list[str]) -> None:
    """Every name in `targets` must name a module of `lm` as peft matches them (the whole dotted name or its last
    parts), so a typo is an error rather than a layer quietly left without an adapter."""
    names = [name for name, _ in lm.named_modules() if name]
    unknown = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unknown:
        weighted = [n for n, m in lm.named_modules() if n and next(m.parameters(recurse=False), None) is not None]
        valid = sorted({n.rsplit(".", 1)[-1] for n in weighted})
        raise ClipCapError(
            f"LoRA target modules {', '.join(unknown)}: no module of the {lm.config.model_type} LM has that name "
            f"(its layers: {', '.join(valid[:12])})"
        )


def load_adapter_weights(model: ClipCapModel, folder: Path) -> None:
    """Load the adapter weights saved in `folder` (PEFT's layout) into `model`'s LM, which has the adapters."""
    from safetensors.torch import load_file

    weights = load_file(str(Path(folder) / "adapter_model.safetensors"))
    result = _peft().set_peft_model_state_dict(model.lm, weights)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise ClipCapError(f"{folder} does not match this model's adapters: {(missing or result.unexpected_keys)[:3]}")


@dataclass(kw_only=True)
class MergeLoraConfig:
    """What `clipcap merge-lora` takes."""

    model_dir: str = option(positional=True, help="model dir with a LoRA adapter (trained with `lora_r`)")
    out: str = option(positional=True, help="model dir to write: the LM with the adapter merged into its weights")
    overwrite: bool = option(False, help="replace the model dir an earlier merge-lora wrote there (other files kept)")

    def __post_init__(self) -> None:
        check_options(self)


def merge_lora(cfg: MergeLoraConfig) -> Path:
    """Write `cfg.model_dir`'s model to `cfg.out` as a plain model dir: the adapter merged into the LM's weights
    (saved in full, as a tuned LM), the mapper, tokenizer and encoder reference as they were. Returns `cfg.out`."""
    source = Path(cfg.model_dir)
    where = dict(inputs=[source], overwrite=cfg.overwrite)
    check_dir(cfg.out, MODEL_DIR, COMMAND, **where)
    model = ClipCapModel.from_pretrained(source)
    if model.config.adapter is None:
        raise ClipCapError(f"{source} has no LoRA adapter to merge")
    tokenizer = load_tokenizer(source)
    model.lm = model.lm.merge_and_unload()
    model.config.adapter = None
    model.config.tune_lm = True  # the LM's weights differ from the base LM's now: they are saved in full
    encoder = model.config.clip_model
    with contextlib.suppress(ClipCapError):  # a name that finds nothing here is kept as it was
        found = Path(resolve_model_dir_name(encoder, source, "CLIP encoder", "clip_model")) if encoder else None
        if found is not None and found.exists():
            model.config.clip_model = str(found.resolve())  # the merged dir must still find it

    def write(stage: Path) -> None:
        model.save_pretrained(stage)
        tokenizer.save_pretrained(stage)

    return write_dir(cfg.out, MODEL_DIR, COMMAND, write, **where)
