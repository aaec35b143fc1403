"""The paper's ablations (Mokady et al. 2021, §4), on any embedding store, through `train` and `evaluate`:

- `prefix_length_ablation`: train and test score against the prefix length k, for a tuned and a frozen LM
  (the paper's figure: with a tuned LM longer prefixes stop helping around 10 and overfit; with a frozen LM they keep
  helping up to ~40-80). Writes results.json and prefix_length.png (two panels, train and test lines).
- `mapping_ablation`: the mapping network x LM tuning table (MLP/Transformer x tuned/frozen).
- `tuning_ablation`: frozen LM vs LoRA (each of `lora_ranks`) vs full tuning, with each mapper: test scores,
  trainable parameters, model-dir size and seconds per optimizer step. With several caption `styles` of the quick
  world, `styles_table` sets the gain from tuning over a frozen LM side by side, style by style (the paper's first
  observation: tuning the LM pays where the caption style is far from the LM's pretraining text).
- `relations_ablation` (beyond the paper): where things are. Each CLIP given (e.g. with and without
  relation-aware hard negatives) x each way of reading the image (the pooled embedding with the paper's two
  variants, or image tokens with the Transformer mapper, tuned or frozen LM, or with the MLP on the flattened
  tokens) x each order of mention in the training captions (`world.ORDERS`: either object first, or the upper / left
  one), on the demo's shapes world: single objects, two-object scenes named exactly and their relation, CIDEr,
  in-domain and novel; seconds of training and the size of what each setting reads from the store. Writes
  results.json and table.md.

`quick` runs any of them on a small shapes world with the shipped encoders, in minutes; there every run is also scored
on the world's novel split and read back for colour-on-shape binding (`world.binding_accuracy`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import MAPPINGS
from ..errors import ClipCapError
from ..files import output_dir
from ..options import check_options, option
from ..outputs import EXPERIMENT, claim_dir
from .runner import VARIANTS
from .world import ORDERS, STYLES

METRICS = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
# What an experiment writes in OUT (and OUT/STYLE for several styles), deleted by `overwrite`.
EXPERIMENT_ENTRIES = ("runs", "quick", "world", "stores", "results.json", "table.md", "prefix_length.png", "styles.md")
BINDING = ("single", "objects", "pairs_exact", "relation_right")


@dataclass(kw_only=True)
class ExperimentConfig:
    """One ablation: which, on what data, and what every run of it shares (fields map onto TrainConfig / EvalConfig)."""

    kind: str = option(
        positional=True, choices=("prefix-length", "mapping", "tuning", "relations"), help="which ablation"
    )
    out: str = option(help="output directory (runs/, results.json, plots)")
    overwrite: bool = option(False, help="replace the output of an earlier experiment in OUT (other files kept)")
    data: str | None = option(None, help="embedding store to train and test on (made by `clipcap embed`)")
    lm: str | None = option(None, help="HF id or dir of the language model")
    quick: bool = option(False, help="without data: a small shapes world and the shipped encoders")
    lengths: list[int] | None = option(
        None, min=1, help="prefix lengths to compare", default_text="1,5,10,20,40; 1,4,10,20 when quick"
    )
    mapping: str = option("mlp", choices=MAPPINGS, help="prefix-length: the mapping network")
    prefix_length: int = option(10, min=1, help="mapping, tuning: k for every run")
    lora_ranks: list[int] | None = option(None, min=1, help="tuning: LoRA ranks to compare", default_text="4,16")
    train_split: str | None = option("train", help="split of the data to train on")
    test_split: str = option("test", help="split of the data to score on")
    novel_split: str = option("novel", help="a further split scored when the data has one (out-of-domain images)")
    styles: list[str] = option(
        default_factory=lambda: ["plain"],
        choices=STYLES,
        help="quick: caption styles of the shapes world; the ablation runs once on each (relations: plain only)",
    )
    epochs: int | None = option(
        None, min=1, help="epochs per run", default_text="3; 2 when quick; relations: each variant's own, 2 when quick"
    )
    batch_size: int = option(64, min=1, help="batch size")
    lr: float = option(2e-3, min=1e-12, help="learning rate of the mapper")
    lm_lr: float = option(2e-4, min=1e-12, help="learning rate of a tuned LM")
    num_layers: int = option(4, min=1, help="transformer mapper layers")
    num_beams: int = option(1, min=1, flag="beams", help="beam width when scoring (1: greedy)")
    max_new_tokens: int = option(40, min=1, help="longest caption when scoring")
    train_eval_images: int = option(500, min=1, help="training images scored for the train curve")
    seed: int = option(0, help="seed of every run")
    clip_models: list[str] | None = option(
        None,
        help="relations: CLIP encoders to compare, each DIR or NAME=DIR",
        default_text="the shipped shapes CLIP",
    )
    token_grids: list[int] = option(
        default_factory=lambda: [0],
        min=0,
        help="relations: grids the token variants pool the patch tokens to (0: every token)",
    )
    variants: list[str] | None = option(
        None, help=f"relations: which variants, of {', '.join(VARIANTS)}", default_text="all of them"
    )
    training_orders: list[str] = option(
        default_factory=lambda: ["reading"],
        choices=ORDERS,
        help="relations: which object the training captions of two-object scenes name first: any (either, as the "
        "world's evaluation captions) or reading (the upper / left one, as the demo trains); one world per order",
    )

    def __post_init__(self) -> None:
        check_options(self)
        unknown = [v for v in self.variants or () if v not in VARIANTS]
        if unknown:
            raise ClipCapError(f"`variants` must be among {', '.join(VARIANTS)}, got {unknown[0]!r}")


def _say(message: str) -> None:
    print(f"clipcap experiment: {message}", file=sys.stderr, flush=True)


def run_one(
    s: ExperimentConfig,
    name: str,
    mapping: str,
    tune_lm: bool,
    prefix_length: int,
    lora_r: int = 0,
    train_curve: bool = True,
) -> dict:
    """Train one configuration and score it on the test split, the novel split when the data has one, and (with
    `train_curve`) on training images; returns {"test": .., ["novel": .., "train": ..,] "train_s", "trainable",
    "dir_bytes", "s_per_step"}. On the quick shapes world each split's scores include colour-on-shape binding
    (`single`, `objects`, `pairs_exact`, `relation_right`). LoRA adapters (`lora_r`) train at the mapper's rate."""
    from ..data.store import EmbeddingStore
    from ..evaluate import EvalConfig, evaluate_model
    from ..train import TrainConfig, train
    from . import world as shapes

    run_dir = Path(s.out) / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    start = time.perf_counter()
    cfg = TrainConfig(
        data=s.data,
        out=str(run_dir),
        lm=s.lm,
        mapping=mapping,
        tune_lm=tune_lm,
        prefix_length=prefix_length,
        clip_length=prefix_length if mapping == "transformer" else None,
        num_layers=s.num_layers,
        epochs=s.epochs,
        batch_size=s.batch_size,
        lr=s.lr,
        lm_lr=s.lm_lr if tune_lm else None,
        lora_r=lora_r,
        warmup_steps=100,
        seed=s.seed,
        split=s.train_split,
        num_samples=0,
        save_every=10**9,
    )
    model_dir = train(cfg) / "final"
    trained = time.perf_counter()
    scores = {}
    splits = [("train", s.train_split, s.train_eval_images)] if train_curve else []
    splits.append(("test", s.test_split, None))
    if s.novel_split in EmbeddingStore(s.data).info.get("splits", {}):
        splits.append(("novel", s.novel_split, None))
    for which, split, limit in splits:
        eval_cfg = EvalConfig(
            model=str(model_dir),
            data=s.data,
            split=split or "all",
            num_beams=s.num_beams,
            max_new_tokens=s.max_new_tokens,
            batch_size=256,
            clipscore=False,
            spice=False,
            limit=limit,
        )
        result = evaluate_model(eval_cfg)
        scores[which] = {m: result.metrics[m] for m in METRICS if m in result.metrics}
        scores[which]["examples"] = [r["prediction"] for r in result.rows[:3]]
        if s.quick:
            predictions, references = [r["prediction"] for r in result.rows], [r["references"] for r in result.rows]
            read = shapes.binding_accuracy(predictions, references) | shapes.relation_accuracy(predictions, references)
            scores[which].update({k: read[k] for k in BINDING})
    scores["train_s"] = round(trained - start, 1)
    scores.update(run_figures(run_dir, s.batch_size))
    _say(f"{name}: " + ", ".join(f"{w} CIDEr {scores[w].get('CIDEr', float('nan')):.3f}" for w, _, _ in splits))
    return scores


def run_figures(run_dir: Path, batch_size: int) -> dict:
    """What a run cost and reached: parameters it trained (mapper, a tuned LM, adapters), bytes of its model dir, the
    mean seconds per optimizer step and the last training loss its metrics.jsonl logged."""
    from safetensors import safe_open

    final = run_dir / "final"
    tuned = json.loads((final / "config.json").read_text())["tune_lm"]
    trainable = 0
    for file in (final / "model.safetensors", final / "adapter" / "adapter_model.safetensors"):
        if file.is_file():
            with safe_open(str(file), framework="pt") as f:
                names = f.keys()
                for key in names:
                    if key.startswith("mapper.") or "lora_" in key or (tuned and key.startswith("lm.")):
                        trainable += math.prod(f.get_slice(key).get_shape())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if r.get("type") == "train"]
    rates = [r["samples_per_s"] for r in logged]
    return {
        "trainable": trainable,
        "dir_bytes": sum(p.stat().st_size for p in final.rglob("*") if p.is_file()),
        "s_per_step": batch_size * len(rates) / sum(rates) if rates else float("nan"),
        "train_loss": logged[-1]["loss"] if logged else float("nan"),
    }


def prefix_length_ablation(s: ExperimentConfig, lengths: list[int], mapping: str = "mlp") -> dict:
    """Score vs prefix length for a tuned and a frozen LM (same mapping); writes results.json + prefix_length.png."""
    if not lengths or any(k < 1 for k in lengths):
        raise ClipCapError(f"`lengths` must be positive integers, got {lengths}")
    out = output_dir(s.out)
    results: dict = {"experiment": "prefix-length", "mapping": mapping, "settings": dataclasses.asdict(s), "runs": {}}
    for tuning, tune in (("tuned", True), ("frozen", False)):
        for k in lengths:
            _say(f"{mapping} + {tuning} LM, prefix length {k}")
            results["runs"][f"{tuning}_k{k}"] = {
                "tuning": tuning,
                "prefix_length": k,
                **run_one(s, f"{mapping}_{tuning}_k{k}", mapping, tune, k),
            }
            (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot_prefix_length(results, out / "prefix_length.png")
    return results


def plot_prefix_length(results: dict, png: Path, metric: str = "CIDEr") -> Path:
    """The paper's prefix-length figure: one panel per LM tuning, train and test score against k."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, tuning in zip(axes, ("tuned", "frozen"), strict=True):
        runs = sorted((r for r in results["runs"].values() if r["tuning"] == tuning), key=lambda r: r["prefix_length"])
        ks = [r["prefix_length"] for r in runs]
        for which, style in (("train", "o-"), ("test", "s--")):
            ax.plot(ks, [r[which].get(metric, float("nan")) for r in runs], style, label=which)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_title(f"{results['mapping']} mapping, {tuning} LM")
        ax.set_xlabel("prefix length k")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel(metric)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def mapping_ablation(s: ExperimentConfig, prefix_length: int = 10) -> dict:
    """MLP/Transformer x tuned/frozen LM on the test split; writes results.json and table.md."""
    out = output_dir(s.out)
    settings = dataclasses.asdict(s)
    results: dict = {"experiment": "mapping", "prefix_length": prefix_length, "settings": settings, "runs": {}}
    for mapping in ("mlp", "transformer"):
        for tuning, tune in (("tuned", True), ("frozen", False)):
            name = f"{mapping}_{tuning}"
            _say(f"{mapping} mapping + {tuning} LM")
            results["runs"][name] = {
                "mapping": mapping,
                "tuning": tuning,
                **run_one(s, name, mapping, tune, prefix_length),
            }
            (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "table.md").write_text(mapping_table(results))
    return results


def mapping_table(results: dict) -> str:
    """A Markdown table: one row per (mapping, tuning), test metrics as columns."""
    lines = ["| mapping | LM | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    for r in results["runs"].values():
        cells = " | ".join(f"{r['test'].get(m, float('nan')):.3f}" for m in METRICS)
        lines.append(f"| {r['mapping']} | {r['tuning']} | {cells} |")
    return "\n".join(lines) + "\n"


def tuning_ablation(s: ExperimentConfig, ranks: list[int], prefix_length: int = 10) -> dict:
    """Frozen LM vs LoRA at each rank vs full tuning, with the MLP and the Transformer mapper; writes results.json and
    table.md."""
    out = output_dir(s.out)
    results: dict = {"experiment": "tuning", "prefix_length": prefix_length, "settings": dataclasses.asdict(s)}
    results["runs"] = {}
    variants = [("frozen", False, 0), *((f"lora-r{r}", False, r) for r in ranks), ("full", True, 0)]
    for mapping in ("mlp", "transformer"):
        for tuning, tune, rank in variants:
            name = f"{mapping}_{tuning}"
            _say(f"{mapping} mapping + {tuning} LM")
            results["runs"][name] = {
                "mapping": mapping,
                "tuning": tuning,
                **run_one(s, name, mapping, tune, prefix_length, lora_r=rank, train_curve=False),
            }
            (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "table.md").write_text(tuning_table(results))
    return results


# The tuning table's binding columns (split, score, heading), shown when the runs were read for binding.
TUNING_BINDING = (
    ("test", "objects", "objects"),
    ("test", "pairs_exact", "pairs exact"),
    ("novel", "single", "novel single"),
    ("novel", "pairs_exact", "novel pairs exact"),
    ("novel", "CIDEr", "novel CIDEr"),
)
# The sections of OUT/styles.md: (split or None for the run's own figure, score, title).
STYLES_SECTIONS = (
    ("test", "CIDEr", "test CIDEr"),
    ("test", "objects", "test objects"),
    ("novel", "pairs_exact", "novel pairs exact"),
    (None, "train_loss", "last training loss"),
)


def tuning_table(results: dict) -> str:
    """A Markdown table: one row per (mapping, LM tuning): trainable parameters, model-dir size, seconds per step,
    the last training loss (when recorded), the test metrics and, where the runs were read for binding, in-domain
    objects and pairs and the novel split's single objects, pairs and CIDEr."""
    runs = list(results["runs"].values())
    binding = [c for c in TUNING_BINDING if runs and all(c[1] in r.get(c[0], {}) for r in runs)]
    loss = bool(runs) and all("train_loss" in r for r in runs)
    head = "| mapping | LM | trainable params | model dir MB | s/step | " + ("train loss | " if loss else "")
    head += " | ".join(METRICS) + "".join(f" | {title}" for _, _, title in binding) + " |"
    lines = [head, "|---|---|---:|---:|---:|" + "---:|" * (loss + len(METRICS) + len(binding))]
    for r in runs:
        cells = [f"{r['train_loss']:.3f}"] if loss else []
        cells += [f"{r['test'].get(m, float('nan')):.3f}" for m in METRICS]
        cells += [f"{r[split][score]:.3f}" for split, score, _ in binding]
        lines.append(
            f"| {r['mapping']} | {r['tuning']} | {r['trainable']:,} | {r['dir_bytes'] / 1e6:.2f} | "
            f"{r['s_per_step']:.3f} | {' | '.join(cells)} |"
        )
    return "\n".join(lines) + "\n"


def styles_table(by_style: dict[str, dict], split: str | None = "test", score: str = "CIDEr") -> str:
    """A Markdown table of tuning ablations run on several caption styles: per style and mapper, `score` on `split`
    (or, with split None, the run's own figure such as `train_loss`) for each LM tuning, and the change from the
    frozen LM to full tuning and to the best (highest; lowest for a loss) LoRA rank."""
    first = next(iter(by_style.values()))["runs"].values()
    tunings = list(dict.fromkeys(r["tuning"] for r in first))
    loras = [t for t in tunings if t.startswith("lora")]
    head = "| style | mapping | " + " | ".join(tunings) + " | full − frozen | best LoRA − frozen |"
    lines = [head, "|---|---|" + "---:|" * (len(tunings) + 2)]
    for style, results in by_style.items():
        for mapping in dict.fromkeys(r["mapping"] for r in results["runs"].values()):
            runs = [r for r in results["runs"].values() if r["mapping"] == mapping]
            got = {r["tuning"]: (r[split] if split else r)[score] for r in runs}
            best = min if score.endswith("loss") else max
            gains = [got["full"] - got["frozen"], best(got[t] for t in loras) - got["frozen"]]
            cells = [f"{got[t]:.3f}" for t in tunings] + [f"{g:+.3f}" for g in gains]
            lines.append(f"| {style} | {mapping} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def quick_world(out: str | Path, seed: int = 0, style: str = "plain") -> tuple[str, str]:
    """A small shapes world (captions in `style`) embedded with the shipped CLIP: returns (store, lm dir) for a quick
    ablation."""
    from ..embed import EmbedConfig, embed
    from . import world as shapes
    from .encoders import ASSETS

    out = Path(out)
    counts = {s: 0 for s in shapes.SPLITS} | {"train": 1500, "test": 300, "novel": 300}
    world = shapes.generate_world(out / "world", counts, seed=seed, style=style)
    store = out / "store"
    shutil.rmtree(store, ignore_errors=True)
    embed(EmbedConfig(source=str(world), out=str(store), clip_model=str(ASSETS / "clip"), batch_size=256, workers=0))
    return str(store), str(ASSETS / "lm")


def _dir_mb(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20, 2)


def relations_recipe(quick: bool, epochs: int | None = None):
    """The demo's recipe (world, variants, decoding), or with `quick` a smaller world, two epochs, greedy; `epochs`
    (when given) for every variant."""
    from dataclasses import replace

    from .runner import VARIANTS, DemoRecipe

    recipe = DemoRecipe(variants=tuple(VARIANTS.values()))
    if quick:
        recipe = replace(
            recipe,
            counts={"train": 2000, "test": 300, "novel": 300},
            variants=tuple(replace(v, epochs=2) for v in recipe.variants),
            num_beams=1,
        )
    if epochs is not None:
        recipe = replace(recipe, variants=tuple(replace(v, epochs=epochs) for v in recipe.variants))
    return recipe


def relations_ablation(
    out: str | Path,
    clips: dict[str, str],
    lm: str,
    quick: bool = False,
    token_grids: list[int | None] | None = None,
    variants: list[str] | None = None,
    orders: list[str] | None = None,
    epochs: int | None = None,
) -> dict:
    """Every CLIP in `clips` (name -> dir) x every variant (default: all of runner.VARIANTS; token variants once per
    grid in `token_grids`, None = every token) x every training caption order in `orders` (default: the demo's),
    trained on a shapes world per order and scored on its test and novel splits (the same scenes and references
    whatever the order). Writes OUT/results.json (after every run) and OUT/table.md."""
    from ..embed import EmbedConfig, embed
    from . import world as shapes
    from .runner import evaluate_variant, train_variant

    recipe = relations_recipe(quick, epochs)
    chosen = [v for v in recipe.variants if variants is None or v.name in variants]
    unknown = sorted(set(variants or ()) - {v.name for v in recipe.variants})
    if unknown or not chosen:
        raise ClipCapError(f"unknown variant(s) {unknown}: choose from {', '.join(v.name for v in recipe.variants)}")
    if not clips:
        raise ClipCapError("name at least one CLIP encoder to compare")
    grids = token_grids or [None]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    counts = {s: 0 for s in shapes.SPLITS} | recipe.counts
    results: dict = {"experiment": "relations", "quick": quick, "counts": recipe.counts, "runs": {}}
    for order, clip_name in itertools.product(orders or [recipe.training_order], clips):
        clip_dir = clips[clip_name]
        world = shapes.generate_world(out / "world" / order, counts, seed=recipe.seed, training_order=order)
        stores = {}
        for grid in grids:
            _say(f"{clip_name}: embedding the world ({order} order) with image tokens (grid {grid or 'all'})")
            stores[grid] = out / "stores" / f"{order}-{clip_name}-grid{grid or 'all'}"
            shutil.rmtree(stores[grid], ignore_errors=True)
            embedding = EmbedConfig(
                source=str(world),
                out=str(stores[grid]),
                clip_model=str(clip_dir),
                batch_size=256,
                workers=0,
                tokens=True,
                token_grid=grid,
            )
            embed(embedding)
        for v in chosen:
            for grid in grids if v.tokens else grids[:1]:
                name = f"{order}/{clip_name}/{v.name}" + (f"/grid{grid or 'all'}" if v.tokens else "")
                _say(f"{name}: training")
                store = stores[grid]
                start = time.perf_counter()
                model_dir = train_variant(v, store, Path(lm), out / "runs" / name.replace("/", "-"), recipe.seed)
                seconds = round(time.perf_counter() - start, 1)
                row = {
                    "training_order": order,
                    "clip": clip_name,
                    "variant": v.name,
                    "title": v.title,
                    "input": f"tokens (grid {grid or 'all'})" if v.tokens else "pooled",
                    "train_s": seconds,
                    "store_mb": _dir_mb(store / ("tok_emb" if v.tokens else "img_emb")),
                }
                for split in ("test", "novel"):
                    scored = evaluate_variant(model_dir, store, split, recipe)
                    b = scored["binding"]
                    row[split] = {
                        **{k: b[k] for k in ("single", "objects", "pairs_exact", "relation_right", "position_right")},
                        "CIDEr": scored["metrics"].get("CIDEr", float("nan")),
                        "errors": b["errors"],
                    }
                results["runs"][name] = row
                _say(
                    f"{name}: pairs exact {row['test']['pairs_exact']:.3f} / novel {row['novel']['pairs_exact']:.3f}, "
                    f"relation right {row['test']['relation_right']:.3f} / {row['novel']['relation_right']:.3f}"
                )
                (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "table.md").write_text(relations_table(results))
    return results


def relations_table(results: dict) -> str:
    """A Markdown table: one row per (training caption order, CLIP, variant, input); in-domain and novel scores,
    seconds, store size."""
    head = (
        "| training captions | CLIP | variant | input | single | pairs exact | relation right | CIDEr | novel single "
        "| novel pairs exact | novel relation right | novel CIDEr | train s | store MB |"
    )
    lines = [head, "|---" * 14 + "|"]
    for r in results["runs"].values():
        cells = [
            f"{r[split][m]:.3f}"
            for split in ("test", "novel")
            for m in ("single", "pairs_exact", "relation_right", "CIDEr")
        ]
        cells += [f"{r['train_s']:.0f}", f"{r['store_mb']}"]
        lines.append(f"| {r['training_order']} | {r['clip']} | {r['title']} | {r['input']} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def _named(spec: str) -> tuple[str, str]:
    """ "NAME=DIR" -> (NAME, DIR); "DIR" -> (its folder name, DIR)."""
    name, sep, path = spec.partition("=")
    return (name, path) if sep and name and path else (Path(spec).name, spec)


def run_experiment(cfg: ExperimentConfig) -> dict:
    """Run the ablation `cfg.kind` on `cfg.data` (a store) with `cfg.lm`, or with `cfg.quick` on a small shapes world
    (store and LM made here; fewer lengths and epochs unless given). With several quick `styles`, the ablation runs
    once per style under OUT/STYLE, and a tuning ablation also writes OUT/styles.md (`styles_table`)."""
    clips = [_named(c)[1] for c in cfg.clip_models or ()]
    styles = tuple(dict.fromkeys(cfg.styles)) if len(cfg.styles) > 1 else ()
    claim_dir(
        cfg.out,
        EXPERIMENT,
        "clipcap experiment",
        EXPERIMENT_ENTRIES + styles,
        inputs=[cfg.data, cfg.lm, *clips],
        overwrite=cfg.overwrite,
    )
    if cfg.styles != ["plain"] and cfg.kind == "relations":
        raise ClipCapError(f"caption `styles` {cfg.styles} apply to the other ablations, not to relations (plain only)")
    if cfg.styles != ["plain"] and (not cfg.quick or cfg.data is not None):
        raise ClipCapError(f"caption `styles` {cfg.styles} apply to the quick shapes world, not to {cfg.kind} on data")
    if len(cfg.styles) > 1:
        out = output_dir(cfg.out)
        by_style = {
            style: run_experiment(dataclasses.replace(cfg, out=str(out / style), styles=[style]))
            for style in dict.fromkeys(cfg.styles)
        }
        if cfg.kind == "tuning":
            sections = [f"## {t}\n\n{styles_table(by_style, split, score)}" for split, score, t in STYLES_SECTIONS]
            (out / "styles.md").write_text("\n".join(sections))
        return {"experiment": cfg.kind, "styles": by_style}
    if cfg.kind == "relations":
        from .encoders import ASSETS

        clips = dict(_named(c) for c in cfg.clip_models) if cfg.clip_models else {"shipped": str(ASSETS / "clip")}
        grids = [g or None for g in cfg.token_grids]
        lm = cfg.lm or str(ASSETS / "lm")
        return relations_ablation(cfg.out, clips, lm, cfg.quick, grids, cfg.variants, cfg.training_orders, cfg.epochs)
    lengths = cfg.lengths
    updates = {}
    if cfg.quick and cfg.data is None:
        data, default_lm = quick_world(output_dir(cfg.out) / "quick", style=cfg.styles[0])
        updates = {"data": data, "lm": cfg.lm or default_lm, "epochs": cfg.epochs or 2}
        lengths = lengths or [1, 4, 10, 20]
    cfg = dataclasses.replace(cfg, **updates)
    if cfg.data is None or cfg.lm is None:
        raise ClipCapError("name the `data` store and the `lm` (or run `quick` on the shapes world)")
    cfg = dataclasses.replace(cfg, epochs=cfg.epochs or 3)
    from ..data.store import EmbeddingStore

    EmbeddingStore(cfg.data)  # a store that cannot be read fails here, before any run
    if cfg.kind == "prefix-length":
        return prefix_length_ablation(cfg, lengths or [1, 5, 10, 20, 40], mapping=cfg.mapping)
    if cfg.kind == "tuning":
        return tuning_ablation(cfg, cfg.lora_ranks or [4, 16], prefix_length=cfg.prefix_length)
    return mapping_ablation(cfg, prefix_length=cfg.prefix_length)
