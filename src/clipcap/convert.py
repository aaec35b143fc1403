"""Convert original rmokady/CLIP_prefix_caption checkpoints (a torch pickle of a plain state dict) to a model dir.

The file is read with `torch.load(weights_only=True)`: a checkpoint that needs arbitrary unpickling is refused,
never executed. Stale `attn.bias` / `attn.masked_bias` buffers (rejected by current transformers) are dropped,
`clip_project.*` maps to `mapper.*` and `gpt.*` to `lm.*`. Sizes are read from tensor shapes; flags that
contradict them are errors. The originals never learned an end token, so generation stops at ".".
"""

from __future__ import annotations

import dataclasses
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from .config import MAPPINGS, ClipCapConfig
from .errors import ClipCapError
from .hub import load_causal_lm, load_tokenizer, offline_hint
from .model import ClipCapModel
from .options import check_options, option

DEFAULT_CLIP = "openai/clip-vit-base-patch32"  # ViT-B/32: the encoder of the published MLP checkpoints
DEFAULT_CLIP_DIM = 512
STALE_BUFFER = re.compile(r"\.attn\.(bias|masked_bias)$")
UNSAFE_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")
LAYER_KEY = re.compile(r"^clip_project\.transformer\.layers\.(\d+)\.")


def load_original_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read an original checkpoint safely; one clear ClipCapError for anything unusable."""
    path = Path(path)
    if not path.is_file():
        raise ClipCapError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = UNSAFE_GLOBAL.search(str(e))
        if not found:
            raise ClipCapError(f"{path} is corrupt or truncated (not a readable torch checkpoint)") from None
        raise ClipCapError(
            f"{path} is not a plain tensor checkpoint: loading it would run arbitrary code ({found.group(1)}), "
            "so it was refused (weights_only=True)"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, IndexError) as e:
        raise ClipCapError(f"{path} is corrupt or truncated ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ClipCapError(f"{path} does not hold a state dict of tensors")
    return {k: v for k, v in state.items() if not STALE_BUFFER.search(k)}


def infer_mapper(state: dict[str, torch.Tensor], lm_hidden: int) -> dict:
    """Mapper hyper-parameters read from the tensor shapes."""
    if "clip_project.prefix_const" in state:
        k, hidden = state["clip_project.prefix_const"].shape
        out, clip_dim = state["clip_project.linear.weight"].shape
        layers = {int(m.group(1)) for key in state if (m := LAYER_KEY.match(key))}
        return dict(
            mapping="transformer",
            prefix_length=k,
            clip_dim=clip_dim,
            hidden=hidden,
            clip_length=out // hidden,
            num_layers=len(layers),
        )
    if "clip_project.model.0.weight" in state:
        _, clip_dim = state["clip_project.model.0.weight"].shape
        out = state["clip_project.model.2.weight"].shape[0]
        if out % lm_hidden:
            raise ClipCapError(
                f"the MLP mapper outputs {out} values, not a multiple of the LM's hidden size {lm_hidden}"
            )
        return dict(mapping="mlp", prefix_length=out // lm_hidden, clip_dim=clip_dim, hidden=lm_hidden)
    raise ClipCapError("no clip_project.* mapper weights found: not a CLIP_prefix_caption checkpoint")


def check_flag(name: str, given, found) -> None:
    if given is not None and given != found:
        raise ClipCapError(f"`{name}` {given} contradicts the checkpoint, which has {found}")


def convert_original(
    checkpoint: str | Path,
    out_dir: str | Path,
    lm: str = "gpt2",
    mapping: str | None = None,
    prefix_length: int | None = None,
    clip_length: int | None = None,
    num_layers: int | None = None,
    clip_dim: int | None = None,
    normalize_prefix: bool = False,
    clip_model: str | None = None,
) -> Path:
    """Convert `checkpoint` to a model dir at `out_dir` (config.json, model.safetensors, tokenizer files)."""
    state = load_original_state_dict(checkpoint)
    try:
        lm_config = AutoConfig.from_pretrained(lm)
    except (OSError, ValueError):
        raise ClipCapError(offline_hint(lm, "language model")) from None
    tokenizer = load_tokenizer(lm)
    has_lm = any(k.startswith("gpt.") for k in state)
    lm_model = AutoModelForCausalLM.from_config(lm_config) if has_lm else load_causal_lm(lm)
    lm_hidden = lm_model.get_input_embeddings().embedding_dim

    found = infer_mapper(state, lm_hidden)
    check_flag("mapping", mapping, found["mapping"])
    if found["hidden"] != lm_hidden:
        raise ClipCapError(f"the mapper emits {found['hidden']}-d vectors but the LM {lm} has hidden size {lm_hidden}")
    given = dict(prefix_length=prefix_length, clip_dim=clip_dim, clip_length=clip_length, num_layers=num_layers)
    for name, value in given.items():
        if name in found:
            check_flag(name, value, found[name])
    if clip_model is None:
        clip_model = DEFAULT_CLIP if found["clip_dim"] == DEFAULT_CLIP_DIM else None
    stop = tokenizer.encode(".", add_special_tokens=False)
    config = ClipCapConfig(
        lm=lm,
        clip_model=clip_model,
        clip_dim=found["clip_dim"],
        prefix_length=found["prefix_length"],
        clip_length=found.get("clip_length"),
        mapping=found["mapping"],
        num_layers=found.get("num_layers", 8),
        tune_lm=found["mapping"] == "mlp",  # the published Transformer checkpoint kept GPT-2 frozen
        normalize_prefix=normalize_prefix,
        stop_token_id=stop[0] if len(stop) == 1 else None,
    )
    model = ClipCapModel(config, lm=lm_model)
    renamed = {}
    for key, value in state.items():
        if key.startswith("clip_project."):
            renamed["mapper." + key.removeprefix("clip_project.")] = value
        elif key.startswith("gpt."):
            renamed["lm." + key.removeprefix("gpt.")] = value
        else:
            raise ClipCapError(f"unexpected key in checkpoint: {key}")
    expected = model.state_dict()
    if not has_lm:
        renamed.update({k: v for k, v in expected.items() if k.startswith("lm.")})
    for key, value in renamed.items():
        if key in expected and expected[key].shape != value.shape:
            raise ClipCapError(
                f"{key}: checkpoint shape {tuple(value.shape)} does not fit the LM {lm} ({tuple(expected[key].shape)})"
            )
    missing = sorted(set(expected) - set(renamed) - tied_keys(model))
    unexpected = sorted(set(renamed) - set(expected))
    if missing or unexpected:
        raise ClipCapError(f"checkpoint does not fit the LM {lm}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.load_state_dict(renamed, strict=False)
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def tied_keys(model: ClipCapModel) -> set[str]:
    """State-dict keys that share storage with an earlier key (e.g. lm_head tied to the input embeddings)."""
    seen, tied = {}, set()
    for key, value in model.state_dict().items():
        ptr = value.data_ptr()
        if ptr in seen:
            tied.add(key)
        seen.setdefault(ptr, key)
    return tied


@dataclass(kw_only=True)
class ConvertConfig:
    """An original checkpoint to convert, and what its tensors cannot say (sizes are read from them; values given
    here that contradict them are errors)."""

    checkpoint: str = option(positional=True, help="original .pt file (read with weights_only=True, never executed)")
    out_dir: str = option(positional=True, help="model dir to write")
    lm: str = option("gpt2", help="HF id or dir of the language model the checkpoint tuned")
    mapping: str | None = option(None, choices=MAPPINGS, help="mapping network", default_text="inferred")
    prefix_length: int | None = option(None, min=1, help="k", default_text="inferred")
    clip_length: int | None = option(None, min=1, help="transformer mapper's clip_length", default_text="inferred")
    num_layers: int | None = option(None, min=1, help="transformer mapper layers", default_text="inferred")
    clip_dim: int | None = option(None, min=1, help="CLIP embedding size", default_text="inferred")
    normalize_prefix: bool = option(False, help="L2-normalise the CLIP embedding (the published Transformer)")
    clip_model: str | None = option(
        None,
        help="HF id or dir of the CLIP encoder to record",
        default_text=f"{DEFAULT_CLIP} for {DEFAULT_CLIP_DIM}-d checkpoints",
    )

    def __post_init__(self) -> None:
        check_options(self)


def convert(cfg: ConvertConfig) -> Path:
    """Convert as `cfg` says; returns the model dir."""
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in ("checkpoint", "out_dir")}
    return convert_original(cfg.checkpoint, cfg.out_dir, **fields)
