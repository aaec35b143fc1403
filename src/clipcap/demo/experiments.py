"""The paper's ablations (Mokady et al. 2021, §4), on any embedding store, through `train` and `evaluate`:

- `prefix_length_ablation`: train and test score against the prefix length k, for a tuned and a frozen LM
  (the paper's figure: with a tuned LM longer prefixes stop helping around 10 and overfit; with a frozen LM they keep
  helping up to ~40-80). Writes results.json and prefix_length.png (two panels, train and test lines).
- `mapping_ablation`: the mapping network x LM tuning table (MLP/Transformer x tuned/frozen).
- `relations_ablation` (beyond the paper): where things are. Each CLIP given (e.g. with and without
  relation-aware hard negatives) x each way of reading the image (the pooled embedding with the paper's two
  variants, or image tokens with the Transformer mapper, tuned or frozen LM), on the demo's shapes world: single
  objects, two-object scenes named exactly and their relation, CIDEr, in-domain and novel; seconds of training and
  the size of what each setting reads from the store. Writes results.json and table.md.

`--quick` runs any of them on a small shapes world with the shipped encoders, in minutes.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import ClipCapError

METRICS = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


@dataclass
class ExperimentSettings:
    """What every run of an ablation shares (fields map onto TrainConfig / evaluate_model)."""

    data: str
    lm: str
    out: str
    train_split: str | None = "train"
    test_split: str = "test"
    val_split: str | None = None
    epochs: int = 3
    batch_size: int = 64
    lr: float = 2e-3
    lm_lr: float | None = 2e-4
    num_layers: int = 4
    num_beams: int = 1
    max_new_tokens: int = 24
    train_eval_images: int = 500  # the "train" score is measured on this many training images
    seed: int = 0


def _say(message: str) -> None:
    print(f"clipcap experiment: {message}", file=sys.stderr, flush=True)


def run_one(s: ExperimentSettings, name: str, mapping: str, tune_lm: bool, prefix_length: int) -> dict:
    """Train one configuration and score it on the train and test splits; returns {"train": .., "test": ..}."""
    from ..evaluate import evaluate_model
    from ..train import TrainConfig, train

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
        warmup_steps=100,
        seed=s.seed,
        split=s.train_split,
        val_split=s.val_split,
        num_samples=0,
        save_every=10**9,
    )
    model_dir = train(cfg) / "final"
    trained = time.perf_counter()
    scores = {}
    for which, split, limit in (("train", s.train_split, s.train_eval_images), ("test", s.test_split, None)):
        result = evaluate_model(
            model_dir,
            s.data,
            split=split,
            num_beams=s.num_beams,
            max_new_tokens=s.max_new_tokens,
            batch_size=256,
            clipscore=False,
            spice=False,
            limit=limit,
        )
        scores[which] = {m: result[m] for m in METRICS if m in result}
        scores[which]["examples"] = [r["prediction"] for r in result["per_image"][:3]]
    scores["train_s"] = round(trained - start, 1)
    _say(
        f"{name}: train CIDEr {scores['train'].get('CIDEr', float('nan')):.3f}, "
        f"test CIDEr {scores['test'].get('CIDEr', float('nan')):.3f}"
    )
    return scores


def prefix_length_ablation(s: ExperimentSettings, lengths: list[int], mapping: str = "mlp") -> dict:
    """Score vs prefix length for a tuned and a frozen LM (same mapping); writes results.json + prefix_length.png."""
    if not lengths or any(k < 1 for k in lengths):
        raise ClipCapError(f"--lengths must be positive integers, got {lengths}")
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"experiment": "prefix-length", "mapping": mapping, "settings": s.__dict__, "runs": {}}
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


def mapping_ablation(s: ExperimentSettings, prefix_length: int = 10) -> dict:
    """MLP/Transformer x tuned/frozen LM on the test split; writes results.json and table.md."""
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"experiment": "mapping", "prefix_length": prefix_length, "settings": s.__dict__, "runs": {}}
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


def quick_world(out: str | Path, seed: int = 0) -> tuple[str, str]:
    """A small shapes world embedded with the shipped CLIP: returns (store, lm dir) for a quick ablation."""
    from ..embed import embed
    from . import world as shapes
    from .encoders import ASSETS

    out = Path(out)
    world = shapes.generate_world(
        out / "world", {s: 0 for s in shapes.SPLITS} | {"train": 1500, "test": 300}, seed=seed
    )
    store = out / "store"
    shutil.rmtree(store, ignore_errors=True)
    embed(world, store, ASSETS / "clip", batch_size=256, workers=0)
    return str(store), str(ASSETS / "lm")


def _dir_mb(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20, 2)


def relations_recipe(quick: bool):
    """The demo's recipe (world, variants, decoding), or with `quick` a smaller world, two epochs, greedy."""
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
    return recipe


def relations_ablation(
    out: str | Path,
    clips: dict[str, str],
    lm: str,
    quick: bool = False,
    token_grids: list[int | None] | None = None,
    variants: list[str] | None = None,
) -> dict:
    """Every CLIP in `clips` (name -> dir) x every variant (default: all of runner.VARIANTS; token variants once per
    grid in `token_grids`, None = every token), trained on one shapes world and scored on its test and novel splits.
    Writes OUT/results.json (after every run) and OUT/table.md."""
    from ..embed import embed
    from . import world as shapes
    from .runner import evaluate_variant, train_variant

    recipe = relations_recipe(quick)
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
    world = shapes.generate_world(out / "world", counts, seed=recipe.seed)
    results: dict = {"experiment": "relations", "quick": quick, "counts": recipe.counts, "runs": {}}
    for clip_name, clip_dir in clips.items():
        stores = {}
        for grid in grids:
            _say(f"{clip_name}: embedding the world with image tokens (grid {grid or 'all'})")
            stores[grid] = out / "stores" / f"{clip_name}-grid{grid or 'all'}"
            shutil.rmtree(stores[grid], ignore_errors=True)
            embed(world, stores[grid], clip_dir, batch_size=256, workers=0, tokens=True, token_grid=grid)
        for v in chosen:
            for grid in grids if v.tokens else grids[:1]:
                name = f"{clip_name}/{v.name}" + (f"/grid{grid or 'all'}" if v.tokens else "")
                _say(f"{name}: training")
                store = stores[grid]
                start = time.perf_counter()
                model_dir = train_variant(v, store, Path(lm), out / "runs" / name.replace("/", "-"), recipe.seed)
                seconds = round(time.perf_counter() - start, 1)
                row = {
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
    """A Markdown table: one row per (CLIP, variant, input); in-domain and novel scores, seconds, store size."""
    head = (
        "| CLIP | variant | input | single | pairs exact | relation right | CIDEr | novel single | novel pairs exact "
        "| novel relation right | novel CIDEr | train s | store MB |"
    )
    lines = [head, "|---" * 13 + "|"]
    for r in results["runs"].values():
        cells = [
            f"{r[split][m]:.3f}"
            for split in ("test", "novel")
            for m in ("single", "pairs_exact", "relation_right", "CIDEr")
        ]
        cells += [f"{r['train_s']:.0f}", f"{r['store_mb']}"]
        lines.append(f"| {r['clip']} | {r['title']} | {r['input']} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def _named(spec: str) -> tuple[str, str]:
    """ "NAME=DIR" -> (NAME, DIR); "DIR" -> (its folder name, DIR)."""
    name, sep, path = spec.partition("=")
    return (name, path) if sep and name and path else (Path(spec).name, spec)


def run_experiment(
    kind: str,
    out: str | Path,
    data: str | None = None,
    lm: str | None = None,
    quick: bool = False,
    lengths: list[int] | None = None,
    mapping: str = "mlp",
    prefix_length: int = 10,
    clip_models: list[str] | None = None,
    token_grids: list[int | None] | None = None,
    variants: list[str] | None = None,
    **settings,
) -> dict:
    """`clipcap experiment KIND`: `prefix-length` or `mapping`, on `data` (a store) with `lm`, or with `quick` on a
    small shapes world (store and LM made here; fewer lengths and epochs unless given). `relations` always runs on
    the shapes world (the demo's, or with `quick` a smaller one) with the shipped LM and each of `clip_models`
    ("NAME=DIR" or "DIR"; default: the shipped CLIP)."""
    if kind not in ("prefix-length", "mapping", "relations"):
        raise ClipCapError(f"unknown experiment {kind!r}: choose prefix-length, mapping or relations")
    if kind == "relations":
        from .encoders import ASSETS

        clips = dict(_named(c) for c in clip_models) if clip_models else {"shipped": str(ASSETS / "clip")}
        return relations_ablation(out, clips, lm or str(ASSETS / "lm"), quick, token_grids, variants)
    if quick and data is None:
        data, default_lm = quick_world(Path(out) / "quick")
        lm = lm or default_lm
        settings.setdefault("epochs", 2)
        lengths = lengths or [1, 4, 10, 20]
    if data is None or lm is None:
        raise ClipCapError("pass --data STORE and --lm NAME_OR_DIR (or --quick for the shapes world)")
    s = ExperimentSettings(data=str(data), lm=str(lm), out=str(out), **settings)
    if kind == "prefix-length":
        return prefix_length_ablation(s, lengths or [1, 5, 10, 20, 40], mapping=mapping)
    return mapping_ablation(s, prefix_length=prefix_length)
