"""ExportedModel: a model dir written by `clipcap export`, run by ONNX Runtime on the CPU.

The dir holds config.json (the ClipCapConfig fields plus an "export" entry naming the format and the graph files),
mapper.onnx (CLIP embedding or image tokens -> prefix), decoder.onnx (the LM with its KV cache), the tokenizer and
the encoder: the encoder dir the source carried, or, exported from a complete dir, its vision tower
(vision_tower.safetensors) and image processor. ExportedModel has the `config` and `generate(clip_embeds, ...)` that
Captioner uses, so captioning is unchanged. Decoding is transformers' own `generate` (greedy, beams, sampling,
stopping) over `OrtCausalLM` (clipcap.ort_lm), a GenerationMixin model whose forward runs the decoder graph: no
search of our own.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import CONFIG_NAME, ClipCapConfig
from .errors import ClipCapError
from .generation import FROM_CONFIG, generate_from_prefix, pad_token_id

EXPORT_KEY = "export"
FORMAT = "onnx"
MAPPER_FILE = "mapper.onnx"
DECODER_FILE = "decoder.onnx"
# An exported complete model keeps its encoder: the vision tower's weights (named by this export entry) and the
# image processor's files sit in the dir itself.
VISION_TOWER_KEY = "vision_tower"
VISION_TOWER_FILE = "vision_tower.safetensors"


def mapper_input_name(config: ClipCapConfig) -> str:
    """The mapper graph's input: pooled CLIP embeddings, or image tokens for a model that reads them."""
    return "clip_embeds" if config.token_shape is None else "image_tokens"


def decoder_input_names(num_layers: int) -> list[str]:
    return ["inputs_embeds", "input_ids", "attention_mask"] + [f"past.{i}" for i in range(2 * num_layers)]


def _read_config(path: Path) -> dict | None:
    try:
        data = json.loads((path / CONFIG_NAME).read_text())
    except (OSError, ValueError, RecursionError):  # RecursionError: JSON nested too deep for the parser
        return None  # no or unreadable config: not ours to judge here, the PyTorch loader reports it
    return data if isinstance(data, dict) else None


def is_exported(path: str | Path) -> bool:
    """Whether `path` is a dir whose config.json says it was written by `clipcap export`."""
    data = _read_config(Path(path))
    return data is not None and EXPORT_KEY in data


def open_session(path: Path, threads: int):
    """An ONNX Runtime CPU session on the graph file, or ClipCapError naming the file and what is wrong with it."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ClipCapError("exported models run on ONNX Runtime: pip install 'clipcap-hf[cpu]'") from None
    if not path.is_file():
        raise ClipCapError(f"{path.parent} is an incomplete exported model: {path.name} is missing")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: ONNX Runtime's own warnings would bypass our messages
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own pybind exception types for bad files
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ClipCapError(f"{path} is not a loadable ONNX model ({reason[:200]})") from None


def _export_entry(path: Path, data: dict) -> dict:
    entry = data.get(EXPORT_KEY)
    if not isinstance(entry, dict) or entry.get("format") != FORMAT:
        raise ClipCapError(f"{path / CONFIG_NAME} has an '{EXPORT_KEY}' entry this version cannot read: {entry!r:.100}")
    for key in ("mapper", "decoder"):
        name = entry.get(key)
        if not isinstance(name, str) or Path(name).name != name or not name.endswith(".onnx"):
            raise ClipCapError(f"{path / CONFIG_NAME}: export.{key} must name an .onnx file in the dir, got {name!r}")
    tower = entry.get(VISION_TOWER_KEY)
    if tower is not None and (
        not isinstance(tower, str) or Path(tower).name != tower or not tower.endswith(".safetensors")
    ):
        raise ClipCapError(
            f"{path / CONFIG_NAME}: export.{VISION_TOWER_KEY} must name a .safetensors file in the dir, got {tower!r}"
        )
    if tower is not None and not (path / tower).is_file():
        raise ClipCapError(f"{path} is an incomplete exported model: {tower} is missing")
    if not isinstance(entry.get("num_layers"), int) or isinstance(entry["num_layers"], bool) or entry["num_layers"] < 1:
        raise ClipCapError(f"{path / CONFIG_NAME}: export.num_layers must be a positive integer")
    return entry


def _check_names(session, want: list[str], path: Path) -> None:
    got = [i.name for i in session.get_inputs()]
    if got != want:
        raise ClipCapError(f"{path} takes inputs {got[:4]}..., not those of a clipcap export ({want[:4]}...)")


class ExportedModel:
    """An exported model dir (see the module doc): `config`, `prefix(clip_embeds)` and `generate(clip_embeds, ...)`
    with ClipCapModel's semantics."""

    def __init__(self, config: ClipCapConfig, mapper, lm, export: dict):
        self.config = config
        self.mapper = mapper
        self.lm = lm
        self.export = export

    device = torch.device("cpu")

    @classmethod
    def from_pretrained(cls, path: str | Path, threads: int | None = None) -> ExportedModel:
        """Load an exported dir; `threads` for ONNX Runtime (default: torch's thread count)."""

        from .ort_lm import OrtCausalLM  # transformers' model classes: imported when an exported model is loaded

        path = Path(path)
        data = _read_config(path)
        if data is None or EXPORT_KEY not in data:
            raise ClipCapError(f"{path} is not an exported model dir (no '{EXPORT_KEY}' entry in {CONFIG_NAME})")
        entry = _export_entry(path, data)
        config = ClipCapConfig.from_dict({k: v for k, v in data.items() if k != EXPORT_KEY})
        if config.text_config is None:
            raise ClipCapError(f"{path / CONFIG_NAME} has no text_config describing the language model")
        threads = threads or torch.get_num_threads()
        files = [path / entry["mapper"], path / entry["decoder"]]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ClipCapError(f"{path} is an incomplete exported model: {', '.join(missing)} missing")
        mapper = open_session(files[0], threads)
        _check_names(mapper, [mapper_input_name(config)], files[0])
        decoder = open_session(files[1], threads)
        _check_names(decoder, decoder_input_names(entry["num_layers"]), files[1])
        return cls(config, mapper, OrtCausalLM(config.text_config, decoder), entry)

    def eval(self) -> ExportedModel:
        return self

    @property
    def pad_token_id(self) -> int:
        return pad_token_id(self.config.pad_token_id, self.lm.config)

    def prefix(self, clip_embeds: torch.Tensor) -> torch.Tensor:
        """Map CLIP embeddings (B, clip_dim), or image tokens (B, T, D) when config.token_shape is set, to the
        prefix embeddings, as ClipCapModel.prefix does."""
        self.config.check_mapper_input(tuple(clip_embeds.shape))
        x = clip_embeds.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.mapper.run(None, {mapper_input_name(self.config): x})[0])

    def generate(
        self,
        clip_embeds: torch.Tensor,
        max_new_tokens: int = 67,
        num_beams: int = 1,
        do_sample: bool = False,
        num_return_sequences: int = 1,
        stop_token_id=FROM_CONFIG,
        input_ids: torch.Tensor | None = None,
        **generate_kwargs,
    ) -> torch.LongTensor:
        """As ClipCapModel.generate: new token ids, padded after the stop token (`stop_token_id=None`: no stop).
        Prompts (`input_ids`) are not exported: the decoder graph starts from the prefix alone."""
        if input_ids is not None:
            raise ClipCapError("an exported model cannot continue a prompt: caption with the model dir it came from")
        stop = self.config.stop_token_id if stop_token_id is FROM_CONFIG else stop_token_id
        return generate_from_prefix(
            self.lm,
            self.prefix(clip_embeds),
            stop,
            self.pad_token_id,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            do_sample=do_sample,
            num_return_sequences=num_return_sequences,
            **generate_kwargs,
        )
