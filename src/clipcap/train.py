"""Training ClipCap on an embedding store: `train(TrainConfig(...))` -> RUN_DIR.

Hugging Face Accelerate runs the loop, so one script works on a CPU, one GPU, or many GPUs/nodes under `torchrun` /
`accelerate launch` (DDP), with bf16/fp16 autocast on GPU. The pieces live beside it: the tokenised pairs in
`data/pairs.py`, checkpoints in `checkpoint.py`; `Trainer.run` is the loop, read top to bottom.

- The sample order of epoch e is a pure function of (seed, e) (torch's DistributedSampler), so a checkpoint only has
  to record the optimizer step, and resuming continues bit-for-bit where the last intact checkpoint left off.
- `text_only` is CapDec (Nukrai et al. 2022): train from CLIP *text* embeddings of the captions with Gaussian noise
  injected, then caption images with the same CLIP's image tower.
- `lm_text` mixes plain language-model loss on packed blocks of a text file into a tuned LM's training, to keep word
  combinations the caption pairs never show.

Outputs: RUN_DIR/metrics.jsonl (one JSON object per log line), RUN_DIR/loss.png, RUN_DIR/final/ and (with validation
data) RUN_DIR/best/ model dirs that `Captioner.from_pretrained` loads. Messages go to the "clipcap.train" logger.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint as ckpt
from .config import MAPPINGS
from .data.pairs import CaptionPairs, PackedText
from .errors import ClipCapError
from .lora import add_lora, load_adapter_weights
from .model import ClipCapModel
from .options import check_options, option
from .outputs import RUN, claim_dir, replace_atomically, writing
from .start import (
    build_model,
    caption_budget,
    lm_positions,
    load_start_model,
    make_accelerator,
    open_store,
    start_from,
    start_tokenizer,
)

logger = logging.getLogger("clipcap.train")

METRICS = "metrics.jsonl"
SKIPPED = "skipped.jsonl"
CONFIG = "train_config.json"
COMMAND = "clipcap train"
# What a run writes in RUN_DIR, deleted by `overwrite`.
RUN_ENTRIES = (ckpt.CHECKPOINTS, "final", "best", METRICS, "loss.png", SKIPPED, CONFIG, "tensorboard")
REPORT_TO = ("none", "tensorboard", "wandb")
WARMUP_FRACTION = 0.1  # the original's 5000 warm-up steps were 3.5 % of its run; never warm up for more than 10 %
# What a resumed run may change: the schedule and the optimizer's settings (applied from the resumed step on, e.g. a
# lower `lr` after the loss diverged), precision, and how often it logs, validates and saves. Anything else decides
# the model or the sample order, and resuming with another value is refused (`resume_changes`).
RESUMABLE = (
    "epochs",
    "lr",
    "lm_lr",
    "warmup_steps",
    "weight_decay",
    "max_grad_norm",
    "mixed_precision",
    "val_every",
    "num_samples",
    "log_every",
    "save_every",
    "keep_checkpoints",
    "report_to",
)
PATHS = ("data", "val_data", "lm", "lm_text", "init_from")


@dataclass(kw_only=True)
class TrainConfig:
    """Everything a training run takes; defaults are the original implementation's (docs/design.md)."""

    data: str = option(help="embedding store to train on (made by `clipcap embed`)")
    out: str = option(help="run dir to write (RUN_DIR)")
    overwrite: bool = option(
        False, help="start the run in RUN_DIR over: its earlier checkpoints and models are deleted (other files kept)"
    )
    lm: str = option("gpt2", help="HF id or dir of the causal LM and its tokenizer")
    mapping: str = option("mlp", choices=MAPPINGS, help="mapping network")
    prefix_length: int = option(10, min=1, help="prefix length k")
    clip_length: int | None = option(None, min=1, help="transformer mapper's clip_length", default_text="k")
    num_layers: int = option(8, min=1, help="transformer mapper layers")
    tune_lm: bool | None = option(
        None,
        pair=("tune-lm", "frozen-lm"),
        pair_help=(
            "train the LM too (default for the MLP mapper)",
            "train only the mapping network (default for the Transformer mapper, the paper's pairing)",
        ),
        help="whether the LM is trained",
        default_text="tuned for mlp, frozen for transformer",
    )
    epochs: int = option(10, min=1, help="passes over every (image, caption) pair")
    batch_size: int = option(40, min=1, help="pairs per batch per process")
    lr: float = option(2e-5, min=1e-12, help="AdamW learning rate")
    lm_lr: float | None = option(
        None, min=1e-12, help="separate, e.g. lower, learning rate for a tuned LM", default_text="lr"
    )
    warmup_steps: int = option(
        5000, min=0, help="linear warm-up steps, then linear decay to 0 (clipped to 10% of a shorter run)"
    )
    weight_decay: float = option(0.0, min=0.0, help="AdamW weight decay (0, as the original)")
    grad_accum: int = option(1, min=1, help="micro-batches accumulated per optimizer step")
    max_grad_norm: float | None = option(None, min=0.0, help="clip the gradient norm to this", default_text="off")
    max_caption_tokens: int = option(
        67, min=2, help="longest caption in tokens, end token included; longer ones are skipped and counted"
    )
    mixed_precision: str = option(
        "auto",
        choices=("auto", "no", "fp16", "bf16"),
        help="autocast precision (auto: bf16, or fp16 without bf16 support, on GPU; fp32 on CPU)",
    )
    seed: int = option(0, help="seed of initialisation, sample order and noise")
    split: str | None = option(None, help="train only on images of this split of the data", default_text="all")
    val_data: str | None = option(None, help="embedding store for validation loss and sample captions")
    val_split: str | None = option(
        None, help="split of the validation store (or of the training store when there is none) to validate on"
    )
    val_every: int = option(0, min=0, help="validate every N steps as well as after each epoch")
    num_samples: int = option(4, min=0, help="sample captions logged per validation")
    log_every: int = option(50, min=1, help="log the training loss every N steps")
    save_every: int = option(1000, min=1, help="checkpoint every N steps and after each epoch")
    keep_checkpoints: int = option(2, min=1, help="checkpoints kept, newest first")
    resume: bool = option(
        False,
        help="continue RUN_DIR from its newest intact checkpoint exactly where it stopped (starts fresh if none); the "
        "schedule, optimizer, precision and logging options may change and are recorded, any other must be as before",
    )
    text_only: bool = option(
        False, help="CapDec: train on CLIP text embeddings (a store made with text_only) with noise injected"
    )
    noise_variance: float = option(0.016, min=0.0, help="text-only Gaussian noise variance")
    lm_text: str | None = option(None, help="plain-text file (one passage per line) for extra LM loss")
    lm_text_weight: float = option(0.0, min=0.0, help="weight of the LM-text loss (0: off)")
    lm_text_block: int = option(64, min=1, help="tokens per packed LM-text block")
    init_from: str | None = option(
        None,
        help="start mapper and LM from this model dir or Hub id (a trained or converted model): its config decides "
        "mapping, prefix length, LM and stop token",
        default_text="a fresh mapper",
    )
    lora_r: int = option(
        0,
        min=0,
        help="LoRA rank (peft) on the LM: only the mapper and the adapters train, the LM stays as it is (0: off)",
    )
    lora_alpha: float | None = option(None, min=1e-12, help="LoRA scaling alpha", default_text="2 x lora_r")
    lora_dropout: float = option(0.05, min=0.0, help="dropout on the LoRA adapters' input")
    lora_target_modules: list[str] | None = option(
        None,
        help="LM modules that get adapters (names or name suffixes); for captions in words the LM rarely saw, adapt "
        "every linear layer (GPT-2: c_attn,c_proj,c_fc)",
        default_text="the attention projections: c_attn for GPT-2, q_proj,v_proj for OPT/Llama",
    )
    report_to: str = option(
        "none",
        choices=REPORT_TO,
        help="experiment tracker for losses and learning rate (as well as metrics.jsonl and loss.png); "
        "tensorboard writes under RUN_DIR/tensorboard",
    )
    tokens: bool = option(
        False,
        help="the mapper reads the store's image tokens (a store embedded with `tokens`) instead of one pooled "
        "vector: the MLP flattened, the transformer one input per token",
    )

    def __post_init__(self) -> None:
        check_options(self)
        if self.resume and self.overwrite:
            raise ClipCapError("`resume` continues the run in `out` and `overwrite` starts it over: choose one")
        if self.lora_r and self.tune_lm:
            raise ClipCapError("`lora_r` trains adapters on an LM that stays as it is: it excludes `tune_lm`")
        if self.lora_dropout >= 1:
            raise ClipCapError(f"`lora_dropout` must be below 1, got {self.lora_dropout}")
        targets = self.lora_target_modules
        if targets is not None and not all(m.strip() for m in targets):
            raise ClipCapError(f"`lora_target_modules` must name modules, got {self.lora_target_modules!r}")
        if self.tokens and self.text_only:
            raise ClipCapError("`tokens` and `text_only` exclude each other: text embeddings have no image tokens")
        if not self.lm_tuned and not self.lora_r and self.lm_lr is not None:
            raise ClipCapError("`lm_lr` needs `tune_lm` or `lora_r`: a frozen LM is not trained")
        if not self.lm_tuned and self.lm_text_weight > 0:
            raise ClipCapError("`lm_text` needs `tune_lm`: a frozen LM cannot forget anything")
        if (self.lm_text is None) != (self.lm_text_weight == 0):
            raise ClipCapError("`lm_text` FILE and `lm_text_weight` W (> 0) go together")
        self._check_no_ops()

    def _check_no_ops(self) -> None:
        """Refuse an option that, with the others as they are, would do nothing (what was typed is never ignored)."""
        changed = {f.name for f in dataclasses.fields(self) if getattr(self, f.name) != f.default}
        needs = [
            (
                {"lora_alpha", "lora_dropout", "lora_target_modules"},
                self.lora_r > 0,
                "configures LoRA: it needs `lora_r`",
            ),
            ({"noise_variance"}, self.text_only, "is CapDec's noise for `text_only` training: it needs `text_only`"),
            ({"lm_text_block"}, self.lm_text is not None, "packs the `lm_text` file: it needs `lm_text`"),
            (
                {"val_every"},
                self.val_data is not None or self.val_split is not None,
                "validates: it needs `val_data` or `val_split`",
            ),
        ]
        if self.init_from is None:  # a warm start's model decides the mapping (start.start_from)
            needs.append(
                (
                    {"clip_length"},
                    self.mapping == "transformer" and not self.tokens,
                    "sizes the Transformer mapper's pooled input: it needs `mapping` transformer without `tokens`",
                )
            )
        for names, ok, why in needs:
            given = sorted(names & changed)
            if given and not ok:
                raise ClipCapError(f"`{given[0]}` {why}")

    @property
    def lm_tuned(self) -> bool:
        """Whether the LM trains: `tune_lm`, or by default the paper's pairing (tuned with the MLP mapper)."""
        return self.tune_lm if self.tune_lm is not None else self.mapping == "mlp" and not self.lora_r


def noise_injection(clip_embeds: torch.Tensor, variance: float) -> torch.Tensor:
    """CapDec's noise: L2-normalise, add N(0, variance) per dimension, L2-normalise again."""
    x = F.normalize(clip_embeds.float(), dim=-1)
    x = x + torch.randn_like(x) * math.sqrt(variance)
    return F.normalize(x, dim=-1)


class Objective(nn.Module):
    """What DDP wraps: caption loss (with CapDec noise when training text-only) and the optional plain LM loss."""

    def __init__(self, model: ClipCapModel, noise_variance: float = 0.0):
        super().__init__()
        self.model = model
        self.noise_variance = noise_variance

    def forward(self, clip_embeds, input_ids, attention_mask, lm_ids=None):
        if self.training and self.noise_variance > 0:
            clip_embeds = noise_injection(clip_embeds, self.noise_variance)
        loss = self.model(clip_embeds, input_ids, attention_mask=attention_mask, labels=input_ids).loss
        lm_loss = self.model.lm(input_ids=lm_ids, labels=lm_ids).loss if lm_ids is not None else None
        return loss, lm_loss


def plot_losses(runs: dict[str, Path], png: Path, log_scale: bool = False) -> Path:
    """Training (line) and validation (dashed, dots) loss against the step, for the metrics.jsonl of each run
    (title -> file; an empty title for a single run), as a PNG (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for title, metrics_file in runs.items():
        rows = [json.loads(line) for line in Path(metrics_file).read_text().splitlines() if line.strip()]
        train = [(r["step"], r["loss"]) for r in rows if r.get("type") == "train"]
        val = [(r["step"], r["val_loss"]) for r in rows if r.get("type") == "val"]
        if not train:
            continue
        (line,) = ax.plot(*zip(*train, strict=True), label=f"{title} (train)" if title else "train")
        if val:
            label = f"{title} (validation)" if title else "validation"
            ax.plot(*zip(*val, strict=True), "o--", color=line.get_color(), label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("caption cross-entropy")
    if log_scale:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        replace_atomically(png, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)
    return png


def resume_settings(cfg: dict) -> dict:
    """A run's settings (`dataclasses.asdict(TrainConfig)`) as they act: local paths absolute, and the values the
    options resolve to (`tune_lm` by the mapping, `clip_length`, `lora_alpha`), fields that do nothing dropped; what
    a checkpoint is compared on when a run resumes. `out` and `resume` are left out: a run dir may move."""
    settings = {k: v for k, v in cfg.items() if k not in ("out", "resume")}
    for name in PATHS:
        value = settings.get(name)
        if isinstance(value, str) and Path(value).expanduser().exists():
            settings[name] = str(Path(value).expanduser().resolve())
    mapping, lora_r = cfg.get("mapping"), cfg.get("lora_r") or 0
    if cfg.get("tune_lm") is None:
        settings["tune_lm"] = mapping == "mlp" and not lora_r
    transformer = mapping == "transformer" and not cfg.get("tokens")
    settings["clip_length"] = (cfg.get("clip_length") or cfg.get("prefix_length")) if transformer else None
    if mapping != "transformer":
        settings["num_layers"] = None  # the MLP mapper has no layers to count
    if lora_r:
        settings["lora_alpha"] = cfg.get("lora_alpha") or 2.0 * lora_r
    else:
        settings.update(lora_alpha=None, lora_dropout=None, lora_target_modules=None)
    return settings


def resume_changes(recorded: dict, cfg: TrainConfig, where: Path) -> dict[str, tuple]:
    """{option: (recorded, now)} for the resumable options that differ from the checkpoint's `recorded` settings;
    ClipCapError listing every other one that differs (old -> new), which would change the model or the order."""
    old, new = resume_settings(recorded), resume_settings(dataclasses.asdict(cfg))
    changed = {k: (old[k], new[k]) for k in new if k in old and old[k] != new[k]}
    fixed = {k: v for k, v in changed.items() if k not in RESUMABLE}
    if fixed:
        shown = ", ".join(f"`{k}` {json.dumps(a)} -> {json.dumps(b)}" for k, (a, b) in sorted(fixed.items()))
        raise ClipCapError(
            f"cannot resume {where} with other settings than it was trained with: {shown}; a resumed run may change "
            f"only {', '.join(f'`{k}`' for k in RESUMABLE)} (use another run dir for the rest)"
        )
    return changed


# -- the trainer ---------------------------------------------------------------------------------------------------
class Trainer:
    """One training run; `Trainer(cfg).run()` trains and returns RUN_DIR. `train(cfg)` is the public entry."""

    def __init__(self, cfg: TrainConfig, progress: bool = False):
        from accelerate.utils import set_seed
        from transformers import get_linear_schedule_with_warmup

        self.cfg, self.progress = cfg, progress
        self.run_dir = Path(cfg.out)
        self.accelerator = make_accelerator(cfg.mixed_precision, cfg.report_to, self.run_dir)
        self.world = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        self.main = self.accelerator.is_main_process
        self._check_run_dir()

        self.store = open_store(cfg)
        if cfg.init_from is not None:
            self.cfg = cfg = start_from(cfg, self.store)
        # Compared before any model is built: another mapping or store must be one clear error, not a shape mismatch.
        self.resume_point, self.changes = None, {}
        if cfg.resume:
            self.resume_point = ckpt.newest_intact_checkpoint(self.run_dir, self.world)
            if self.resume_point[0] is not None:
                recorded = ckpt.read_state(self.resume_point[0]).get("config") or {}
                self.changes = resume_changes(recorded, cfg, self.resume_point[0])
        self.tokenizer = start_tokenizer(cfg)
        if self.tokenizer.eos_token_id is None:
            raise ClipCapError(f"the tokenizer of {cfg.lm} has no end token to end captions with")
        set_seed(cfg.seed)
        if cfg.init_from is not None:
            self.model = load_start_model(cfg, self.store)
        else:
            self.model = build_model(cfg, self.store, self.tokenizer)
        if cfg.lora_r:
            add_lora(
                self.model, cfg.lora_r, cfg.lora_alpha or 2.0 * cfg.lora_r, cfg.lora_dropout, cfg.lora_target_modules
            )
        self.max_tokens = caption_budget(cfg, self.model)
        show = progress and self.main
        self.pairs = CaptionPairs(self.store, self.tokenizer, self.max_tokens, "train", show, cfg.tokens)
        if len(self.pairs) == 0:
            raise ClipCapError(f"{cfg.data} has no usable (embedding, caption) pairs ({self.pairs.skip_summary()})")
        self.val = self._val_pairs(show)
        self.lm_text = None
        if cfg.lm_text is not None:
            block = min(cfg.lm_text_block, lm_positions(self.model) or cfg.lm_text_block)
            self.lm_text = PackedText(cfg.lm_text, self.tokenizer, block, cfg.seed)

        micro_per_epoch = math.ceil(math.ceil(len(self.pairs) / self.world) / cfg.batch_size)
        self.steps_per_epoch = math.ceil(micro_per_epoch / cfg.grad_accum)
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.warmup = min(cfg.warmup_steps, int(WARMUP_FRACTION * self.total_steps))

        self.objective = Objective(self.model, cfg.noise_variance if cfg.text_only else 0.0)
        self.model.to(self.accelerator.device)
        # The fused kernel updates all parameters in one pass instead of a Python loop over them.
        fused = self.accelerator.device.type in ("cpu", "cuda")
        optimizer = torch.optim.AdamW(self._param_groups(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
        # The scheduler is stepped by hand (not prepared): accelerate would step it once per process.
        self.scheduler = get_linear_schedule_with_warmup(optimizer, self.warmup, self.total_steps)
        self.objective, self.optimizer = self.accelerator.prepare(self.objective, optimizer)
        self.step = 0
        self.best_val = math.inf
        self.last_checkpoint: Path | None = None

    def _check_run_dir(self) -> None:
        """Claim RUN_DIR as the output policy says (`outputs.py`), on the main process, before anything is loaded."""
        cfg = self.cfg
        if self.main:
            inputs = [cfg.data, cfg.val_data, cfg.init_from, cfg.lm, cfg.lm_text]
            claim_dir(
                cfg.out,
                RUN,
                COMMAND,
                RUN_ENTRIES,
                inputs=inputs,
                overwrite=cfg.overwrite,
                resume=cfg.resume,
                resumable=True,
                legacy=CONFIG,
            )
        self.accelerator.wait_for_everyone()

    def _val_pairs(self, progress: bool) -> CaptionPairs | None:
        from .data.store import EmbeddingStore

        cfg = self.cfg
        if cfg.val_data is None and cfg.val_split is None:
            return None
        store = EmbeddingStore(cfg.val_data or cfg.data, split=cfg.val_split)
        if store.clip_dim != self.store.clip_dim:
            raise ClipCapError(
                f"validation store has {store.clip_dim}-d embeddings but the training store {self.store.clip_dim}-d"
            )
        if store.clip_model and self.store.clip_model and store.clip_model != self.store.clip_model:
            raise ClipCapError(
                f"validation store was embedded with {store.clip_model} but the training store with "
                f"{self.store.clip_model}"
            )
        if cfg.tokens and (store.token_shape, store.token_grid) != (self.store.token_shape, self.store.token_grid):
            raise ClipCapError(
                f"validation store has image tokens {store.token_shape} (grid {store.token_grid}) but the training "
                f"store {self.store.token_shape} (grid {self.store.token_grid})"
            )
        pairs = CaptionPairs(store, self.tokenizer, self.max_tokens, "val", progress, cfg.tokens)
        if len(pairs) == 0:
            raise ClipCapError(f"validation data has no usable pairs ({pairs.skip_summary()})")
        return pairs

    def _param_groups(self) -> list[dict]:
        mapper = [p for p in self.model.mapper.parameters() if p.requires_grad]
        groups = [{"params": mapper, "lr": self.cfg.lr}]
        # a tuned LM's weights, or LoRA's adapters on a frozen one
        lm = [p for p in self.model.lm.parameters() if p.requires_grad]
        if lm:
            groups.append({"params": lm, "lr": self.cfg.lm_lr or self.cfg.lr})
        return groups

    # -- logging ----------------------------------------------------------------------------------------------
    def lm_state(self) -> str:
        if self.cfg.lora_r:
            return f"LM frozen, LoRA rank {self.cfg.lora_r} adapters trained"
        return "LM tuned" if self.model.config.tune_lm else "LM frozen"

    def log(self, message: str, level: int = logging.INFO) -> None:
        if self.main:
            logger.log(level, message)

    def record(self, row: dict) -> None:
        if self.main:
            with writing(self.run_dir / METRICS), open(self.run_dir / METRICS, "a") as f:
                f.write(json.dumps(row) + "\n")
        if self.cfg.report_to != "none" and row["type"] in ("train", "val"):
            scalars = {k: v for k, v in row.items() if k not in ("type", "step") and isinstance(v, (int, float))}
            self.accelerator.log({f"{row['type']}/{k}": v for k, v in scalars.items()}, step=row["step"])

    def start_tracker(self) -> None:
        """Start the `report_to` tracker (TensorBoard under RUN_DIR/tensorboard; W&B in project "clipcap")."""
        cfg = self.cfg
        if cfg.report_to == "none":
            return
        settings = {
            k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in dataclasses.asdict(cfg).items()
        }
        try:
            if cfg.report_to == "tensorboard":
                self.accelerator.init_trackers("tensorboard")
            else:
                self.accelerator.init_trackers(
                    "clipcap", config=settings, init_kwargs={"wandb": {"dir": str(self.run_dir)}}
                )
        except Exception as e:  # noqa: BLE001 - a tracker fails in its own ways (no login, no network)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            hint = " (without a network, set WANDB_MODE=offline)" if cfg.report_to == "wandb" else ""
            raise ClipCapError(f"cannot start the {cfg.report_to} tracker: {first}{hint}") from None

    # -- the epoch plan ---------------------------------------------------------------------------------------
    def epoch_steps(self, epoch: int) -> list[list[np.ndarray]]:
        """This process's optimizer steps in epoch `epoch`, each a list of micro-batches of pair rows."""
        from torch.utils.data import DistributedSampler

        sampler = DistributedSampler(
            range(len(self.pairs)), num_replicas=self.world, rank=self.rank, shuffle=True, seed=self.cfg.seed
        )
        sampler.set_epoch(epoch)
        rows = np.fromiter(iter(sampler), dtype=np.int64)
        bs, accum = self.cfg.batch_size, self.cfg.grad_accum
        micro = [rows[i : i + bs] for i in range(0, len(rows), bs)]
        return [micro[i : i + accum] for i in range(0, len(micro), accum)]

    # -- one optimizer step -----------------------------------------------------------------------------------
    def train_step(self, micro_batches: list[np.ndarray]) -> tuple[float, float | None]:
        device = self.accelerator.device
        self.objective.train()
        n = len(micro_batches)
        totals = torch.zeros(2, device=device)
        for i, rows in enumerate(micro_batches):
            batch = {k: v.to(device) for k, v in self.pairs.batch(rows).items()}
            if self.lm_text is not None:
                micro_index = self.step * self.cfg.grad_accum + i
                batch["lm_ids"] = self.lm_text.batch(micro_index, self.rank, self.world, len(rows)).to(device)
            sync = i == n - 1
            with contextlib.nullcontext() if sync else self.accelerator.no_sync(self.objective):
                loss, lm_loss = self.objective(**batch)
                total = loss if lm_loss is None else loss + self.cfg.lm_text_weight * lm_loss
                self.accelerator.backward(total / n)
            totals[0] += loss.detach().float() / n
            if lm_loss is not None:
                totals[1] += lm_loss.detach().float() / n
        # One all-reduce per step: every process sees the same (possibly non-finite) loss and stops together.
        totals = self.accelerator.reduce(totals, reduction="mean")
        if not torch.isfinite(totals).all():
            last = self.last_checkpoint or "none (nothing saved yet)"
            self.accelerator.wait_for_everyone()
            raise ClipCapError(
                f"the loss became {totals[0].item()} at step {self.step + 1} "
                f"(epoch {self.step // self.steps_per_epoch + 1}); last good checkpoint: {last}. "
                "Lower `lr` or turn `mixed_precision` to no, then resume"
            )
        if self.cfg.max_grad_norm:
            self.accelerator.clip_grad_norm_(self.objective.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        if not self.accelerator.optimizer_step_was_skipped:  # an fp16 overflow skips the update
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return totals[0].item(), totals[1].item() if self.lm_text is not None else None

    # -- validation -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> float | None:
        if self.val is None:
            return None
        model = self.accelerator.unwrap_model(self.objective).model.eval()
        device = self.accelerator.device
        sums = torch.zeros(2, device=device, dtype=torch.float64)
        rows = np.arange(self.rank, len(self.val), self.world)
        # Validation draws no random numbers, but fork anyway: it must never shift the training RNG stream.
        with torch.random.fork_rng(devices=[]), self.accelerator.autocast():
            for start in range(0, len(rows), self.cfg.batch_size):
                batch = {k: v.to(device) for k, v in self.val.batch(rows[start : start + self.cfg.batch_size]).items()}
                out = model(**batch, labels=batch["input_ids"])
                tokens = batch["attention_mask"].sum()
                sums += torch.stack([out.loss.double() * tokens, tokens.double()])
            sums = self.accelerator.reduce(sums, reduction="sum")
            val_loss = (sums[0] / sums[1]).item()
            samples = self.samples(model) if self.main and self.cfg.num_samples else []
        epoch = self.step / self.steps_per_epoch
        self.record({"type": "val", "step": self.step, "epoch": epoch, "val_loss": val_loss})
        if samples:
            self.record({"type": "samples", "step": self.step, "epoch": epoch, "samples": samples})
            for s in samples:
                self.log(f"  {s['key']}: {s['caption']!r}  (reference: {s['reference']!r})")
        self.log(f"step {self.step}: validation loss {val_loss:.4f}")
        if val_loss < self.best_val:
            self.best_val = val_loss
            if self.main:
                ckpt.save_model_dir(model, self.tokenizer, self.run_dir / "best")
        self.accelerator.wait_for_everyone()
        return val_loss

    def samples(self, model: ClipCapModel) -> list[dict]:
        """Greedy captions of the first validation images (one caption per image)."""
        seen, rows = set(), []
        for row in range(len(self.val)):
            j = int(self.val.image[row])
            if j not in seen:
                seen.add(j)
                rows.append(row)
            if len(rows) == self.cfg.num_samples:
                break
        batch = self.val.batch(rows)
        ids = model.generate(batch["clip_embeds"].to(self.accelerator.device), max_new_tokens=self.max_tokens)
        captions = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        keys = self.val.store.keys
        return [
            {
                "key": keys[int(self.val.image[r])],
                "caption": c.strip(),
                "reference": self.tokenizer.decode(self.val.token_ids(r), skip_special_tokens=True).strip(),
            }
            for r, c in zip(rows, captions, strict=True)
        ]

    # -- checkpoints ------------------------------------------------------------------------------------------
    def _identity(self) -> dict:
        """What must not change between a run and its resumption (it fixes the sample order)."""
        return {
            "pairs": len(self.pairs),
            "num_processes": self.world,
            "batch_size": self.cfg.batch_size,
            "grad_accum": self.cfg.grad_accum,
            "seed": self.cfg.seed,
            "steps_per_epoch": self.steps_per_epoch,
        }

    def save_checkpoint(self) -> None:
        from safetensors.torch import save_file

        root = self.run_dir / ckpt.CHECKPOINTS
        final, tmp = root / f"step-{self.step:08d}", root / f".step-{self.step:08d}.tmp"
        if self.main:
            scaler = self.accelerator.scaler.state_dict() if self.accelerator.scaler is not None else None
            state = {
                "step": self.step,
                "best_val": self.best_val if math.isfinite(self.best_val) else None,
                "identity": self._identity(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": scaler,
                "config": dataclasses.asdict(self.cfg),
            }
            model = self.accelerator.unwrap_model(self.objective).model
            with self._writing(tmp):
                ckpt.write_checkpoint(tmp, model, self.tokenizer, self.optimizer.state_dict(), state)
        self.accelerator.wait_for_everyone()
        with self._writing(tmp):
            save_file(ckpt.rng_state(), str(ckpt.rng_file(tmp, self.rank)))
        self.accelerator.wait_for_everyone()
        if self.main:
            ckpt.commit_checkpoint(tmp, final, self.cfg.keep_checkpoints)
        self.last_checkpoint = final
        self.accelerator.wait_for_everyone()

    @contextlib.contextmanager
    def _writing(self, tmp: Path):
        """A failed checkpoint write (disk full included) is one ClipCapError and leaves no temporary dir."""
        try:
            with writing(tmp.parent):
                yield
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def load_checkpoint(self, path: Path) -> None:
        from safetensors.torch import load_model

        state, optimizer, rng = ckpt.read_checkpoint(path, self.rank)
        if state["identity"] != self._identity():
            now = self._identity()
            changed = {k: (v, now.get(k)) for k, v in state["identity"].items() if now.get(k) != v}
            raise ClipCapError(f"cannot resume {path}: the run's sample order changed (was, now: {changed})")
        model = self.accelerator.unwrap_model(self.objective).model
        missing, unexpected = load_model(model, str(path / ckpt.WEIGHTS), strict=False)
        if model.config.adapter is not None:  # the LM is the base LM: only its adapters were saved
            load_adapter_weights(model, path / model.config.adapter)
            missing = [k for k in missing if not k.startswith("lm.")]
        if missing or unexpected:
            raise ClipCapError(f"{path} does not match this model: missing {missing[:3]}, unexpected {unexpected[:3]}")
        self.optimizer.load_state_dict(optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"] is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        ckpt.set_rng_state(rng)
        self.step = state["step"]
        self.best_val = state["best_val"] if state["best_val"] is not None else math.inf
        self.last_checkpoint = path

    def apply_changes(self) -> None:
        """Put the resumable settings that changed since the checkpoint into effect from this step on (the learning
        rates, weight decay and schedule live in the restored optimizer and scheduler state), and record them: a
        "resume" row in metrics.jsonl, train_config.json rewritten, and the next checkpoints carry them."""
        cfg, scheduler = self.cfg, self.scheduler
        rates = [cfg.lr, cfg.lm_lr or cfg.lr]
        groups = scheduler.optimizer.param_groups
        scheduler.base_lrs = rates[: len(groups)]
        for group, base, factor in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
            group.update(initial_lr=base, lr=base * factor(scheduler.last_epoch), weight_decay=cfg.weight_decay)
        scheduler._last_lr = [group["lr"] for group in groups]
        shown = ", ".join(f"{k} {json.dumps(a)} -> {json.dumps(b)}" for k, (a, b) in sorted(self.changes.items()))
        self.log(f"resumed with changed settings: {shown}")
        self.record({"type": "resume", "step": self.step, "changed": {k: list(v) for k, v in self.changes.items()}})
        if self.main:
            (self.run_dir / CONFIG).write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")

    def restore(self) -> None:
        """Resume from the newest intact checkpoint (saying which damaged ones it passed over); drop metrics logged
        after it and any half-written save."""
        if self.main:
            for tmp in (self.run_dir / ckpt.CHECKPOINTS).glob(".step-*.tmp"):
                shutil.rmtree(tmp, ignore_errors=True)
        path, damaged = self.resume_point or ckpt.newest_intact_checkpoint(self.run_dir, self.world)
        for bad, why in damaged:
            self.log(f"skipped damaged checkpoint {bad}: {why}", logging.WARNING)
        if path is None:
            self.log(f"no intact checkpoint in {self.run_dir}: starting from scratch")
            return
        self.load_checkpoint(path)
        self.log(f"resumed from {path} (step {self.step} of {self.total_steps})")
        if self.changes:
            self.apply_changes()
        metrics = self.run_dir / METRICS
        if self.main and metrics.exists():
            kept = []
            for line in metrics.read_text().splitlines():
                with contextlib.suppress(json.JSONDecodeError):  # a line cut short by the kill is dropped
                    if json.loads(line).get("step", 0) <= self.step:
                        kept.append(line)
            replace_atomically(metrics, lambda tmp: tmp.write_text("".join(line + "\n" for line in kept)))
        self.accelerator.wait_for_everyone()

    # -- the run ----------------------------------------------------------------------------------------------
    def run(self) -> Path:
        from tqdm.auto import tqdm

        cfg = self.cfg
        if self.main:
            (self.run_dir / ckpt.CHECKPOINTS).mkdir(parents=True, exist_ok=True)
        self.accelerator.wait_for_everyone()
        if cfg.resume:
            self.restore()
        self.start_tracker()
        if self.main and self.step == 0:
            config = json.dumps(dataclasses.asdict(cfg), indent=2) + "\n"
            replace_atomically(self.run_dir / CONFIG, lambda tmp: tmp.write_text(config))
            skipped = self.pairs.skipped + (self.val.skipped if self.val else [])
            text = "".join(json.dumps(s) + "\n" for s in skipped)
            replace_atomically(self.run_dir / SKIPPED, lambda tmp: tmp.write_text(text))
        for name, pairs in (("training", self.pairs), ("validation", self.val)):
            if pairs is not None and pairs.skipped:
                self.log(f"skipped {len(pairs.skipped)} {name} captions ({pairs.skip_summary()}): see {SKIPPED}")
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.log(
            f"{len(self.pairs)} pairs, {self.steps_per_epoch} steps/epoch x {cfg.epochs} epochs; "
            f"batch {cfg.batch_size} x {self.world} processes x {cfg.grad_accum} accumulation; "
            f"{trainable:,} trainable parameters ({self.lm_state()}); "
            f"precision {self.accelerator.mixed_precision}"
        )
        if self.warmup < cfg.warmup_steps:
            self.log(f"warm-up clipped from {cfg.warmup_steps} to {self.warmup} steps (10% of {self.total_steps})")

        window, lm_window, busy = [], [], 0.0
        while self.step < self.total_steps:
            epoch, first = divmod(self.step, self.steps_per_epoch)
            plan = self.epoch_steps(epoch)
            desc, shown = f"epoch {epoch + 1}/{cfg.epochs}", self.main and self.progress
            bar = tqdm(total=len(plan), initial=first, desc=desc, disable=not shown, leave=False)
            for micro_batches in plan[first:]:
                started = time.perf_counter()
                loss, lm_loss = self.train_step(micro_batches)
                busy += time.perf_counter() - started
                window.append(loss)
                if lm_loss is not None:
                    lm_window.append(lm_loss)
                bar.update()
                bar.set_postfix(loss=f"{loss:.3f}")
                end_of_epoch = self.step % self.steps_per_epoch == 0
                if self.step % cfg.log_every == 0 or end_of_epoch:
                    samples = len(window) * cfg.batch_size * cfg.grad_accum * self.world
                    row = {
                        "type": "train",
                        "step": self.step,
                        "epoch": self.step / self.steps_per_epoch,
                        "loss": sum(window) / len(window),
                        "lr": self.scheduler.get_last_lr()[0],
                        "samples_per_s": samples / busy,
                    }
                    if lm_window:
                        row["lm_loss"] = sum(lm_window) / len(lm_window)
                    self.record(row)
                    window, lm_window, busy = [], [], 0.0
                if end_of_epoch or (cfg.val_every and self.step % cfg.val_every == 0):
                    self.validate()
                if end_of_epoch or self.step % cfg.save_every == 0:
                    self.save_checkpoint()
            bar.close()
            if self.main and (self.run_dir / METRICS).exists():
                plot_losses({"": self.run_dir / METRICS}, self.run_dir / "loss.png")
        if self.main:
            model = self.accelerator.unwrap_model(self.objective).model
            ckpt.save_model_dir(model, self.tokenizer, self.run_dir / "final")
            if (self.run_dir / METRICS).exists():
                plot_losses({"": self.run_dir / METRICS}, self.run_dir / "loss.png")
            best = f", best (validation loss {self.best_val:.4f}) in {self.run_dir / 'best'}" if self.val else ""
            self.log(f"done: final model in {self.run_dir / 'final'}{best}")
        # not accelerator.end_training(): it also tears down the process group of a torchrun launch
        for tracker in self.accelerator.trackers:
            tracker.finish()
        self.accelerator.wait_for_everyone()
        return self.run_dir


def train(cfg: TrainConfig, progress: bool = False) -> Path:
    """Train a ClipCap model as `cfg` says; returns RUN_DIR (RUN_DIR/final is a model dir). `progress` shows bars."""
    return Trainer(cfg, progress).run()
