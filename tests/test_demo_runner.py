"""`clipcap demo`: the report writer, the LM text, and a quick run of the real pipeline that must learn."""

from __future__ import annotations

import json

import pytest
import yaml
from PIL import Image

from clipcap.cli import main
from clipcap.demo import runner as demo
from clipcap.demo import world as shapes
from clipcap.demo.encoders import ASSETS
from clipcap.demo.report import table, write_report


def test_report_embeds_images_and_escapes_text(tmp_path):
    img = tmp_path / "a.png"
    Image.new("RGB", (8, 8), (255, 0, 0)).save(img)
    html = write_report(
        tmp_path / "r.html",
        "title <x>",
        "intro",
        [
            (
                "Metrics",
                table([{"variant": "MLP", "CIDEr": 1.23456, "BLEU-4": float("nan")}], ["variant", "CIDEr", "BLEU-4"]),
            )
        ],
        [("Loss", img)],
        [{"image": str(img), "generated": "a <red> circle.", "references": ["a red circle."], "correct": False}],
    ).read_text()
    assert "title &lt;x&gt;" in html and "a &lt;red&gt; circle." in html
    assert '<td class="num">1.235</td>' in html and '<td class="num">–</td>' in html
    assert html.count("data:image/png;base64,") == 2
    assert "gen bad" in html


def test_demo_help_lists_flags(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = capsys.readouterr().out
    for flag in ("--out", "--quick", "--rebuild-encoders", "--encoders"):
        assert flag in text


def test_missing_encoders_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "encoders").mkdir()
    assert main(["demo", "--out", str(tmp_path / "o"), "--encoders", str(tmp_path / "encoders")]) == 2
    assert "--rebuild-encoders" in capsys.readouterr().err


@pytest.mark.skipif(not (ASSETS / "clip" / "config.json").is_file(), reason="shipped encoders not built")
def test_quick_demo_learns(tmp_path):
    """The real pipeline at a small scale: loss must fall and captions must name objects far above chance."""
    from clipcap import Captioner

    out = tmp_path / "demo"
    summary = demo.run_demo(demo.DemoConfig(out=str(out), quick=True))
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["best"] == summary["best"] and saved["best"] in saved["variants"]
    chance = 1 / (len(shapes.COLOURS) * len(shapes.SHAPES))
    for name, variant in saved["variants"].items():
        rows = [json.loads(line) for line in (out / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in rows if r.get("type") == "train"]
        assert losses[-1] < 0.8 * losses[0], name  # the first logged loss is already after 50 steps
        assert {"test", "novel"} <= set(variant)
        assert variant["test"]["num_images"] == demo.DemoRecipe.quick().counts["test"]
    best = saved["variants"][saved["best"]]["test"]
    assert best["objects"] > 5 * chance and best["CIDEr"] > 0.3
    # the training captions of two-object scenes name the upper / left object first; the test split's either
    world = json.loads((out / "world" / "dataset_coco.json").read_text())
    assert saved["world"]["training_order"] == world["training_order"] == "reading"
    for split, orders in (("train", {"left of", "above"}), ("test", set(shapes.RELATIONS))):
        texts = [
            s["raw"] for e in world["images"] if e["split"] == split and len(e["objects"]) == 2 for s in e["sentences"]
        ]
        assert {shapes.read_caption(t).relation for t in texts} == orders
    html = (out / "report.html").read_text()
    assert html.count("class='card'") == len(saved["samples"]) > 0 and "Loss curves" in html
    assert "The training captions of two-object scenes name the upper or left object first" in html
    captioner = Captioner.from_pretrained(out / "model")
    sample = saved["samples"][0]
    assert captioner.caption(sample["image"], num_beams=demo.DemoRecipe.quick().num_beams) == [sample["generated"]]
    # the demo's model gets a model card carrying the demo's metrics
    assert main(["card", str(out / "model")]) == 0
    meta = yaml.safe_load((out / "model" / "README.md").read_text().split("---\n")[1])
    assert meta["pipeline_tag"] == "image-to-text"
    carried = {
        (r["dataset"]["split"], m["name"]): m["value"] for r in meta["model-index"][0]["results"] for m in r["metrics"]
    }
    assert carried[("test", "CIDEr")] == round(best["CIDEr"], 4)
    assert carried[("novel", "colour-shape binding, all objects")] == round(
        saved["variants"][saved["best"]]["novel"]["objects"], 4
    )
