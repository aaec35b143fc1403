"""The ablation runner: every configuration is trained and scored, results and plots are written."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from clipcap.demo.experiments import (
    ExperimentConfig,
    mapping_table,
    plot_prefix_length,
    run_experiment,
    run_one,
    styles_table,
    tuning_table,
)
from clipcap.errors import ClipCapError


@pytest.fixture(scope="module")
def store(tmp_path_factory, clip_dir):
    from clipcap.demo import world as shapes
    from clipcap.embed import EmbedConfig, embed

    out = tmp_path_factory.mktemp("exp")
    world = shapes.generate_world(
        out / "world", {s: 0 for s in shapes.SPLITS} | {"train": 24, "test": 8, "novel": 8}, progress=False
    )
    cfg = EmbedConfig(source=str(world), out=str(out / "store"), clip_model=str(clip_dir), batch_size=32, workers=0)
    return str(embed(cfg).out)


def test_prefix_length_ablation_trains_every_length_for_both_tunings(tmp_path, store, lm_dir):
    out = tmp_path / "pl"
    cfg = ExperimentConfig(
        kind="prefix-length", out=str(out), data=store, lm=str(lm_dir), lengths=[2], epochs=1, batch_size=16
    )
    results = run_experiment(dataclasses.replace(cfg, max_new_tokens=6))
    assert sorted(results["runs"]) == ["frozen_k2", "tuned_k2"]
    for name, run in results["runs"].items():
        assert run["prefix_length"] == int(name[-1])
        for which in ("train", "test"):
            assert set(run[which]) >= {"BLEU-4", "CIDEr", "examples"}
            assert math.isfinite(run[which]["CIDEr"])
        assert (out / "runs" / f"mlp_{name}" / "final" / "model.safetensors").is_file()
    assert json.loads((out / "results.json").read_text())["runs"].keys() == results["runs"].keys()
    assert (out / "prefix_length.png").read_bytes()[:4] == b"\x89PNG"


def test_tuning_ablation_runs_every_variant_with_each_mapper(tmp_path, store, monkeypatch):
    from clipcap.demo import experiments

    calls = []

    def fake_run(s, name, mapping, tune_lm, k, lora_r=0, train_curve=True):
        assert not train_curve
        calls.append((name, mapping, tune_lm, k, lora_r))
        test = {"BLEU-4": 0.25, "METEOR": 0.5, "ROUGE-L": 0.75, "CIDEr": 1.5}
        return {"test": test, "trainable": 1000 + lora_r, "dir_bytes": 2_500_000, "s_per_step": 0.125}

    monkeypatch.setattr(experiments, "run_one", fake_run)
    out = tmp_path / "tuning"
    cfg = ExperimentConfig(kind="tuning", out=str(out), data=store, lm="lm", lora_ranks=[2, 8], prefix_length=3)
    runs = run_experiment(cfg)["runs"]
    variants = [("frozen", False, 0), ("lora-r2", False, 2), ("lora-r8", False, 8), ("full", True, 0)]
    assert calls == [(f"{m}_{t}", m, tune, 3, r) for m in ("mlp", "transformer") for t, tune, r in variants]
    lines = (out / "table.md").read_text().splitlines()
    assert lines[0] == "| mapping | LM | trainable params | model dir MB | s/step | BLEU-4 | METEOR | ROUGE-L | CIDEr |"
    assert lines[4] == "| mlp | lora-r8 | 1,008 | 2.50 | 0.125 | 0.250 | 0.500 | 0.750 | 1.500 |"
    assert len(lines) == 10 and tuning_table({"runs": runs}) == "\n".join(lines) + "\n"


def test_a_quick_run_is_scored_on_the_novel_split_and_read_for_binding(tmp_path, store, lm_dir):
    from clipcap.demo import world as shapes
    from clipcap.evaluate import EvalConfig, evaluate_model

    cfg = ExperimentConfig(
        kind="tuning", out=str(tmp_path), data=store, lm=str(lm_dir), quick=True, epochs=1, batch_size=16
    )
    scores = run_one(
        dataclasses.replace(cfg, max_new_tokens=6), "mlp_lora", "mlp", False, 2, lora_r=2, train_curve=False
    )
    assert "train" not in scores and {"test", "novel"} <= set(scores)
    assert (tmp_path / "runs" / "mlp_lora" / "final" / "adapter").is_dir()
    for split in ("test", "novel"):
        rows = evaluate_model(
            EvalConfig(
                model=str(tmp_path / "runs" / "mlp_lora" / "final"),
                data=store,
                split=split,
                max_new_tokens=6,
                num_beams=1,
                clipscore=False,
                spice=False,
            )
        ).rows
        predictions, references = [r["prediction"] for r in rows], [r["references"] for r in rows]
        read = shapes.binding_accuracy(predictions, references) | shapes.relation_accuracy(predictions, references)
        assert {k: scores[split][k] for k in ("single", "objects", "pairs_exact", "relation_right")} == {
            k: read[k] for k in ("single", "objects", "pairs_exact", "relation_right")
        }


def _tuning_runs(cider: dict[str, float], objects: float = 0.5) -> dict:
    scores = {"BLEU-4": 0.25, "METEOR": 0.5, "ROUGE-L": 0.75, "objects": objects, "pairs_exact": 0.25}
    runs = {}
    for mapping in ("mlp", "transformer"):
        for tuning, c in cider.items():
            novel = {"single": 1.0, "pairs_exact": 0.125, "CIDEr": c / 2}
            runs[f"{mapping}_{tuning}"] = {
                "mapping": mapping,
                "tuning": tuning,
                "trainable": 1000,
                "dir_bytes": 2_500_000,
                "s_per_step": 0.125,
                "train_loss": 4.0 / c,
                "test": scores | {"CIDEr": c},
                "novel": novel,
            }
    return {"runs": runs}


def test_tuning_table_adds_the_loss_and_binding_columns_when_the_runs_have_them():
    results = _tuning_runs({"frozen": 1.0, "full": 2.0})
    lines = tuning_table(results).splitlines()
    assert lines[0].startswith("| mapping | LM | trainable params | model dir MB | s/step | train loss | BLEU-4 |")
    assert lines[0].endswith("| CIDEr | objects | pairs exact | novel single | novel pairs exact | novel CIDEr |")
    assert lines[1].count("|") == lines[0].count("|")
    assert lines[3] == (
        "| mlp | full | 1,000 | 2.50 | 0.125 | 2.000 | 0.250 | 0.500 | 0.750 | 2.000 | 0.500 | 0.250 | 1.000 | 0.125 "
        "| 1.000 |"
    )
    for run in results["runs"].values():
        del run["train_loss"], run["novel"]
    lines = tuning_table(results).splitlines()
    assert lines[0] == (
        "| mapping | LM | trainable params | model dir MB | s/step | BLEU-4 | METEOR | ROUGE-L | CIDEr | objects "
        "| pairs exact |"
    )
    assert lines[3] == "| mlp | full | 1,000 | 2.50 | 0.125 | 0.250 | 0.500 | 0.750 | 2.000 | 0.500 | 0.250 |"


def test_styles_table_sets_the_gains_from_tuning_side_by_side():
    by_style = {
        "plain": _tuning_runs({"frozen": 4.0, "lora-r2": 4.5, "lora-r8": 4.25, "full": 4.125}),
        "catalogue": _tuning_runs({"frozen": 2.0, "lora-r2": 3.0, "lora-r8": 3.5, "full": 4.0}),
    }
    lines = styles_table(by_style).splitlines()
    assert lines[0] == "| style | mapping | frozen | lora-r2 | lora-r8 | full | full − frozen | best LoRA − frozen |"
    assert lines[2] == "| plain | mlp | 4.000 | 4.500 | 4.250 | 4.125 | +0.125 | +0.500 |"
    assert lines[5] == "| catalogue | transformer | 2.000 | 3.000 | 3.500 | 4.000 | +2.000 | +1.500 |"
    assert len(lines) == 6
    lines = styles_table(by_style, None, "train_loss").splitlines()
    assert lines[2] == "| plain | mlp | 1.000 | 0.889 | 0.941 | 0.970 | -0.030 | -0.111 |"
    assert lines[5] == "| catalogue | transformer | 2.000 | 1.333 | 1.143 | 1.000 | -1.000 | -0.857 |"


def test_each_quick_style_gets_its_own_world_and_runs(tmp_path, store, monkeypatch):
    from clipcap.demo import experiments

    worlds, runs = [], []

    def fake_world(out, seed=0, style="plain"):
        worlds.append((out, style))
        return store, "lm"

    def fake_run(s, name, mapping, tune_lm, k, lora_r=0, train_curve=True):
        runs.append((s.out, s.data, name))
        cider = {"frozen": 1.0, "full": 2.0}.get(name.split("_")[1], 1.5)
        run = _tuning_runs({"x": cider})["runs"]["mlp_x"]
        return {k: v for k, v in run.items() if k not in ("mapping", "tuning")}

    monkeypatch.setattr(experiments, "quick_world", fake_world)
    monkeypatch.setattr(experiments, "run_one", fake_run)
    cfg = ExperimentConfig(kind="tuning", out=str(tmp_path), quick=True, styles=["plain", "catalogue"], lora_ranks=[4])
    results = run_experiment(cfg)
    assert worlds == [(tmp_path / style / "quick", style) for style in ("plain", "catalogue")]
    assert len(runs) == 12 and {r[0] for r in runs} == {str(tmp_path / "plain"), str(tmp_path / "catalogue")}
    assert list(results["styles"]) == ["plain", "catalogue"]
    for style in ("plain", "catalogue"):
        assert (tmp_path / style / "table.md").is_file() and (tmp_path / style / "results.json").is_file()
    styles = (tmp_path / "styles.md").read_text()
    assert "| catalogue | transformer | 1.000 | 1.500 | 2.000 | +1.000 | +0.500 |" in styles
    assert styles.count("| plain | mlp |") == 4  # test CIDEr, test objects, novel pairs exact, training loss


def test_mapping_table_lists_each_configuration(tmp_path):
    runs = {
        f"{m}_{t}": {"mapping": m, "tuning": t, "test": {"BLEU-4": 0.25, "METEOR": 0.5, "ROUGE-L": 0.75, "CIDEr": 1.5}}
        for m in ("mlp", "transformer")
        for t in ("tuned", "frozen")
    }
    table = mapping_table({"runs": runs})
    lines = table.strip().splitlines()
    assert lines[0] == "| mapping | LM | BLEU-4 | METEOR | ROUGE-L | CIDEr |"
    assert lines[2] == "| mlp | tuned | 0.250 | 0.500 | 0.750 | 1.500 |"
    assert len(lines) == 6


def test_prefix_length_plot(tmp_path):
    runs = {
        f"{t}_k{k}": {"tuning": t, "prefix_length": k, "train": {"CIDEr": k / 10}, "test": {"CIDEr": k / 20}}
        for t in ("tuned", "frozen")
        for k in (1, 10)
    }
    png = plot_prefix_length({"mapping": "mlp", "runs": runs}, tmp_path / "p.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_bad_requests_raise(tmp_path):
    with pytest.raises(ClipCapError, match="`kind` must be one of prefix-length, mapping"):
        ExperimentConfig(kind="depth", out=str(tmp_path))
    with pytest.raises(ClipCapError, match="name the `data` store and the `lm`"):
        run_experiment(ExperimentConfig(kind="mapping", out=str(tmp_path)))
    with pytest.raises(ClipCapError, match="`lengths` must be at least 1"):
        ExperimentConfig(kind="mapping", out=str(tmp_path), lengths=[0, 2])
    with pytest.raises(ClipCapError, match="`styles` must be one of plain, catalogue, got 'fancy'"):
        ExperimentConfig(kind="tuning", out=str(tmp_path), quick=True, styles=["fancy"])
    with pytest.raises(ClipCapError, match=r"caption `styles` \['catalogue'\] apply to the quick shapes world"):
        run_experiment(ExperimentConfig(kind="tuning", out=str(tmp_path), data="store", lm="lm", styles=["catalogue"]))
    with pytest.raises(ClipCapError, match="not to relations"):
        run_experiment(ExperimentConfig(kind="relations", out=str(tmp_path), quick=True, styles=["catalogue"]))


def test_cli_leaves_epochs_to_quick_unless_given(tmp_path, monkeypatch):
    from clipcap.cli import main
    from clipcap.demo import experiments as experiment

    calls = []
    monkeypatch.setattr(experiment, "run_experiment", lambda cfg: calls.append(cfg))
    assert main(["experiment", "mapping", "--quick", "--out", str(tmp_path)]) == 0
    assert main(["experiment", "mapping", "--quick", "--out", str(tmp_path), "--epochs", "5"]) == 0
    assert calls[0].epochs is None and calls[1].epochs == 5 and calls[0].quick


def test_relations_ablation_scores_every_clip_variant_and_grid(tmp_path, clip_dir, lm_dir, monkeypatch):
    from dataclasses import replace

    from clipcap.demo import experiments
    from clipcap.demo.runner import VARIANTS, DemoRecipe

    def tiny_recipe(quick, epochs):
        variants = tuple(replace(v, epochs=epochs, batch_size=8) for v in VARIANTS.values())
        return DemoRecipe(counts={"train": 10, "test": 6, "novel": 6}, variants=variants, num_beams=1, max_new_tokens=6)

    monkeypatch.setattr(experiments, "relations_recipe", tiny_recipe)
    out = tmp_path / "rel"
    cfg = ExperimentConfig(
        kind="relations",
        out=str(out),
        lm=str(lm_dir),
        clip_models=[f"a={clip_dir}"],
        token_grids=[0, 2],
        variants=["mlp_tuned", "tokens_frozen"],
        training_orders=["any", "reading"],
        epochs=1,
    )
    results = run_experiment(cfg)
    runs = ["a/mlp_tuned", "a/tokens_frozen/grid2", "a/tokens_frozen/gridall"]
    assert sorted(results["runs"]) == [f"{order}/{run}" for order in ("any", "reading") for run in runs]
    # one world per order: the same scenes, the training captions of two-object scenes in their order
    for order in ("any", "reading"):
        world = json.loads((out / "world" / order / "dataset_coco.json").read_text())
        assert world["training_order"] == order
        assert all(r["training_order"] == order for n, r in results["runs"].items() if n.startswith(f"{order}/"))
    names = ("mlp_tuned", "tokens_frozen/gridall", "tokens_frozen/grid2")
    pooled, every, grid = (results["runs"][f"reading/a/{n}"] for n in names)
    assert (pooled["input"], every["input"], grid["input"]) == ("pooled", "tokens (grid all)", "tokens (grid 2)")
    # 16-d pooled rows; 17 tokens (class + 4 x 4 patches) of 32, or 5 with the grid: the stores grow accordingly
    assert pooled["store_mb"] < grid["store_mb"] < every["store_mb"]
    for row in results["runs"].values():
        assert row["train_s"] > 0
        for split in ("test", "novel"):
            assert set(row[split]) == {"single", "objects", "pairs_exact", "relation_right", "position_right", "CIDEr",
                                       "errors"}  # fmt: skip
    assert json.loads((out / "results.json").read_text())["runs"].keys() == results["runs"].keys()
    table = (out / "table.md").read_text().strip().splitlines()
    assert results["runs"]["any/a/tokens_frozen/grid2"]["title"] == "Transformer (tokens) + frozen LM"
    assert len(table) == 2 + 6 and table[0].startswith("| training captions | CLIP | variant | input | single |")
    assert table[2].startswith("| any | a | MLP + tuned LM | pooled |")
    with pytest.raises(ClipCapError, match="`variants` must be among mlp_tuned, transformer_frozen"):
        ExperimentConfig(kind="relations", out=str(tmp_path / "x"), variants=["lstm"])


def test_clip_models_are_named_or_named_after_their_folder():
    from clipcap.demo.experiments import _named

    assert _named("old=/x/clip") == ("old", "/x/clip")
    assert _named("/x/clip-negclip") == ("clip-negclip", "/x/clip-negclip")
    assert _named("=/x/y") == ("y", "=/x/y")  # no name: the whole text is the folder


def test_cli_passes_the_relations_options(tmp_path, monkeypatch):
    from clipcap.cli import main
    from clipcap.demo import experiments as experiment

    calls = []
    monkeypatch.setattr(experiment, "run_experiment", lambda cfg: calls.append(cfg))
    argv = ["experiment", "relations", "--quick", "--out", str(tmp_path), "--clip-models", "old=/a,/b"]
    assert main([*argv, "--token-grids", "0,3", "--variants", "mlp_tuned,tokens_tuned"]) == 0
    cfg = calls[0]
    assert cfg.kind == "relations" and cfg.clip_models == ["old=/a", "/b"] and cfg.token_grids == [0, 3]
    assert cfg.variants == ["mlp_tuned", "tokens_tuned"] and cfg.quick and cfg.training_orders == ["reading"]
    assert main([*argv, "--training-orders", "reading,any", "--epochs", "3"]) == 0
    assert calls[1].training_orders == ["reading", "any"] and calls[1].epochs == 3
    assert main([*argv, "--variants", "mlp_tuned,lstm"]) == 2
    assert main([*argv, "--training-orders", "upper"]) == 2


def test_relations_recipe_is_the_demos_with_the_epochs_asked_for():
    from clipcap.demo.experiments import relations_recipe
    from clipcap.demo.runner import VARIANTS, DemoRecipe

    full, quick = relations_recipe(False), relations_recipe(True)
    assert [v.epochs for v in full.variants] == [v.epochs for v in VARIANTS.values()]
    assert {v.epochs for v in quick.variants} == {2} and quick.num_beams == 1
    assert full.training_order == DemoRecipe().training_order == "reading"
    assert {v.epochs for v in relations_recipe(False, 3).variants} == {3}
    assert {v.epochs for v in relations_recipe(True, 5).variants} == {5}
