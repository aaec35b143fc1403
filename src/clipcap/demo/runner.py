"""`clipcap demo`: the whole method, offline, on the shapes world (docs/design.md §7), in minutes on a laptop CPU.

The real pipeline, through the library's own entry points: generate the world (demo/world.py) -> `embed` it with
the shipped tiny CLIP (pooled embeddings and a 2 x 2 grid of image tokens) -> `train` two variants on the shipped
tiny GPT-2 (the MLP + tuned LM reading the image tokens, beyond the paper because it states relations better; the
paper's Transformer + frozen LM on the pooled embedding) -> `evaluate` both on the in-domain test split and the
novel split (purple triangles and yellow squares, never seen in ClipCap's training pairs) -> caption sample images
with `Captioner`. Writes DIR/report.html, DIR/metrics.json and DIR/model/ (the first variant, self-contained: its
encoder is copied to DIR/model/clip).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ClipCapError
from ..options import check_options, option
from ..outputs import DEMO, claim_dir, copy_tree, replace_atomically
from . import world as shapes
from .encoders import ASSETS, EncoderRecipe, build_encoders


@dataclass
class Variant:
    """One ClipCap training recipe (fields map onto TrainConfig)."""

    name: str
    title: str
    mapping: str
    tune_lm: bool
    prefix_length: int = 10
    clip_length: int | None = None
    num_layers: int = 8
    epochs: int = 1  # a pass over every (image, caption) pair: 5 per image
    batch_size: int = 64
    lr: float = 2e-3
    lm_lr: float | None = None
    tokens: bool = False  # the mapper reads the image tokens, not the pooled embedding


# The paper's two variants on the pooled embedding, and both mappers reading image tokens instead.
# What the demo writes in OUT, deleted by `overwrite`.
DEMO_ENTRIES = ("encoders", "world", "store", "runs", "model", "loss.png", "metrics.json", "report.html")
VARIANTS = {
    v.name: v
    for v in (
        Variant("mlp_tuned", "MLP + tuned LM", "mlp", True, batch_size=16, lm_lr=1e-4),
        Variant("transformer_frozen", "Transformer + frozen LM", "transformer", False, clip_length=10, num_layers=4),
        Variant(
            "tokens_tuned",
            "Transformer (tokens) + tuned LM",
            "transformer",
            True,
            num_layers=4,
            batch_size=16,
            lr=1e-3,
            lm_lr=1e-4,
            tokens=True,
        ),
        Variant("tokens_frozen", "Transformer (tokens) + frozen LM", "transformer", False, num_layers=4, tokens=True),
        Variant("tokens_mlp", "MLP (tokens) + tuned LM", "mlp", True, batch_size=16, lm_lr=1e-4, tokens=True),
    )
}


@dataclass
class DemoRecipe:
    """World sizes, variants and decoding of one demo run; `quick()` is the small version the tests run."""

    seed: int = 0
    counts: dict = field(default_factory=lambda: {"train": 6000, "val": 300, "test": 1000, "novel": 1000})
    # Its training captions name the upper / left object of two first (shapes.ORDERS): with either order allowed,
    # the tiny LM states above / below at chance (docs/results.md, "Spatial relations").
    training_order: str = "reading"
    # The demo's model is the MLP reading a 2 x 2 grid of image tokens (+ the class token) for 3 epochs: the best
    # measured that fits the 10 minutes (docs/results.md, "Spatial relations").
    variants: tuple[Variant, ...] = (
        dataclasses.replace(VARIANTS["tokens_mlp"], epochs=3),
        VARIANTS["transformer_frozen"],
    )
    num_beams: int = 3
    max_new_tokens: int = 24
    samples_per_split: int = 8
    token_grid: int | None = 2  # image tokens stored when a variant reads them: patch grid pooled to this

    @classmethod
    def quick(cls) -> DemoRecipe:
        return cls(
            counts={"train": 800, "val": 60, "test": 120, "novel": 120},
            variants=tuple(dataclasses.replace(v, epochs=2) for v in cls().variants),
            num_beams=1,
            samples_per_split=4,
        )


def _say(message: str) -> None:
    print(f"clipcap demo: {message}", file=sys.stderr, flush=True)


def train_variant(v: Variant, store: Path, lm_dir: Path, run_dir: Path, seed: int = 0, progress: bool = False) -> Path:
    """Train one variant on `store` with `clipcap train` into `run_dir` (validated on its val split when it has
    one); returns the model dir to use: best by validation loss, else final."""
    from ..data.store import EmbeddingStore
    from ..train import TrainConfig, train

    shutil.rmtree(run_dir, ignore_errors=True)
    has_val = "val" in EmbeddingStore(store).info.get("splits", {})
    cfg = TrainConfig(
        data=str(store),
        out=str(run_dir),
        lm=str(lm_dir),
        mapping=v.mapping,
        tune_lm=v.tune_lm,
        prefix_length=v.prefix_length,
        clip_length=v.clip_length,
        num_layers=v.num_layers,
        epochs=v.epochs,
        batch_size=v.batch_size,
        lr=v.lr,
        lm_lr=v.lm_lr if v.tune_lm else None,
        warmup_steps=100,
        seed=seed,
        split="train",
        val_split="val" if has_val else None,
        num_samples=0,
        save_every=10**9,
        tokens=v.tokens,
    )
    train(cfg, progress)
    return run_dir / ("best" if (run_dir / "best").is_dir() else "final")


def evaluate_variant(model_dir: Path, store: Path, split: str, recipe: DemoRecipe) -> dict:
    """Caption `split` of the store with the model; pycocoevalcap metrics + colour-shape binding accuracy."""
    from ..evaluate import EvalConfig, evaluate_model

    cfg = EvalConfig(
        model=str(model_dir),
        data=str(store),
        split=split,
        num_beams=recipe.num_beams,
        max_new_tokens=recipe.max_new_tokens,
        batch_size=256,
        clipscore=False,
        spice=False,
    )
    result = evaluate_model(cfg)
    rows = result.rows
    predictions, references = [r["prediction"] for r in rows], [r["references"] for r in rows]
    binding = shapes.binding_accuracy(predictions, references) | shapes.relation_accuracy(predictions, references)
    return {"metrics": result.to_dict(), "binding": binding, "rows": rows}


def _portable_model(src: Path, dst: Path, clip_dir: Path) -> Path:
    """Copy a model dir and its encoder (as dst/clip, named relatively in config.json) so dst works anywhere."""
    shutil.rmtree(dst, ignore_errors=True)
    copy_tree(src, dst)
    copy_tree(clip_dir, dst / "clip")
    config = json.loads((dst / "config.json").read_text())
    config["clip_model"] = "clip"
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return dst


def _world(out: Path, recipe: DemoRecipe, counts: dict, progress: bool = False) -> Path:
    """A fresh shapes world of the recipe's under out/world with these split counts (other splits empty); its
    dataset json."""
    world_dir = out / "world"
    shutil.rmtree(world_dir, ignore_errors=True)
    counts = {s: 0 for s in shapes.SPLITS} | counts
    return shapes.generate_world(
        world_dir, counts, seed=recipe.seed, progress=progress, training_order=recipe.training_order
    )


def _store(out: Path, world_json: Path, clip_dir: Path, recipe: DemoRecipe, progress: bool = False) -> Path:
    """out/store: the world embedded with `clip_dir` (with image tokens when a variant reads them)."""
    from ..embed import EmbedConfig, embed

    store = out / "store"
    shutil.rmtree(store, ignore_errors=True)
    tokens = any(v.tokens for v in recipe.variants)
    cfg = EmbedConfig(
        source=str(world_json),
        out=str(store),
        clip_model=str(clip_dir),
        batch_size=256,
        workers=0,
        tokens=tokens,
        token_grid=recipe.token_grid if tokens else None,
    )
    return embed(cfg, progress).out


def build_model(out: str | Path, recipe: DemoRecipe | None = None, encoders: str | Path = ASSETS) -> Path:
    """Only the demo's model: the training splits of its world, embedded, and its first variant trained as the
    demo trains it; returns the portable model dir (out/model), the one `run_demo` writes as DIR/model."""
    recipe = recipe or DemoRecipe()
    out, encoders = Path(out), Path(encoders)
    training = {s: n for s, n in recipe.counts.items() if s in ("train", "val")}
    store = _store(out, _world(out, recipe, training), encoders / "clip", recipe)
    model = train_variant(
        recipe.variants[0], store, encoders / "lm", out / "runs" / recipe.variants[0].name, recipe.seed
    )
    return _portable_model(model, out / "model", encoders / "clip")


def _samples(world: dict, split: str, n: int) -> list[dict]:
    entries = [e for e in world["images"] if e["split"] == split]
    singles = [e for e in entries if len(e["objects"]) == 1][: (n + 1) // 2]
    pairs = [e for e in entries if len(e["objects"]) == 2][: n // 2]
    return singles + pairs


@dataclass(kw_only=True)
class DemoConfig:
    """Where the demo writes, and which encoders and world size it uses."""

    out: str = option("demo-out", help="output directory")
    quick: bool = option(False, help="a small world and 2 epochs: a smoke run of a few minutes")
    rebuild_encoders: bool = option(
        False,
        help="first remake the small pretrained encoders (tiny CLIP, BPE tokenizer, tiny GPT-2) under OUT/encoders "
        "instead of using the shipped ones (over an hour on 2 cores)",
    )
    encoders: str | None = option(None, help="a dir with clip/ and lm/ to use instead of the shipped encoders")
    overwrite: bool = option(False, help="replace the output of an earlier demo in OUT (other files kept)")

    def __post_init__(self) -> None:
        check_options(self)


def run_demo(cfg: DemoConfig, recipe: DemoRecipe | None = None, progress: bool = False) -> dict:
    """Run the demo into `cfg.out`; return the metrics written to OUT/metrics.json. `cfg.encoders` is a dir holding
    clip/ and lm/ (default: the shipped ones; `rebuild_encoders` remakes them under OUT/encoders first)."""
    out, quick, rebuild_encoders, encoders = cfg.out, cfg.quick, cfg.rebuild_encoders, cfg.encoders
    from ..captioner import Captioner
    from ..train import plot_losses
    from .report import table, write_report

    recipe = recipe or (DemoRecipe.quick() if quick else DemoRecipe())
    out = claim_dir(out, DEMO, "clipcap demo", DEMO_ENTRIES, inputs=[cfg.encoders], overwrite=cfg.overwrite)
    timings: dict[str, float] = {}
    start = last = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal last
        now = time.perf_counter()
        timings[name] = round(now - last, 1)
        last = now
        _say(f"{name} done in {timings[name]:.0f} s (total {now - start:.0f} s)")

    encoders = Path(encoders) if encoders is not None else ASSETS
    if rebuild_encoders:
        _say("rebuilding the small pretrained encoders (tiny CLIP + tokenizer + tiny GPT-2) -- this takes a while")
        encoders = build_encoders(out / "encoders", EncoderRecipe())
        lap("encoders")
    clip_dir, lm_dir = encoders / "clip", encoders / "lm"
    if not (clip_dir / "config.json").is_file() or not (lm_dir / "config.json").is_file():
        raise ClipCapError(
            f"the shipped shapes-world encoders are missing under {encoders}: run with --rebuild-encoders"
        )

    _say(f"[1/5] generating the shapes world ({', '.join(f'{k} {v}' for k, v in recipe.counts.items())} images)")
    world_json = _world(out, recipe, recipe.counts, progress)
    world = json.loads(world_json.read_text())
    world_dir = world_json.parent
    lap("world")

    _say("[2/5] embedding every split with the tiny CLIP (clipcap embed)")
    store = _store(out, world_json, clip_dir, recipe, progress)
    lap("embed")

    runs: dict[str, Path] = {}  # variant -> its model dir
    for v in recipe.variants:
        _say(f"[3/5] training {v.title} (clipcap train, {v.epochs} epoch{'s' * (v.epochs != 1)})")
        runs[v.name] = train_variant(v, store, lm_dir, out / "runs" / v.name, recipe.seed, progress)
        lap(f"train {v.name}")

    _say("[4/5] evaluating both variants on the in-domain test split and the novel split (clipcap evaluate)")
    results: dict[str, dict] = {}
    for v in recipe.variants:
        results[v.name] = {split: evaluate_variant(runs[v.name], store, split, recipe) for split in ("test", "novel")}
    lap("evaluate")

    best = recipe.variants[0]
    model_dir = _portable_model(runs[best.name], out / "model", clip_dir)

    _say(f"[5/5] captioning sample images with the demo's model ({best.title}) through Captioner")
    captioner = Captioner.from_pretrained(model_dir)
    chosen = [(e, split) for split in ("test", "novel") for e in _samples(world, split, recipe.samples_per_split)]
    paths = [world_dir / e["filepath"] / e["filename"] for e, _ in chosen]
    generated = captioner.caption(paths, num_beams=recipe.num_beams, max_new_tokens=recipe.max_new_tokens)
    samples = []
    for (entry, split), path, caption in zip(chosen, paths, generated, strict=True):
        refs = [s["raw"] for s in entry["sentences"]]
        error = shapes.caption_error(caption, refs)
        samples.append(
            {
                "image": str(path),
                "generated": caption,
                "references": refs,
                "correct": error is None,
                "error": error,
                "tag": f"{split} split" + (" · novel object" if split == "novel" else ""),
            }
        )
    plot = plot_losses(
        {v.title: runs[v.name].parent / "metrics.jsonl" for v in recipe.variants}, out / "loss.png", True
    )
    lap("report")

    summary = {
        "best": best.name,
        "chosen_by": "the recipe's first variant: the best measured model that fits the demo's time budget",
        "variants": {
            v.name: {
                "title": v.title,
                "recipe": dataclasses.asdict(v),
                **{split: {**r["binding"], **_headline(r["metrics"])} for split, r in results[v.name].items()},
            }
            for v in recipe.variants
        },
        "world": {
            "counts": recipe.counts,
            "seed": recipe.seed,
            "training_order": recipe.training_order,
            "novel_compositions": [" ".join(p) for p in shapes.NOVEL],
        },
        "decoding": {"num_beams": recipe.num_beams, "max_new_tokens": recipe.max_new_tokens},
        "encoders": str(encoders),
        "timings_s": {**timings, "total": round(time.perf_counter() - start, 1)},
        "samples": [{k: s[k] for k in ("image", "generated", "references", "correct", "error")} for s in samples],
    }
    replace_atomically(out / "metrics.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2) + "\n"))

    columns = ["variant", "split", "single", "objects", "pairs_exact", "relation_right", "BLEU-4", "CIDEr"]
    rows = [
        {"variant": v.title, "split": split, **summary["variants"][v.name][split]}
        for v in recipe.variants
        for split in ("test", "novel")
    ]
    intro = (
        f"ClipCap trained offline on the synthetic shapes world. <b>single</b>: one-object images whose caption "
        f"names exactly the right colour on the right shape; <b>objects</b>: all objects named so; "
        f"<b>pairs_exact</b>: two-object images whose caption names exactly both objects; <b>relation_right</b>: "
        f"two-object images named exactly whose stated relation (either order of mention) holds in the picture. "
        f"Sample captions in red are wrong, with what is wrong. The novel split holds images with a "
        f"{' or a '.join(' '.join(p) for p in shapes.NOVEL)}, which ClipCap's training pairs never contain "
        f"(the encoders saw the whole world, as CLIP and GPT-2 saw the web). "
        + (
            "The training captions of two-object scenes name the upper or left object first; the test and novel "
            "references name either first. "
            if recipe.training_order == "reading"
            else ""
        )
        + f"DIR/model is {best.title}. "
        f"Total time {summary['timings_s']['total']:.0f} s."
    )
    write_report(
        out / "report.html",
        "clipcap demo — shapes world",
        intro,
        [("Metrics (variant × split)", table(rows, columns)), ("Wrong captions by kind", error_table(rows))],
        [("Loss curves", plot)],
        samples,
        extra={"timings_s": summary["timings_s"], "decoding": summary["decoding"]},
    )
    _say(f"wrote {out / 'report.html'}, {out / 'metrics.json'} and {model_dir}")
    for row in rows:
        _say(
            f"{row['variant']:<26} {row['split']:<6} single {row['single']:.3f}  objects {row['objects']:.3f}  "
            f"pairs exact {row['pairs_exact']:.3f}  relation right {row['relation_right']:.3f}  "
            f"CIDEr {row.get('CIDEr', math.nan):.3f}"
        )
    return summary


def error_table(rows: list[dict]) -> str:
    """What the wrong captions got wrong: one row per (variant, split), one column per kind (world.caption_error)."""
    from .report import table

    kinds = sorted({k for r in rows for k in r["errors"]}, key=lambda k: -sum(r["errors"].get(k, 0) for r in rows))
    counts = [{"variant": r["variant"], "split": r["split"], **{k: r["errors"].get(k, 0) for k in kinds}} for r in rows]
    return table(counts, ["variant", "split", *kinds])


def _headline(metrics: dict) -> dict:
    return {k: metrics[k] for k in ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr") if k in metrics}
