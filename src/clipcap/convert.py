"""Convert original rmokady/CLIP_prefix_caption checkpoints (a torch pickle of a plain state dict) to a model dir.

The file is read with `torch.load(weights_only=True)`: a checkpoint that needs arbitrary unpickling is refused,
never executed, and the refusal names what the pickle would have imported and run (read with `pickletools`, which
only parses). Stale `attn.bias` / `attn.masked_bias` buffers (rejected by current transformers) are dropped,
`clip_project.*` maps to `mapper.*` and `gpt.*` to `lm.*`. Sizes are read from tensor shapes; flags that
contradict them are errors. The originals never learned an end token, so generation stops at ".". The model dir is
written in the current format (transformers config with `model_type: clipcap`), next to the target and then
renamed into place, so a failed conversion leaves nothing behind.
"""

from __future__ import annotations

import _compat_pickle
import dataclasses
import pickletools
import re
import warnings
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
from .outputs import MODEL_DIR, check_dir, write_dir

COMMAND = "clipcap convert"

DEFAULT_CLIP = "openai/clip-vit-base-patch32"  # ViT-B/32: the encoder of the published MLP checkpoints
DEFAULT_CLIP_DIM = 512
STALE_BUFFER = re.compile(r"\.attn\.(bias|masked_bias)$")
LAYER_KEY = re.compile(r"^clip_project\.transformer\.layers\.(\d+)\.")
# Opcodes that import a module attribute (then callable by REDUCE / NEWOBJ / BUILD); EXT* fetch one from copyreg.
IMPORT_OPCODES = frozenset({"GLOBAL", "STACK_GLOBAL", "INST", "EXT1", "EXT2", "EXT4"})
STRING_OPCODES = frozenset(
    {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
)
MAX_PICKLES = 8  # a legacy (non-zip) torch file is a few pickles in a row, then raw storage bytes


def _allowed_globals() -> set[str]:
    """What torch's weights_only unpickler accepts by default (its list is private, hence the fallback: then every
    import is reported)."""
    from torch import _weights_only_unpickler as unpickler

    return set(getattr(unpickler, "_get_allowed_globals", dict)())


def _python3_name(module: str, name: str = "") -> str:
    """What Python 3 imports for a protocol 0-2 global, which may carry Python 2 names ("commands call")."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    else:
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    return f"{module}.{name}"


def _pickle_imports(stream) -> list[str]:
    """module.name of every global one pickle imports, in order (protocol-2 names as Python 3 spells them)."""
    found: list[str] = []
    recent: list = []  # values pushed lately (strings, or None); enough to read STACK_GLOBAL's operands
    memo: dict = {}
    for op, arg, _ in pickletools.genops(stream):
        name = op.name
        if name in ("GLOBAL", "INST"):
            found.append(_python3_name(*str(arg).split(" ", 1)))
        elif name == "STACK_GLOBAL":
            module, attr = recent[-2:] if len(recent) >= 2 else [None, None]
            readable = isinstance(module, str) and isinstance(attr, str)
            found.append(f"{module}.{attr}" if readable else "a global named indirectly")
        elif name in IMPORT_OPCODES:
            found.append(f"copyreg extension {arg}")
        if name in STRING_OPCODES:
            recent.append(arg)
        elif name in ("BINGET", "LONG_BINGET", "GET"):
            recent.append(memo.get(arg))
        elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[arg] = recent[-1] if recent else None
        elif name == "MEMOIZE":
            memo[len(memo)] = recent[-1] if recent else None
        elif name != "STOP":
            recent.append(None)
        if name == "STOP":
            break
    return found


def unsafe_imports(path: Path) -> list[str]:
    """The globals a torch checkpoint's pickles import that torch's weights_only loader does not allow: what
    loading it with plain pickle would import and run. Parsed, never executed; a damaged file gives what could be
    read before the damage."""
    found: list[str] = []
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                for member in archive.namelist():
                    if member.endswith(".pkl"):
                        with archive.open(member) as stream:
                            found += _pickle_imports(stream)
        else:
            with open(path, "rb") as stream:
                for _ in range(MAX_PICKLES):
                    found += _pickle_imports(stream)
    except Exception:  # noqa: BLE001, S110 - damaged data ends the scan; what was read so far still counts
        pass
    allowed = _allowed_globals()
    return list(dict.fromkeys(name for name in found if name not in allowed))


def load_original_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read an original checkpoint safely; one clear ClipCapError for anything unusable."""
    path = Path(path)
    if path.is_dir():
        raise ClipCapError(f"{path} is a directory, not a checkpoint file")
    if not path.is_file():
        raise ClipCapError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the outcome is reported below
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged file makes torch.load raise almost anything
        refused = unsafe_imports(path)
        if refused:
            raise ClipCapError(
                f"{path} is not a plain tensor checkpoint: loading it would import and run "
                f"{', '.join(refused[:3])}{' ...' if len(refused) > 3 else ''} (a pickle can run any program when "
                "loaded), so it was refused; nothing in it was executed"
            ) from None
        reason = str(e).strip().splitlines()[0] if str(e).strip() else "no details"
        raise ClipCapError(f"{path} is corrupt or truncated ({type(e).__name__}: {reason[:200]})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if (
        not isinstance(state, dict)
        or not state
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())
    ):
        raise ClipCapError(f"{path} does not hold a state dict of named tensors")
    return {k: v for k, v in state.items() if not STALE_BUFFER.search(k)}


def _shape(state: dict[str, torch.Tensor], key: str, ndim: int) -> tuple[int, ...]:
    value = state.get(key)
    if value is None:
        raise ClipCapError(f"the checkpoint has no {key}: not a CLIP_prefix_caption checkpoint")
    if value.ndim != ndim or 0 in value.shape:
        raise ClipCapError(f"{key} has shape {tuple(value.shape)}, not that of a {ndim}-d weight")
    return tuple(value.shape)


def infer_mapper(state: dict[str, torch.Tensor], lm_hidden: int) -> dict:
    """Mapper hyper-parameters read from the tensor shapes."""
    if "clip_project.prefix_const" in state:
        k, hidden = _shape(state, "clip_project.prefix_const", 2)
        out, clip_dim = _shape(state, "clip_project.linear.weight", 2)
        if out % hidden:
            raise ClipCapError(f"clip_project.linear outputs {out} values, not a multiple of the prefix width {hidden}")
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
        _, clip_dim = _shape(state, "clip_project.model.0.weight", 2)
        out = _shape(state, "clip_project.model.2.weight", 2)[0]
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
    overwrite: bool = False,
) -> Path:
    """Convert `checkpoint` to a model dir at `out_dir` (config.json, model.safetensors, tokenizer files), as the
    output policy says (`outputs.py`: a model dir `convert` wrote earlier is replaced with `overwrite` only)."""
    where = dict(inputs=[checkpoint, lm, clip_model], overwrite=overwrite)
    state = load_original_state_dict(checkpoint)  # a checkpoint that is no checkpoint is named first
    check_dir(out_dir, MODEL_DIR, COMMAND, **where)
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
        elif value is not None:  # a Transformer mapper's setting, given for an MLP checkpoint
            raise ClipCapError(f"`{name}` is a setting of the Transformer mapper, but {checkpoint} holds an MLP mapper")
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

    def write(stage: Path) -> None:
        model.save_pretrained(stage)
        tokenizer.save_pretrained(stage)

    return write_dir(out_dir, MODEL_DIR, COMMAND, write, **where)


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
    out_dir: str = option(positional=True, help="model dir to write: new, empty, or one an earlier convert wrote")
    overwrite: bool = option(False, help="replace the model dir an earlier convert wrote there (other files kept)")
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
