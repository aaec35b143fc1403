"""Training ClipCap on an embedding store: `train(TrainConfig(...))` -> RUN_DIR.

Hugging Face Accelerate runs the loop, so one script works on a CPU, one GPU, or many GPUs/nodes under `torchrun` /
`accelerate launch` (DDP), with bf16/fp16 autocast on GPU. Around it:

- Captions are tokenised once with the LM's tokenizer, the end token appended (config.stop_token_id), and padded per
  batch to the batch's longest caption (not a global maximum). Unusable captions are skipped, counted and listed in
  RUN_DIR/skipped.jsonl.
- The sample order of epoch e is a pure function of (seed, e) (torch's DistributedSampler), so a checkpoint only has
  to record the optimizer step. Checkpoints (RUN_DIR/checkpoints/step-N/) are model dirs plus optimizer, scheduler
  and per-process RNG state, all in safetensors/JSON, written to a temporary dir and renamed; `resume=True` continues
  bit-for-bit where the last one left off.
- `text_only=True` is CapDec (Nukrai et al. 2022): train from CLIP *text* embeddings of the captions with Gaussian
  noise injected, then caption images with the same CLIP's image tower.
- `lm_text=FILE` mixes plain language-model loss on packed blocks of a text file into a tuned LM's training, to keep
  word combinations the caption pairs never show.

Outputs: RUN_DIR/metrics.jsonl (one JSON object per log line), RUN_DIR/loss.png, RUN_DIR/final/ and (with
validation data) RUN_DIR/best/ model dirs that `Captioner.from_pretrained` loads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import MAPPINGS, ClipCapConfig
from .errors import ClipCapError
from .hub import load_tokenizer
from .model import WEIGHTS_NAME, ClipCapModel

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
SKIPPED = "skipped.jsonl"
STATE = "trainer_state.json"
CONFIG = "train_config.json"
OPTIMIZER = "optimizer.safetensors"
WARMUP_FRACTION = 0.1  # the original's 5000 warm-up steps were 3.5 % of its run; never warm up for more than 10 %


@dataclass
class TrainConfig:
    """Everything `clipcap train` takes; defaults are the original implementation's (DESIGN §5)."""

    data: str
    out: str
    lm: str = "gpt2"
    mapping: str = "mlp"
    prefix_length: int = 10
    clip_length: int | None = None  # transformer mapper; default: prefix_length
    num_layers: int = 8
    tune_lm: bool | None = None  # None: tuned for the MLP mapper, frozen for the Transformer (the paper's pairings)
    epochs: int = 10
    batch_size: int = 40  # per process
    lr: float = 2e-5
    lm_lr: float | None = None  # learning rate of the LM's parameters when tuned (default: lr)
    warmup_steps: int = 5000
    weight_decay: float = 0.0
    grad_accum: int = 1
    max_grad_norm: float | None = None
    max_caption_tokens: int = 67  # including the end token; longer captions are skipped
    mixed_precision: str = "auto"  # auto | no | fp16 | bf16; auto = bf16 (or fp16) on GPU, fp32 on CPU
    seed: int = 0
    split: str | None = None
    val_data: str | None = None
    val_split: str | None = None
    val_every: int = 0  # also validate every N steps (0: once per epoch)
    num_samples: int = 4
    log_every: int = 50
    save_every: int = 1000
    keep_checkpoints: int = 2
    resume: bool = False
    text_only: bool = False
    noise_variance: float = 0.016
    lm_text: str | None = None
    lm_text_weight: float = 0.0
    lm_text_block: int = 64
    tokens: bool = False  # read the store's image tokens (transformer mapping), not its pooled embeddings

    def validate(self) -> None:
        if self.mapping not in MAPPINGS:
            raise ClipCapError(f"--mapping must be one of {', '.join(MAPPINGS)}, got {self.mapping!r}")
        if self.tokens and self.mapping != "transformer":
            raise ClipCapError("--tokens needs --mapping transformer: the MLP mapper reads one vector")
        if self.tokens and self.text_only:
            raise ClipCapError("--tokens and --text-only exclude each other: text embeddings have no image tokens")
        positive = ("prefix_length", "num_layers", "epochs", "batch_size", "grad_accum", "max_caption_tokens")
        for name in positive + ("save_every", "keep_checkpoints", "log_every", "lm_text_block"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ClipCapError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
        for name in ("lr", "lm_lr"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ClipCapError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if self.warmup_steps < 0 or self.val_every < 0 or self.num_samples < 0:
            raise ClipCapError("--warmup-steps, --val-every and --num-samples must not be negative")
        if self.noise_variance < 0 or self.lm_text_weight < 0:
            raise ClipCapError("--noise-variance and --lm-text-weight must not be negative")
        if self.mixed_precision not in ("auto", "no", "fp16", "bf16"):
            raise ClipCapError(f"--mixed-precision must be auto, no, fp16 or bf16, got {self.mixed_precision!r}")
        tuned = self.tune_lm if self.tune_lm is not None else self.mapping == "mlp"
        if not tuned and self.lm_lr is not None:
            raise ClipCapError("--lm-lr needs --tune-lm: a frozen LM is not trained")
        if not tuned and self.lm_text_weight > 0:
            raise ClipCapError("--lm-text needs --tune-lm: a frozen LM cannot forget anything")
        if (self.lm_text is None) != (self.lm_text_weight == 0):
            raise ClipCapError("--lm-text FILE and --lm-text-weight W (> 0) go together")


# -- data --------------------------------------------------------------------------------------------------------
def caption_problem(caption: str) -> str | None:
    """Why a caption cannot be a training target, or None. (Stores already drop empty and null captions.)"""
    if "\ufffd" in caption:
        return "undecodable (replacement character: the text was decoded with the wrong encoding)"
    return None


def tokenize_captions(tokenizer, captions: list, max_tokens: int) -> tuple[list[list[int] | None], list[str | None]]:
    """Token ids of each caption with the end token appended, or None with the reason it was skipped."""
    eos = tokenizer.eos_token_id
    problems = [caption_problem(c) for c in captions]
    good = [c.strip() for c, p in zip(captions, problems, strict=True) if p is None]
    encoded = iter(tokenizer(good, add_special_tokens=False)["input_ids"] if good else [])
    ids: list[list[int] | None] = []
    for i, problem in enumerate(problems):
        if problem is not None:
            ids.append(None)
            continue
        tokens = next(encoded)
        if not tokens:
            problems[i] = "empty (no tokens)"
        elif len(tokens) + 1 > max_tokens:
            problems[i] = f"over-long ({len(tokens) + 1} tokens > max {max_tokens})"
        ids.append(None if problems[i] else tokens + [eos])
    return ids, problems


def pad_batch(sequences: list, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token sequences to the longest one in the batch: (input_ids, attention_mask)."""
    tensors = [torch.as_tensor(s, dtype=torch.long) for s in sequences]
    ids = nn.utils.rnn.pad_sequence(tensors, batch_first=True, padding_value=pad_id)
    lengths = torch.tensor([len(t) for t in tensors])
    return ids, (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()


class CaptionPairs:
    """The usable (embedding, caption) pairs of a store, tokenised once; `batch(rows)` builds a padded batch.

    Token ids live in one flat int32 array, so memory is a few bytes per token however large the store is.
    `image_tokens`: batches carry the store's image tokens (B, T, D) instead of its pooled embeddings."""

    def __init__(
        self, store, tokenizer, max_tokens: int, name: str = "train", progress: bool = True, image_tokens: bool = False
    ):
        from tqdm.auto import tqdm

        self.store = store
        self.image_tokens = image_tokens
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        tokens, offsets, pairs, image = array("i"), array("q", [0]), array("q"), array("q")
        self.skipped: list[dict] = []
        keys = store.keys
        pair = 0
        chunk = 2048  # images per tokenizer call
        for start in tqdm(range(0, store.num_images, chunk), desc=f"tokenising {name} captions", disable=not progress):
            images = range(start, min(start + chunk, store.num_images))
            captions = [store.image_captions(j) for j in images]
            flat = [c for caps in captions for c in caps]
            ids, problems = tokenize_captions(tokenizer, flat, max_tokens)
            owners = [j for j, caps in zip(images, captions, strict=True) for _ in caps]
            for j, caption, seq, problem in zip(owners, flat, ids, problems, strict=True):
                if problem is None:
                    tokens.extend(seq)
                    offsets.append(offsets[-1] + len(seq))
                    pairs.append(pair)
                    image.append(j)
                else:
                    self.skipped.append(
                        {"data": name, "pair": pair, "key": keys[j], "caption": caption[:200], "reason": problem}
                    )
                pair += 1
        self.tokens = np.frombuffer(tokens, dtype=np.int32)
        self.offsets = np.frombuffer(offsets, dtype=np.int64)
        self.pairs = np.frombuffer(pairs, dtype=np.int64)
        self.image = np.frombuffer(image, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.pairs)

    def token_ids(self, row: int) -> np.ndarray:
        return self.tokens[self.offsets[row] : self.offsets[row + 1]]

    def batch(self, rows) -> dict[str, torch.Tensor]:
        """Embeddings + dynamically padded captions of the given rows (0..len-1)."""
        images = [int(self.image[r]) for r in rows]
        read = self.store.image_tokens if self.image_tokens else self.store.image_embeddings
        embeds = torch.from_numpy(read(images))
        input_ids, attention_mask = pad_batch([self.token_ids(int(r)) for r in rows], self.pad_id)
        return {"clip_embeds": embeds, "input_ids": input_ids, "attention_mask": attention_mask}

    def skip_summary(self) -> str:
        counts: dict[str, int] = {}
        for s in self.skipped:
            reason = s["reason"].split(" (", 1)[0]
            counts[reason] = counts.get(reason, 0) + 1
        return ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items()))


class PackedText:
    """A text file tokenised into one stream (end token between lines) cut into blocks that fill the LM's context;
    batch m of process r is a pure function of (seed, m, r), so resuming needs no extra state."""

    def __init__(self, path: str | Path, tokenizer, block: int, seed: int):
        try:
            lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
        except (OSError, UnicodeDecodeError) as e:
            raise ClipCapError(f"cannot read --lm-text {path}: {e}") from None
        lines = [line for line in lines if line]
        stream = [
            t for ids in tokenizer(lines, add_special_tokens=False)["input_ids"] for t in [*ids, tokenizer.eos_token_id]
        ]
        n = len(stream) // block
        if n == 0:
            raise ClipCapError(f"--lm-text {path} holds {len(stream)} tokens: fewer than one block of {block}")
        self.blocks = torch.tensor(stream[: n * block], dtype=torch.long).view(n, block)
        self.seed = seed
        self._perm: tuple[int, torch.Tensor] | None = None

    def _order(self, cycle: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != cycle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + cycle)
            self._perm = (cycle, torch.randperm(len(self.blocks), generator=g))
        return self._perm[1]

    def rows(self, micro_batch: int, rank: int, world: int, size: int) -> list[int]:
        """Block indices of one batch: draws go round the processes, one seeded shuffle of all blocks per cycle."""
        n = len(self.blocks)
        start = (micro_batch * world + rank) * size
        return [int(self._order(g // n)[g % n]) for g in range(start, start + size)]

    def batch(self, micro_batch: int, rank: int, world: int, size: int) -> torch.Tensor:
        return self.blocks[self.rows(micro_batch, rank, world, size)]


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


# -- persistence -------------------------------------------------------------------------------------------------
def save_model_dir(model: ClipCapModel, tokenizer, path: Path) -> None:
    """Write a model dir next to `path` and swap it in, so `path` is never half-written."""
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    old = path.with_name(f".{path.name}.old")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def optimizer_to_safetensors(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (for safetensors) and the JSON-able rest."""
    tensors, rest = {}, {}
    for pid, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                rest.setdefault(str(pid), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "state": rest}


def optimizer_from_safetensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {int(pid): dict(values) for pid, values in meta["state"].items()}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a temporary dir from a killed save is never listed)."""
    root = run_dir / CHECKPOINTS
    found = [p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[5:]))


def plot_metrics(metrics_file: Path, png: Path) -> None:
    """Training and validation loss against the step, as a PNG (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4))
    for kind, key, label in (("train", "loss", "train"), ("val", "val_loss", "validation")):
        points = [(r["step"], r[key]) for r in rows if r.get("type") == kind]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o" if kind == "val" else None, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("caption cross-entropy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


# -- the trainer ---------------------------------------------------------------------------------------------------
class Trainer:
    """One training run; `Trainer(cfg).run()` trains and returns RUN_DIR. `train(cfg)` is the public entry."""

    def __init__(self, cfg: TrainConfig):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        from .data.store import EmbeddingStore

        cfg.validate()
        self.cfg = cfg
        self.run_dir = Path(cfg.out)
        mixed = cfg.mixed_precision
        if mixed == "auto":
            mixed = "no"
            if torch.cuda.is_available():
                mixed = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        # Without an accelerator, accelerate only recognises a torchrun launch as CPU DDP (gloo) when told cpu=True.
        has_accelerator = (
            torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
        )
        self.accelerator = Accelerator(mixed_precision=mixed, cpu=not has_accelerator)
        self.world = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        self.main = self.accelerator.is_main_process
        self._check_run_dir()

        self.store = EmbeddingStore(cfg.data, split=cfg.split)
        text_store = self.store.modality == "text"
        if cfg.text_only and not text_store:
            raise ClipCapError(
                f"--text-only trains on CLIP text embeddings, but {cfg.data} holds image embeddings: "
                "make the store with `clipcap embed --text-only`"
            )
        if text_store and not cfg.text_only:
            raise ClipCapError(
                f"{cfg.data} holds CLIP text embeddings: pass --text-only (noise injection) to train on it"
            )
        self.tokenizer = load_tokenizer(cfg.lm)
        if self.tokenizer.eos_token_id is None:
            raise ClipCapError(f"the tokenizer of {cfg.lm} has no end token to end captions with")

        if cfg.tokens and self.store.token_shape is None:
            raise ClipCapError(f"{cfg.data} holds no image tokens: make the store with `clipcap embed --tokens`")
        set_seed(cfg.seed)
        mapping_transformer = cfg.mapping == "transformer"
        config = ClipCapConfig(
            lm=cfg.lm,
            clip_model=self._clip_model_name(),
            clip_dim=self.store.clip_dim,
            prefix_length=cfg.prefix_length,
            clip_length=(cfg.clip_length or cfg.prefix_length) if mapping_transformer and not cfg.tokens else None,
            mapping=cfg.mapping,
            num_layers=cfg.num_layers,
            tune_lm=cfg.tune_lm if cfg.tune_lm is not None else not mapping_transformer,
            # The Captioner feeds raw encoder features: normalise them as the training embeddings were.
            normalize_prefix=bool(self.store.normalized or cfg.text_only) and not cfg.tokens,
            stop_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
            token_shape=list(self.store.token_shape) if cfg.tokens else None,
            token_grid=self.store.token_grid if cfg.tokens else None,
        )
        # fp32 master weights whatever dtype the LM was saved in; autocast gives bf16/fp16 compute on GPU.
        self.model = ClipCapModel(config).float()
        self.max_tokens = self._caption_budget()

        progress = self.main
        self.pairs = CaptionPairs(self.store, self.tokenizer, self.max_tokens, "train", progress, cfg.tokens)
        if len(self.pairs) == 0:
            raise ClipCapError(f"{cfg.data} has no usable (embedding, caption) pairs ({self.pairs.skip_summary()})")
        self.val = self._val_pairs(progress)
        self.lm_text = None
        if cfg.lm_text is not None:
            block = min(cfg.lm_text_block, self._lm_positions() or cfg.lm_text_block)
            self.lm_text = PackedText(cfg.lm_text, self.tokenizer, block, cfg.seed)

        per_rank = math.ceil(len(self.pairs) / self.world)
        self.micro_per_epoch = math.ceil(per_rank / cfg.batch_size)
        self.steps_per_epoch = math.ceil(self.micro_per_epoch / cfg.grad_accum)
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.warmup = min(cfg.warmup_steps, int(WARMUP_FRACTION * self.total_steps))

        self.objective = Objective(self.model, cfg.noise_variance if cfg.text_only else 0.0)
        self.model.to(self.accelerator.device)
        # The fused kernel updates all parameters in one pass instead of a Python loop over them.
        fused = self.accelerator.device.type in ("cpu", "cuda")
        optimizer = torch.optim.AdamW(self._param_groups(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
        from transformers import get_linear_schedule_with_warmup

        # The scheduler is stepped by hand (not prepared): accelerate would step it once per process.
        self.scheduler = get_linear_schedule_with_warmup(optimizer, self.warmup, self.total_steps)
        self.objective, self.optimizer = self.accelerator.prepare(self.objective, optimizer)
        self.step = 0
        self.best_val = math.inf
        self.last_checkpoint: Path | None = None

    # -- set-up helpers ---------------------------------------------------------------------------------------
    def _check_run_dir(self) -> None:
        started = any((self.run_dir / name).exists() for name in (CHECKPOINTS, "final", METRICS, CONFIG))
        if started and not self.cfg.resume:
            raise ClipCapError(f"{self.run_dir} already holds a training run: pass --resume or choose another --out")

    def _clip_model_name(self) -> str | None:
        name = self.store.clip_model
        # A relative path would later resolve against the model dir: record where it really is.
        if name and not Path(name).is_absolute() and Path(name).is_dir():
            return str(Path(name).resolve())
        return name

    def _lm_positions(self) -> int | None:
        lm_config = self.model.lm.config
        for name in ("n_positions", "max_position_embeddings"):
            if isinstance(getattr(lm_config, name, None), int):
                return getattr(lm_config, name)
        return None

    def _caption_budget(self) -> int:
        positions = self._lm_positions()
        k = self.cfg.prefix_length
        if positions is None or k + self.cfg.max_caption_tokens <= positions:
            return self.cfg.max_caption_tokens
        if k >= positions:
            raise ClipCapError(f"--prefix-length {k} leaves no room in the LM's {positions} positions")
        self.log(f"captions capped at {positions - k} tokens: the LM has {positions} positions and the prefix {k}")
        return positions - k

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
        if self.model.config.tune_lm:
            lm = [p for p in self.model.lm.parameters() if p.requires_grad]
            groups.append({"params": lm, "lr": self.cfg.lm_lr or self.cfg.lr})
        return groups

    # -- logging ----------------------------------------------------------------------------------------------
    def log(self, message: str) -> None:
        if self.main:
            from tqdm.auto import tqdm

            tqdm.write(f"clipcap train: {message}", file=sys.stderr)

    def record(self, row: dict) -> None:
        if self.main:
            with open(self.run_dir / METRICS, "a") as f:
                f.write(json.dumps(row) + "\n")

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
                "Lower --lr or use --mixed-precision no, then --resume"
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
                save_model_dir(model, self.tokenizer, self.run_dir / "best")
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

        root = self.run_dir / CHECKPOINTS
        final = root / f"step-{self.step:08d}"
        tmp = root / f".step-{self.step:08d}.tmp"
        if self.main:
            shutil.rmtree(tmp, ignore_errors=True)
            model = self.accelerator.unwrap_model(self.objective).model
            model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            tensors, optimizer_meta = optimizer_to_safetensors(self.optimizer.state_dict())
            save_file(tensors, str(tmp / OPTIMIZER))
            scaler = self.accelerator.scaler.state_dict() if self.accelerator.scaler is not None else None
            state = {
                "step": self.step,
                "best_val": self.best_val if math.isfinite(self.best_val) else None,
                "identity": self._identity(),
                "optimizer": optimizer_meta,
                "scheduler": self.scheduler.state_dict(),
                "scaler": scaler,
                "config": dataclasses.asdict(self.cfg),
            }
            (tmp / STATE).write_text(json.dumps(state, indent=1))
        self.accelerator.wait_for_everyone()
        save_file(rng_state(), str(tmp / f"rng_state_{self.rank}.safetensors"))
        self.accelerator.wait_for_everyone()
        if self.main:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)  # the rename is what makes the checkpoint exist
            for old in list_checkpoints(self.run_dir)[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        self.last_checkpoint = final
        self.accelerator.wait_for_everyone()

    def load_checkpoint(self, path: Path) -> None:
        from safetensors.torch import load_file, load_model

        state = json.loads((path / STATE).read_text())
        if state["identity"] != self._identity():
            changed = {k: (v, self._identity()[k]) for k, v in state["identity"].items() if self._identity()[k] != v}
            raise ClipCapError(f"cannot resume {path}: the run's sample order changed (was, now: {changed})")
        model = self.accelerator.unwrap_model(self.objective).model
        missing, unexpected = load_model(model, str(path / WEIGHTS_NAME), strict=False)
        if missing or unexpected:
            raise ClipCapError(f"{path} does not match this model: missing {missing[:3]}, unexpected {unexpected[:3]}")
        self.optimizer.load_state_dict(optimizer_from_safetensors(load_file(str(path / OPTIMIZER)), state["optimizer"]))
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"] is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        set_rng_state(load_file(str(path / f"rng_state_{self.rank}.safetensors")))
        self.step = state["step"]
        self.best_val = state["best_val"] if state["best_val"] is not None else math.inf
        self.last_checkpoint = path

    def _restore(self) -> None:
        """Resume from the newest complete checkpoint; drop metrics logged after it and any half-written save."""
        checkpoints = list_checkpoints(self.run_dir)
        if self.main:
            for tmp in (self.run_dir / CHECKPOINTS).glob(".step-*.tmp"):
                shutil.rmtree(tmp, ignore_errors=True)
        if not checkpoints:
            self.log(f"--resume: no checkpoint in {self.run_dir}, starting from scratch")
            return
        self.load_checkpoint(checkpoints[-1])
        self.log(f"resumed from {checkpoints[-1]} (step {self.step} of {self.total_steps})")
        metrics = self.run_dir / METRICS
        if self.main and metrics.exists():
            kept = [line for line in metrics.read_text().splitlines() if json.loads(line).get("step", 0) <= self.step]
            metrics.write_text("".join(line + "\n" for line in kept))
        self.accelerator.wait_for_everyone()

    # -- the run ----------------------------------------------------------------------------------------------
    def run(self) -> Path:
        from tqdm.auto import tqdm

        cfg = self.cfg
        if self.main:
            (self.run_dir / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
        self.accelerator.wait_for_everyone()
        if cfg.resume:
            self._restore()
        if self.main and self.step == 0:
            (self.run_dir / CONFIG).write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
            skipped = self.pairs.skipped + (self.val.skipped if self.val else [])
            (self.run_dir / SKIPPED).write_text("".join(json.dumps(s) + "\n" for s in skipped))
        for name, pairs in (("training", self.pairs), ("validation", self.val)):
            if pairs is not None and pairs.skipped:
                self.log(f"skipped {len(pairs.skipped)} {name} captions ({pairs.skip_summary()}): see {SKIPPED}")
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.log(
            f"{len(self.pairs)} pairs, {self.steps_per_epoch} steps/epoch x {cfg.epochs} epochs; "
            f"batch {cfg.batch_size} x {self.world} processes x {cfg.grad_accum} accumulation; "
            f"{trainable:,} trainable parameters ({'LM tuned' if self.model.config.tune_lm else 'LM frozen'}); "
            f"precision {self.accelerator.mixed_precision}"
        )
        if self.warmup < cfg.warmup_steps:
            self.log(
                f"warm-up clipped from {cfg.warmup_steps} to {self.warmup} steps "
                f"(10% of this {self.total_steps}-step run)"
            )

        window, lm_window, busy = [], [], 0.0
        while self.step < self.total_steps:
            epoch, first = divmod(self.step, self.steps_per_epoch)
            plan = self.epoch_steps(epoch)
            bar = tqdm(
                total=len(plan),
                initial=first,
                desc=f"epoch {epoch + 1}/{cfg.epochs}",
                disable=not self.main,
                leave=False,
            )
            for micro_batches in plan[first:]:
                started = time.perf_counter()
                loss, lm_loss = self.train_step(micro_batches)
                busy += time.perf_counter() - started
                window.append(loss)
                if lm_loss is not None:
                    lm_window.append(lm_loss)
                bar.update()
                bar.set_postfix(loss=f"{loss:.3f}")
                if self.step % cfg.log_every == 0 or self.step % self.steps_per_epoch == 0:
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
                end_of_epoch = self.step % self.steps_per_epoch == 0
                if end_of_epoch or (cfg.val_every and self.step % cfg.val_every == 0):
                    self.validate()
                if end_of_epoch or self.step % cfg.save_every == 0:
                    self.save_checkpoint()
            bar.close()
            if self.main and (self.run_dir / METRICS).exists():
                plot_metrics(self.run_dir / METRICS, self.run_dir / "loss.png")
        if self.main:
            model = self.accelerator.unwrap_model(self.objective).model
            save_model_dir(model, self.tokenizer, self.run_dir / "final")
            if (self.run_dir / METRICS).exists():
                plot_metrics(self.run_dir / METRICS, self.run_dir / "loss.png")
            best = f", best (validation loss {self.best_val:.4f}) in {self.run_dir / 'best'}" if self.val else ""
            self.log(f"done: final model in {self.run_dir / 'final'}{best}")
        self.accelerator.wait_for_everyone()
        return self.run_dir


def train(cfg: TrainConfig) -> Path:
    """Train a ClipCap model as `cfg` says; returns RUN_DIR (RUN_DIR/final is a model dir)."""
    return Trainer(cfg).run()
