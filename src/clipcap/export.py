"""Exporting a model dir for ONNX Runtime on the CPU: `export(model_dir, out_dir, int8=False)`.

Two graphs are written (torch.onnx's dynamo exporter), each checked against PyTorch before the dir is made:
mapper.onnx (CLIP embedding, or image tokens, -> prefix; normalisation included) and decoder.onnx (the LM with its
KV cache: prefix embeddings for the first step or token ids for the next, attention mask and past keys/values in;
last-position logits and present keys/values out). `int8=True` quantizes the decoder's weights to int8 (ONNX
Runtime's dynamic quantization: int8 weights, activations quantized per call). The mapper stays fp32: it runs once
per image, not once per token. The dir also gets the tokenizer, the encoder (the encoder dir the model dir
carried, or a complete dir's vision tower and image processor; an encoder named by Hub id or absolute path stays
named so), and a
config.json whose "export" entry says what the dir is, so `Captioner.from_pretrained(out_dir)` needs no flag. The
dir appears complete or not at all: it is written under a temporary name and renamed at the end.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import json
import logging
import math
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .config import CONFIG_NAME, ClipCapConfig
from .errors import ClipCapError
from .exported import (
    DECODER_FILE,
    EXPORT_KEY,
    FORMAT,
    MAPPER_FILE,
    VISION_TOWER_FILE,
    VISION_TOWER_KEY,
    decoder_input_names,
    is_exported,
    mapper_input_name,
    open_session,
)
from .hub import load_tokenizer, resolve_model_dir_name
from .model import ClipCapForImageCaptioning, ClipCapModel
from .options import check_options, option
from .outputs import EXPORTED, check_dir, copy_tree, write_dir

COMMAND = "clipcap export"
GENERATION_CONFIG = "generation_config.json"
# Exported fp32 logits must match PyTorch's to this, relative to the largest logit (1e-6 is typical).
TOLERANCE = 1e-4


@dataclass
class ExportConfig:
    """What `clipcap export` takes."""

    model_dir: str = option(positional=True, help="ClipCap model dir to export (made by train or convert)")
    out_dir: str = option(positional=True, help="dir to write the exported model to: new, empty, or an earlier export")
    overwrite: bool = option(False, help="replace the exported model an earlier export wrote there (other files kept)")
    int8: bool = option(False, help="int8 weights for the language model: about 4x smaller, faster on the CPU")

    def __post_init__(self) -> None:
        check_options(self)


class _PrefixGraph(nn.Module):
    def __init__(self, model: ClipCapModel):
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.model.prefix(inputs)


def _cache_kwarg(module: nn.Module) -> str:
    # transformers 5 renamed past_key_values to cache
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


class _DecoderGraph(nn.Module):
    """The LM as one graph: [inputs_embeds ; embedded input_ids] + past -> last-position logits + present.

    One of inputs_embeds / input_ids is empty at each step (the prefix first, then one token id per row). The LM head
    is kept as a (hidden, vocab) matrix that the logits multiply directly, so int8 quantization reaches it; when the
    input embedding is tied to it, token ids gather from that same matrix, so the weights are stored once."""

    def __init__(self, lm: nn.Module, num_layers: int):
        super().__init__()
        from transformers import DynamicCache

        self.base = lm.base_model
        self.num_layers = num_layers
        self.cache_kwarg = _cache_kwarg(self.base)
        self.new_cache = DynamicCache
        head, embedding = lm.get_output_embeddings(), lm.get_input_embeddings()
        self.plain_head = type(head) is nn.Linear and head.bias is None
        if self.plain_head:
            self.head_t = nn.Parameter(head.weight.detach().t().contiguous(), requires_grad=False)
        else:
            self.head = head
        self.tied = self.plain_head and type(embedding) is nn.Embedding and embedding.weight is head.weight
        if not self.tied:
            self.embedding = embedding

    def forward(self, inputs_embeds, input_ids, attention_mask, past):
        if self.tied:
            tokens = torch.index_select(self.head_t, 1, input_ids.reshape(-1)).t()
            tokens = tokens.reshape(input_ids.shape[0], input_ids.shape[1], -1)
        else:
            tokens = self.embedding(input_ids)
        embeds = torch.cat((inputs_embeds, tokens.to(inputs_embeds.dtype)), dim=1)
        cache = self.new_cache()
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.base(
            inputs_embeds=embeds, attention_mask=attention_mask, use_cache=True, **{self.cache_kwarg: cache}
        )
        hidden = out.last_hidden_state[:, -1:]
        logits = hidden @ self.head_t if self.plain_head else self.head(hidden)
        present = []
        for layer in cache.layers:
            present += [layer.keys, layer.values]
        return (logits, *present)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def _cache_layout(lm: nn.Module, hidden: int) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of the LM's cache, read from one forward pass; only a plain key/value cache
    (one DynamicLayer per layer: no state-space or other special layers) can be exported."""
    from transformers import DynamicCache, DynamicLayer

    name = type(lm).__name__
    cache = DynamicCache()
    base = lm.base_model
    try:
        with torch.no_grad():
            base(inputs_embeds=torch.zeros(1, 2, hidden), use_cache=True, **{_cache_kwarg(base): cache})
    except Exception as e:  # an LM that cannot run with a transformers cache object
        raise ClipCapError(f"cannot export the language model ({name}): {_first_line(e)}") from None
    layers = cache.layers
    if not layers or any(type(layer) is not DynamicLayer or layer.keys is None for layer in layers):
        raise ClipCapError(f"cannot export the language model ({name}): it does not use a plain key/value cache")
    _, heads, _, head_dim = layers[0].keys.shape
    return len(layers), heads, head_dim


@contextlib.contextmanager
def _quiet_export():
    """The exporter and quantizer report progress and advice through print, warnings and logging: keep them quiet."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._export", "onnxscript", "")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings(), contextlib.redirect_stdout(None):
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def _export_graph(module: nn.Module, args: tuple, dynamic_shapes, names: list[str], outputs: list[str], path: Path):
    try:
        with _quiet_export(), torch.no_grad():
            program = torch.onnx.export(
                module,
                args,
                dynamic_shapes=dynamic_shapes,
                input_names=names,
                output_names=outputs,
                dynamo=True,
                verbose=False,
            )
            program.save(str(path))
    except ClipCapError:
        raise
    except Exception as e:  # the exporter raises many types; all mean "this model does not export"
        raise ClipCapError(f"cannot export the {path.stem} to ONNX: {_first_line(e)}") from None


def _check(name: str, got: np.ndarray, want: torch.Tensor) -> float:
    want = want.detach().float().numpy()
    if got.shape != want.shape:
        raise ClipCapError(f"the exported {name} has shape {got.shape}, PyTorch gives {want.shape}")
    diff = float(np.abs(got - want).max()) if want.size else 0.0
    scale = max(1.0, float(np.abs(want).max()) if want.size else 0.0)
    if not math.isfinite(diff) or diff > TOLERANCE * scale:
        raise ClipCapError(
            f"the exported {name} differs from PyTorch by {diff:.3g} (tolerance {TOLERANCE * scale:.3g})"
        )
    return diff


def _decoder_feed(names, embeds, ids, mask, past) -> dict[str, np.ndarray]:
    return dict(zip(names, (embeds.numpy(), ids.numpy(), mask.numpy(), *(p.numpy() for p in past)), strict=True))


def _verify_decoder(lm: nn.Module, path: Path, layout: tuple[int, int, int], k: int, hidden: int) -> float:
    """Run the exported decoder on a prefill and a decoding step, as generate does, against the PyTorch LM;
    returns the largest logit difference."""
    from transformers import DynamicCache

    layers, heads, head_dim = layout
    names = decoder_input_names(layers)
    session = open_session(path, threads=torch.get_num_threads())
    generator = torch.Generator().manual_seed(0)
    batch = 2
    embeds = torch.randn(batch, k, hidden, generator=generator)
    vocab = lm.get_output_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (batch, 1), generator=generator)
    worst = 0.0
    with torch.no_grad():
        cache = DynamicCache()
        want = lm(inputs_embeds=embeds, use_cache=True, **{_cache_kwarg(lm): cache}).logits[:, -1:]
        empty = [torch.zeros(batch, heads, 0, head_dim)] * (2 * layers)
        out = session.run(None, _decoder_feed(names, embeds, ids[:, :0], torch.ones(batch, k, dtype=torch.long), empty))
        worst = max(worst, _check("decoder logits (prefix step)", out[0], want))
        mask = torch.ones(batch, k + 1, dtype=torch.long)
        want = lm(input_ids=ids, attention_mask=mask, use_cache=True, **{_cache_kwarg(lm): cache}).logits[:, -1:]
        past = [torch.from_numpy(p) for p in out[1:]]
        out = session.run(None, _decoder_feed(names, embeds[:, :0], ids, mask, past))
        worst = max(worst, _check("decoder logits (token step)", out[0], want))
        for i, layer in enumerate(cache.layers):
            _check("decoder cache", out[1 + 2 * i], layer.keys)
            _check("decoder cache", out[2 + 2 * i], layer.values)
    return worst


def _export_decoder(lm: nn.Module, layout: tuple[int, int, int], hidden: int, k: int, path: Path) -> float:
    from torch.export import Dim

    layers, heads, head_dim = layout
    batch, past_len, steps, new_ids = 2, 3, 4, 2  # export sizes: none may be 0 or 1, or the exporter fixes them
    vocab = lm.get_output_embeddings().weight.shape[0]
    args = (
        torch.randn(batch, steps, hidden),
        torch.randint(0, vocab, (batch, new_ids)),
        torch.ones(batch, past_len + steps + new_ids, dtype=torch.long),
        [torch.randn(batch, heads, past_len, head_dim) for _ in range(2 * layers)],
    )
    b = Dim("batch")
    dynamic = {
        "inputs_embeds": {0: b, 1: Dim("embeds_length")},
        "input_ids": {0: b, 1: Dim("ids_length")},
        "attention_mask": {0: b, 1: Dim("total_length")},
        "past": [{0: b, 2: Dim("past_length")} for _ in range(2 * layers)],
    }
    outputs = ["logits"] + [f"present.{i}" for i in range(2 * layers)]
    _export_graph(_DecoderGraph(lm, layers).eval(), args, dynamic, decoder_input_names(layers), outputs, path)
    return _verify_decoder(lm, path, layout, k, hidden)


def _export_mapper(model: ClipCapModel, path: Path) -> float:
    from torch.export import Dim

    x = torch.randn(3, *model.config.mapper_input_shape, generator=torch.Generator().manual_seed(0))
    name = mapper_input_name(model.config)
    _export_graph(_PrefixGraph(model).eval(), (x,), {"inputs": {0: Dim("batch")}}, [name], ["prefix"], path)
    session = open_session(path, threads=torch.get_num_threads())
    with torch.no_grad():
        return _check("prefix", session.run(None, {name: x[:1].numpy()})[0], model.prefix(x[:1]))


def _quantize_int8(path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32 = path.with_name("decoder.fp32.onnx")
    path.rename(fp32)
    try:
        with _quiet_export():
            quantize_dynamic(fp32, path, weight_type=QuantType.QInt8, per_channel=True)
    except Exception as e:
        raise ClipCapError(f"cannot quantize the exported decoder to int8: {_first_line(e)}") from None
    fp32.unlink()
    for extra in path.parent.glob("decoder.fp32.onnx*"):  # external weights of a model over 2 GB
        extra.unlink()


def _copy_encoder(model_dir: Path, clip_model: str | None, dst: Path) -> None:
    """Copy the encoder dir when the config names one inside the model dir (as the demo and tests ship it), so the
    export finds it under the same relative name; an encoder named by absolute path or Hub id stays named so."""
    if clip_model and not Path(clip_model).is_absolute() and (model_dir / clip_model).is_dir():
        copy_tree(model_dir / clip_model, dst / clip_model)


def _keep_tower(model_dir: Path, tower: nn.Module, dst: Path) -> None:
    """An exported complete model keeps its encoder: the vision tower's weights and the image processor."""
    from safetensors.torch import save_file
    from transformers import AutoImageProcessor

    save_file({k: v.contiguous() for k, v in tower.state_dict().items()}, str(dst / VISION_TOWER_FILE))
    AutoImageProcessor.from_pretrained(str(model_dir)).save_pretrained(str(dst))


def _tokenizer(model_dir: Path, lm: str):
    has_tokenizer = any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))
    return load_tokenizer(model_dir if has_tokenizer else resolve_model_dir_name(lm, model_dir, "language model", "lm"))


def _load(source: Path, config: ClipCapConfig) -> tuple[ClipCapModel, nn.Module | None]:
    """The model dir's ClipCapModel in fp32 and, for a complete dir, its vision tower."""
    if config.vision_config is None:
        return ClipCapModel.from_pretrained(source).float().eval(), None
    complete = ClipCapForImageCaptioning.from_pretrained(source).float().eval()
    return complete.model, complete.vision_tower


def export(
    model_dir: str | Path, out_dir: str | Path, int8: bool = False, progress: bool = True, overwrite: bool = False
) -> Path:
    """Export the model dir for ONNX Runtime on the CPU (see the module doc); `int8=True` for int8 LM weights.
    `out_dir` follows the output policy (`outputs.py`): an earlier export there is replaced with `overwrite` only.
    Returns out_dir. Raises ClipCapError when the model cannot be read, exported or matched."""
    from tqdm.auto import tqdm

    for module in ("onnx", "onnxruntime", "onnxscript"):
        if importlib.util.find_spec(module) is None:
            raise ClipCapError(f"exporting needs the [cpu] extra: pip install 'clipcap-hf[cpu]' ({module} is missing)")
    source = Path(model_dir).expanduser()
    if not source.is_dir():
        raise ClipCapError(f"model directory not found: {model_dir}")
    if is_exported(source):
        raise ClipCapError(f"{source} is already an exported model: export the model dir it was made from")
    where = dict(inputs=[source], overwrite=overwrite)
    check_dir(out_dir, EXPORTED, COMMAND, **where)  # before minutes of exporting
    declared = ClipCapConfig.from_pretrained(source)
    if declared.adapter is not None:
        raise ClipCapError(
            f"{source} holds a LoRA adapter, which export does not read: merge it into its LM first (merge_lora; "
            "`clipcap merge-lora MODEL_DIR OUT` on the command line) and export the merged dir"
        )
    steps = ["loading", "mapper", "decoder"] + (["int8"] if int8 else []) + ["writing"]
    with tqdm(total=len(steps), desc="export", unit="step", disable=not progress) as bar:

        def step(name: str) -> None:
            bar.set_postfix_str(name)
            bar.update()

        bar.set_postfix_str(steps[0])
        model, tower = _load(source, declared)
        tokenizer = _tokenizer(source, model.config.lm)
        hidden = model.lm.get_input_embeddings().embedding_dim
        layout = _cache_layout(model.lm, hidden)  # before any export: an LM that cannot be exported fails fast

        def write(work: Path) -> None:
            step(steps[1])
            prefix_diff = _export_mapper(model, work / MAPPER_FILE)
            step(steps[2])
            logit_diff = _export_decoder(model.lm, layout, hidden, model.config.prefix_tokens, work / DECODER_FILE)
            if int8:
                step("int8")
                _quantize_int8(work / DECODER_FILE)
            step("writing")
            tokenizer.save_pretrained(work)
            if tower is not None:
                _keep_tower(source, tower, work)
            else:
                _copy_encoder(source, model.config.clip_model, work)
            if (source / GENERATION_CONFIG).is_file():  # the model's decoding defaults
                shutil.copy(source / GENERATION_CONFIG, work / GENERATION_CONFIG)
            config = json.loads((source / CONFIG_NAME).read_text(encoding="utf-8"))  # as written, fields kept
            config[EXPORT_KEY] = {
                "format": FORMAT,
                "mapper": MAPPER_FILE,
                "decoder": DECODER_FILE,
                "int8": int8,
                "num_layers": layout[0],
                "num_kv_heads": layout[1],
                "head_dim": layout[2],
                "max_prefix_diff": prefix_diff,
                "max_logit_diff": logit_diff,  # fp32 graph against PyTorch, before any int8 quantization
                "torch": torch.__version__,
            }
            if tower is not None:
                config[EXPORT_KEY][VISION_TOWER_KEY] = VISION_TOWER_FILE
            (work / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

        out = write_dir(out_dir, EXPORTED, COMMAND, write, **where)
        bar.update()
    return out
