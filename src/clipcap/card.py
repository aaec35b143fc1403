"""Model cards: the README.md a model dir carries on the Hugging Face Hub.

YAML front matter (built with huggingface_hub's ModelCardData): `pipeline_tag: image-to-text`, `library_name`,
tags, the base models (LM and image encoder, when they are Hub ids), datasets and metrics read from a metrics.json
in the model dir or beside it (written by `clipcap evaluate` or `clipcap demo`), and the licence. The text says how
to caption with `pipeline` and with clipcap, and how the model was trained (the saved train config).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ClipCapConfig
from .errors import ClipCapError
from .exported import is_exported
from .hub import is_hub_id
from .options import check_options, option
from .outputs import check_file, write_file

CARD_NAME = "README.md"
DISTRIBUTION = "clipcap-hf"  # the PyPI name: `clipcap` there is an unrelated package
METRICS_NAME = "metrics.json"
TRAIN_CONFIG_NAME = "train_config.json"  # written by `clipcap train` in the run dir
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# clipcap's metric names -> the Hub's metric ids
METRIC_IDS = {
    "BLEU-1": "bleu",
    "BLEU-2": "bleu",
    "BLEU-3": "bleu",
    "BLEU-4": "bleu",
    "METEOR": "meteor",
    "ROUGE-L": "rouge",
    "CIDEr": "cider",
    "SPICE": "spice",
    "CLIPScore": "clipscore",
    "RefCLIPScore": "clipscore",
    "single": "accuracy",
    "objects": "accuracy",
    "images_exact": "accuracy",
}
DEMO_METRIC_NAMES = {
    "single": "colour-shape binding, one-object images",
    "objects": "colour-shape binding, all objects",
    "images_exact": "images with every object right",
}


@dataclass(kw_only=True)
class CardConfig:
    """What `clipcap card` writes (`clipcap push` writes the same card before uploading)."""

    model_dir: str = option(positional=True, help="model dir to describe")
    out: str | None = option(None, help="file to write the card to", default_text="README.md in the model dir")
    overwrite: bool = option(False, help="replace the card an earlier `clipcap card` wrote there")
    repo_id: str | None = option(
        None, help="Hub repo id the usage examples load, e.g. you/clipcap-coco", default_text="the dir's name"
    )
    license: str = option("unknown", help="licence of the weights, as a Hub licence id (mit, apache-2.0, ...)")
    metrics: str | None = option(
        None, help="metrics file to report", default_text="metrics.json in the model dir, else beside it"
    )

    def __post_init__(self) -> None:
        check_options(self)


@dataclass
class _Results:
    dataset: str
    dataset_id: str | None  # set when the data is a Hub dataset
    splits: dict[str, dict[str, float]]  # split -> metric name -> value


def _hub_id(name: str | None, model_dir: Path) -> str | None:
    """`name` (a dataset the user named) when it names a Hub repo rather than a local path."""
    if not name or Path(name).expanduser().exists() or (model_dir / name).exists():
        return None
    return name if HUB_ID.match(name) else None


def _config_hub_id(name: str | None, model_dir: Path) -> str | None:
    """`name` (from the model dir's config.json) when it names a Hub repo: what is in the model dir or written as
    a path is not, whatever the working directory holds (a config's names resolve from the model dir)."""
    if not name or (model_dir / name).exists():
        return None
    return name if is_hub_id(name) else None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ClipCapError(f"{path} is not readable JSON: {str(e).splitlines()[0]}") from None


def _numbers(metrics: Any) -> dict[str, float]:
    if not isinstance(metrics, dict):
        return {}
    return {
        k: float(v)
        for k, v in metrics.items()
        if k in METRIC_IDS and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def _results(data: Any, model_dir: Path) -> tuple[_Results | None, dict | None]:
    """Results and the training recipe from a metrics.json of `clipcap evaluate` or of `clipcap demo`."""
    if not isinstance(data, dict):
        return None, None
    variants = data.get("variants")
    if isinstance(variants, dict) and data.get("best") in variants:  # clipcap demo: the better variant is the model
        best = variants[data["best"]]
        splits = {s: _numbers(best.get(s)) for s in ("test", "novel") if isinstance(best, dict)}
        recipe = best.get("recipe") if isinstance(best, dict) else None
        return _Results("shapes world (clipcap demo, synthetic)", None, {s: m for s, m in splits.items() if m}), recipe
    settings = data.get("settings") if isinstance(data.get("settings"), dict) else {}
    numbers = _numbers(data)
    if not numbers:
        return None, None
    source = str(settings.get("data") or settings.get("references") or "unnamed data")
    split = str(settings.get("split") or "all")
    return _Results(Path(source).name or source, _hub_id(source, model_dir), {split: numbers}), None


def _train_config(model_dir: Path) -> dict | None:
    for candidate in (model_dir / TRAIN_CONFIG_NAME, model_dir.parent / TRAIN_CONFIG_NAME):
        if candidate.is_file():
            data = _read_json(candidate)
            return data if isinstance(data, dict) else None
    return None


def build_card(cfg: CardConfig, complete: bool | None = None):
    """The model card of `cfg.model_dir` as a huggingface_hub ModelCard. Its usage examples are the ones that
    work on that dir (`complete=True`: on the complete dir `push` makes of it)."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    model_dir = Path(cfg.model_dir)
    config = ClipCapConfig.from_pretrained(model_dir)
    if cfg.metrics is not None:
        metrics_file: Path | None = Path(cfg.metrics)
        if not metrics_file.is_file():
            raise ClipCapError(f"metrics file not found: {metrics_file}")
    else:
        metrics_file = next(
            (p for p in (model_dir / METRICS_NAME, model_dir.parent / METRICS_NAME) if p.is_file()), None
        )
    results, recipe = _results(_read_json(metrics_file), model_dir) if metrics_file else (None, None)
    training = _train_config(model_dir) or recipe
    repo = cfg.repo_id or model_dir.resolve().name
    lm, encoder = _config_hub_id(config.lm, model_dir), _config_hub_id(config.clip_model, model_dir)
    eval_results = [
        EvalResult(
            task_type="image-to-text",
            dataset_type=results.dataset_id or results.dataset,
            dataset_name=results.dataset,
            dataset_split=split,
            metric_type=METRIC_IDS[name],
            metric_name=DEMO_METRIC_NAMES.get(name, name),
            metric_value=round(value, 4),
        )
        for split, numbers in (results.splits.items() if results else [])
        for name, value in numbers.items()
    ]
    data = ModelCardData(
        license=cfg.license,
        library_name="transformers",
        pipeline_tag="image-to-text",
        tags=["clipcap", "image-captioning", "custom_code"],
        base_model=[m for m in (lm, encoder) if m] or None,
        datasets=[results.dataset_id] if results and results.dataset_id else None,
        metrics=sorted({METRIC_IDS[n] for r in (results.splits.values() if results else []) for n in r}) or None,
        model_name=repo if eval_results else None,
        eval_results=eval_results or None,
    )
    kind = "exported" if is_exported(model_dir) else "complete" if complete or config.vision_config else "model"
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{_body(config, repo, results, training, kind)}")


def _usage(repo: str, kind: str) -> list[str]:
    """How to caption with the dir, by what it is: a complete dir runs in transformers' pipeline and in clipcap; a
    ClipCapModel dir (its encoder named by `clip_model`) and an exported dir run in clipcap only."""
    captioner = [
        "```python",
        "from clipcap import Captioner",
        "",
        f'captions = Captioner.from_pretrained("{repo}").caption(["photo.jpg"], num_beams=5)',
        "print(captions)  # one caption per image",
        "```",
    ]
    if kind == "exported":
        return [
            f"An ONNX Runtime export for the CPU; with clipcap (`pip install '{DISTRIBUTION}[cpu]'`):",
            "",
            *captioner,
        ]
    lines = [f"With clipcap (`pip install {DISTRIBUTION}`; no `trust_remote_code` needed once it is imported):", ""]
    lines += captioner
    if kind == "complete":
        return [
            "With transformers alone (the model code ships in this repo):",
            "",
            "```python",
            "from transformers import pipeline",
            "",
            f'captioner = pipeline("image-text-to-text", model="{repo}", trust_remote_code=True)',
            'print(captioner(images=["photo.jpg"], text=[""]))  # [{"input_text": "", "generated_text": "..."}]',
            'print(captioner(images=["photo.jpg"], text=["a picture of"]))  # the caption continues the prompt',
            "```",
            "",
            *lines,
        ]
    return lines + [
        "",
        "This dir names its image encoder instead of holding it, so transformers' `pipeline` cannot load it as it is; "
        f'`Captioner.from_pretrained("{repo}").save_pretrained("{repo}-complete")` writes a complete copy that it '
        "can (`clipcap push` uploads one).",
    ]


def _body(config: ClipCapConfig, repo: str, results: _Results | None, training: dict | None, kind: str) -> str:
    lm_state = "fine-tuned" if config.tune_lm else "frozen"
    if config.token_shape is None:
        reads = "the image encoder's embedding goes"
    else:
        grid = (
            f", the patch grid average-pooled to {config.token_grid} × {config.token_grid}" if config.token_grid else ""
        )
        reads = f"the image encoder's last hidden states ({config.token_shape[0]} tokens{grid}; beyond the paper) go"
    lines = [
        f"# {repo.split('/')[-1]}",
        "",
        "An image captioning model trained with clipcap, an implementation of *ClipCap: CLIP Prefix for Image "
        f"Captioning* ([Mokady, Hertz, Bermano 2021](https://arxiv.org/abs/2111.09734)): {reads} "
        f"through {'an MLP' if config.mapping == 'mlp' else 'a Transformer'} mapping network to "
        f"a prefix of {config.prefix_tokens} vectors, which the {lm_state} language model `{config.lm}` continues "
        f"with the caption. Image encoder: `{config.clip_model}`.",
        "",
        "## Usage",
        "",
        *_usage(repo, kind),
    ]
    if results:
        lines += ["", "## Evaluation", "", f"On {results.dataset}:", ""]
        names = list(dict.fromkeys(n for numbers in results.splits.values() for n in numbers))
        lines.append("| split | " + " | ".join(DEMO_METRIC_NAMES.get(n, n) for n in names) + " |")
        lines.append("|---" * (len(names) + 1) + "|")
        for split, numbers in results.splits.items():
            cells = [f"{numbers[n]:.3f}" if n in numbers else "–" for n in names]
            lines.append(f"| {split} | " + " | ".join(cells) + " |")
    if training:
        lines += [
            "",
            "## Training",
            "",
            "The training settings, as saved by clipcap:",
            "",
            "```json",
            json.dumps(training, indent=2, default=str),
            "```",
        ]
    return "\n".join(lines) + "\n"


def write_card(cfg: CardConfig, complete: bool | None = None) -> Path:
    """Write the model card (README.md in the model dir unless `cfg.out` says otherwise); returns its path. The card
    follows the output policy (`outputs.py`): a README.md the user wrote is never replaced, an earlier card only with
    `overwrite`. `complete=True`: the card of the complete dir `push` makes of the model dir."""
    out = Path(cfg.out) if cfg.out else Path(cfg.model_dir) / CARD_NAME
    where = dict(inputs=[cfg.metrics], hosts=[cfg.model_dir], overwrite=cfg.overwrite)
    check_file(out, "clipcap card", **where)
    card = str(build_card(cfg, complete))
    return write_file(out, "clipcap card", lambda tmp: tmp.write_text(card, encoding="utf-8"), **where)
