"""Evaluation: coco-caption parity on CLIPScore's public example, CIDEr-D's corpus idf, the no-Java fallback,
CLIPScore / RefCLIPScore on a tiny CLIP, input formats, nocaps domains, and `clipcap evaluate` end to end."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from clipcap import evaluate as ev
from clipcap import metrics as mt
from clipcap.cli import main
from clipcap.data.references import load_predictions, load_references, match_predictions
from clipcap.data.sources import Record
from clipcap.errors import ClipCapError

# CLIPScore's public example (MIT, see its LICENSE): references, two caption sets, coco-caption's figures.
EXAMPLE = Path(__file__).resolve().parent / "fixtures" / "clipscore-example"
CAPTION_SETS = ("good_captions.json", "bad_captions.json")
NO_JAVA = mt.java_problem()
needs_example = pytest.mark.skipif(not EXAMPLE.is_dir(), reason=f"reference example not found at {EXAMPLE}")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models gain nothing from intra-op threads; on a shared 2-core machine they only add contention.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def as_dict(result: ev.EvalResult) -> dict:
    """metrics.json's layout, with the per-image rows."""
    return {**result.to_dict(), "per_image": result.rows}


def embed_source(source, out, clip_dir) -> Path:
    from clipcap.embed import EmbedConfig, embed

    return embed(EmbedConfig(source=str(source), out=str(out), clip_model=str(clip_dir), workers=0)).out


def load(name: str):
    return json.loads((EXAMPLE / name).read_text())


@pytest.fixture(scope="module")
def example_scores():
    refs = load("refs.json")
    return {name: mt.compute_scores(load(name), refs) for name in CAPTION_SETS}


@pytest.fixture
def no_java(monkeypatch):
    monkeypatch.setattr(mt.shutil, "which", lambda name, *a, **k: None if name == "java" else shutil.which(name))


# -- coco-caption parity -----------------------------------------------------------------------------------------
@needs_example
@pytest.mark.parametrize("name", CAPTION_SETS)
@pytest.mark.parametrize("metric", ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"])
def test_reproduces_published_coco_caption_scores(example_scores, name, metric):
    if metric == "METEOR" and NO_JAVA:
        pytest.skip(f"METEOR runs on Java: {NO_JAVA}")
    expected = load("expected.json")[name]["coco_caption"][metric]
    scores = example_scores[name]
    assert scores.tokenizer == (mt.PYTHON_TOKENIZER if NO_JAVA else mt.PTB_TOKENIZER)
    assert scores.metrics[metric] == pytest.approx(expected, abs=1e-4)
    # and the published 4-digit figure
    assert round(scores.metrics[metric], 4) == pytest.approx(load("expected.json")[name]["published"][metric])


@needs_example
def test_spice_is_reported_unavailable_with_the_reason_never_faked(example_scores):
    scores = example_scores["good_captions.json"]
    if mt._spice_problem() is None and not NO_JAVA:
        pytest.skip("Stanford CoreNLP is installed here: SPICE really runs")
    assert "SPICE" not in scores.metrics
    assert "CoreNLP" in scores.unavailable["SPICE"] or "Java" in scores.unavailable["SPICE"]
    assert all("SPICE" not in row for row in scores.per_image.values())


@needs_example
def test_score_captions_returns_the_corpus_metrics(example_scores):
    refs, good = load("refs.json"), load("good_captions.json")
    assert mt.score_captions(good, refs) == example_scores["good_captions.json"].metrics


# -- CIDEr-D is a corpus-level metric ------------------------------------------------------------------------------
@needs_example
def test_cider_idf_comes_from_the_evaluated_references(example_scores):
    refs, good = load("refs.json"), load("good_captions.json")
    together = example_scores["good_captions.json"]
    # The corpus figure is the mean of the per-image values...
    per = [together.per_image[k]["CIDEr"] for k in good]
    assert together.metrics["CIDEr"] == pytest.approx(sum(per) / len(per), abs=1e-12)
    assert per[0] > 0
    # ...but each per-image value depends on the other images' references: alone, every n-gram of image1's
    # references occurs in the one document there is, idf = log(1/1) = 0, and CIDEr-D is exactly 0.
    alone = mt.compute_scores({"image1": good["image1"]}, {"image1": refs["image1"]}, spice=False)
    assert alone.metrics["CIDEr"] == 0.0
    # A third image whose references share no n-gram with image1 raises image1's idf weights: a new score.
    distractor = {"image3": ["a red bus parked by a station."]}
    three = mt.compute_scores(
        {**good, "image3": "a bus at the station."}, {**refs, **distractor}, spice=False
    ).per_image["image1"]["CIDEr"]
    assert three != pytest.approx(per[0], abs=1e-6)


# -- without Java --------------------------------------------------------------------------------------------------
def test_python_tokenize_follows_coco_caption_rules():
    assert mt.python_tokenize("A man's dog doesn't like \"T-shirts\", 3.5 m... (OK)?") == (
        "a man 's dog does n't like t-shirts 3.5 m ok"
    )
    assert mt.python_tokenize("  Two dogs;\tone cat!\n") == "two dogs one cat"
    assert mt.python_tokenize("") == ""


@pytest.mark.skipif(bool(NO_JAVA), reason=f"comparison with the PTB tokenizer needs Java: {NO_JAVA}")
def test_python_tokenize_equals_ptb_on_ordinary_captions():
    refs = load("refs.json") if EXAMPLE.is_dir() else {}
    captions = [c for caps in refs.values() for c in caps] + [
        "A man's dog doesn't like T-shirts, 3.5 meters away.",
        "Two people riding bikes down the street!",
        "a small blue square above a green triangle.",
        "The kids aren't playing; they're eating pizza.",
    ]
    ptb = mt._ptb_tokenize({"x": captions})["x"]
    assert [mt.python_tokenize(c) for c in captions] == ptb


def test_ptb_tokenize_keeps_alignment_with_empty_and_multiline_captions():
    if NO_JAVA:
        pytest.skip(f"the PTB tokenizer runs on Java: {NO_JAVA}")
    out = mt._ptb_tokenize({"a": ["", "Two\nlines here."], "b": ["...", "A dog."]})
    assert out == {"a": ["", "two lines here"], "b": ["", "a dog"]}


@needs_example
def test_without_java_bleu_rouge_cider_still_computed_and_labelled(no_java, capsys):
    assert mt.java_problem() == "no `java` found on PATH"
    refs = load("refs.json")
    expected = load("expected.json")
    for name in CAPTION_SETS:
        scores = mt.compute_scores(load(name), refs)
        assert scores.tokenizer == mt.PYTHON_TOKENIZER
        assert "METEOR" not in scores.metrics and "SPICE" not in scores.metrics
        for metric in ("METEOR", "SPICE"):
            reason = scores.unavailable[metric]
            assert "Java" in reason and "apt-get install default-jre-headless" in reason
        # The example's captions tokenize identically, so even these digits match coco-caption.
        for metric in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"):
            assert scores.metrics[metric] == pytest.approx(expected[name]["coco_caption"][metric], abs=1e-4)
    result = ev.score(load("good_captions.json"), {k: Record(k, None, v) for k, v in refs.items()}, {}, spice=True)
    table = ev.format_table(result)
    assert "| CIDEr* |" in table and "Python tokenizer because Java is missing" in table
    assert "METEOR: n/a, METEOR runs on Java" in table
    assert "| overall | 2 |" in table and "n/a" in table.splitlines()[2]


# -- CLIPScore / RefCLIPScore ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def encoder(clip_dir):
    from clipcap.encoder import ImageEncoder

    return ImageEncoder.from_pretrained(clip_dir)


def test_clipscore_formula_on_known_cosines(encoder):
    text = encoder.encode_text([mt.CLIPSCORE_PREFIX + "a red circle."])
    # An "image" whose feature equals the caption's text feature: cos = 1 -> CLIPScore = w = 2.5.
    same = mt.clip_score(["a red circle."], encoder, image_features=3 * text, references=[["a red circle."]])
    assert same["CLIPScore"] == pytest.approx(2.5, abs=1e-5)
    # RefCLIPScore: harmonic mean of 2.5 and the best reference cosine (1 here) = 2*2.5*1/3.5.
    assert same["RefCLIPScore"] == pytest.approx(5 / 3.5, abs=1e-5)
    # The best reference counts, whatever the others are.
    many = mt.clip_score(
        ["a red circle."], encoder, image_features=text, references=[["two dogs on a beach.", "a red circle."]]
    )
    assert many["RefCLIPScore"] == pytest.approx(5 / 3.5, abs=1e-5)
    # Negative cosine is clipped to 0, and the harmonic mean with 0 is 0.
    opposite = mt.clip_score(["a red circle."], encoder, image_features=-text, references=[["a red circle."]])
    assert opposite["CLIPScore"] == 0.0 and opposite["RefCLIPScore"] == 0.0


@needs_example
def test_clipscore_on_images_matches_clip_computed_directly(encoder, clip_dir):
    from transformers import AutoProcessor, CLIPModel

    paths = [str(EXAMPLE / "images" / f"image{i}.jpg") for i in (1, 2)]
    good, refs = load("good_captions.json"), load("refs.json")
    captions = [good["image1"], good["image2"]]
    references = [refs["image1"], refs["image2"]]
    scores = mt.clip_score(captions, encoder, images=paths, references=references, batch_size=1)

    # Independently: the CLIPModel and its processor, all captions prefixed, cosines by hand.
    from PIL import Image

    model, processor = CLIPModel.from_pretrained(clip_dir).eval(), AutoProcessor.from_pretrained(clip_dir)
    with torch.no_grad():
        pixels = processor(images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt")
        img = model.get_image_features(pixel_values=pixels["pixel_values"])
        img = F.normalize(getattr(img, "pooler_output", img), dim=-1)

        def text(texts):
            # One text at a time, truncated to the text tower's context (CLIPScore's clip.tokenize(truncate=True)).
            # The tiny tokenizer appends no end token, so padding would move the pooled position.
            feats = []
            for t in texts:
                ids = processor.tokenizer("A photo depicts " + t, truncation=True, max_length=64, return_tensors="pt")
                out = model.get_text_features(**ids)
                feats.append(F.normalize(getattr(out, "pooler_output", out), dim=-1)[0])
            return torch.stack(feats)

        cand = text(captions)
        clip_s = [2.5 * max(float(img[i] @ cand[i]), 0.0) for i in range(2)]
        ref_s = []
        for i in range(2):
            best = max(max(float(cand[i] @ r) for r in text(references[i])), 0.0)
            ref_s.append(0.0 if clip_s[i] + best == 0 else 2 * clip_s[i] * best / (clip_s[i] + best))
    assert scores["per_image"]["CLIPScore"] == pytest.approx(clip_s, abs=1e-5)
    assert scores["per_image"]["RefCLIPScore"] == pytest.approx(ref_s, abs=1e-5)
    assert scores["CLIPScore"] == pytest.approx(sum(clip_s) / 2, abs=1e-5)


def test_clipscore_rejects_mismatched_inputs(encoder):
    feats = torch.zeros(2, encoder.dim)
    with pytest.raises(ClipCapError, match="2 images"):
        mt.clip_score(["one caption"], encoder, image_features=feats)
    with pytest.raises(ClipCapError, match="exactly one of"):
        mt.clip_score(["a"], encoder)


# -- input formats and matching ------------------------------------------------------------------------------------
def write(path: Path, obj) -> Path:
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


def test_load_predictions_formats(tmp_path):
    coco = write(tmp_path / "res.json", [{"image_id": 7, "caption": "a dog."}, {"image_id": 9, "caption": "a cat."}])
    assert load_predictions(coco) == ({"7": "a dog.", "9": "a cat."}, {})
    jsonl = write(tmp_path / "caps.jsonl", '{"image": "imgs/a.jpg", "caption": "a dog."}\n\n')
    assert load_predictions(jsonl) == ({"imgs/a.jpg": "a dog."}, {"imgs/a.jpg": "imgs/a.jpg"})
    plain = write(tmp_path / "plain.json", {"image1": "a dog."})
    assert load_predictions(plain) == ({"image1": "a dog."}, {})
    dup = write(tmp_path / "dup.json", [{"image_id": 7, "caption": "a."}, {"image_id": 7, "caption": "b."}])
    with pytest.raises(ClipCapError, match="more than one prediction"):
        load_predictions(dup)
    many = write(tmp_path / "many.jsonl", '{"image": "a.jpg", "captions": ["x.", "y."]}\n')
    with pytest.raises(ClipCapError, match="one caption string"):
        load_predictions(many)
    with pytest.raises(ClipCapError, match="not valid JSON"):
        load_predictions(write(tmp_path / "bad.json", "{"))


def test_predictions_match_references_by_id_path_or_stem(tmp_path):
    items = [Record("1", str(tmp_path / "img" / "dog.jpg"), ["a dog."]), Record("2", None, ["a cat."])]
    preds = {"1": "x", "cat/2.png": "y"}
    assert match_predictions(preds, {"cat/2.png": "cat/2.png"}, items) == {"1": items[0], "cat/2.png": items[1]}
    assert match_predictions({"elsewhere/dog.jpg": "x"}, {}, items) == {"elsewhere/dog.jpg": items[0]}
    with pytest.raises(ClipCapError, match="match no reference"):
        match_predictions({"3": "z"}, {}, items)
    with pytest.raises(ClipCapError, match="same image"):
        match_predictions({"1": "x", "dog": "y"}, {}, items)


def test_compute_scores_rejects_unscorable_input():
    with pytest.raises(ClipCapError, match="no references"):
        mt.compute_scores({"a": "x."}, {"b": ["y."]})
    with pytest.raises(ClipCapError, match="empty reference list"):
        mt.compute_scores({"a": "x."}, {"a": []})
    with pytest.raises(ClipCapError, match="nothing to score"):
        mt.compute_scores({}, {"a": ["x."]})


def nocaps_files(tmp_path: Path) -> tuple[Path, Path]:
    """A nocaps-style annotation file (images carry `domain`) and COCO-results predictions for it."""
    refs = {
        1: ("in-domain", ["a man riding a horse on a beach.", "a person rides a horse."]),
        2: ("in-domain", ["a plate of food on a table.", "food served on a white plate."]),
        3: ("near-domain", ["a red fire truck on the street.", "a fire engine parked outside."]),
        4: ("out-domain", ["a jellyfish floating in blue water.", "a jellyfish in the sea."]),
        5: ("out-domain", ["an accordion on a wooden chair.", "a musical instrument on a chair."]),
    }
    ann = {
        "info": {"description": "nocaps validation"},
        "images": [{"id": i, "file_name": f"{i}.jpg", "domain": d} for i, (d, _) in refs.items()],
        "annotations": [
            {"id": 10 * i + j, "image_id": i, "caption": c} for i, (_, caps) in refs.items() for j, c in enumerate(caps)
        ],
    }
    preds = [
        {"image_id": 1, "caption": "a man riding a horse."},
        {"image_id": 2, "caption": "a plate of food."},
        {"image_id": 3, "caption": "a red truck on the street."},
        {"image_id": 4, "caption": "a jellyfish in the water."},
        {"image_id": 5, "caption": "a chair in a room."},
    ]
    return write(tmp_path / "pred.json", preds), write(tmp_path / "nocaps_val.json", ann)


def test_nocaps_scores_per_domain_and_overall(tmp_path):
    pred_file, ref_file = nocaps_files(tmp_path)
    scored = ev.evaluate_predictions(ev.EvalConfig(predictions=str(pred_file), references=str(ref_file), spice=False))
    result = as_dict(scored)
    assert list(result["domains"]) == ["in-domain", "near-domain", "out-domain"]
    assert [result["domains"][d]["num_images"] for d in result["domains"]] == [2, 1, 2]
    assert result["num_images"] == 5 and result["missing_predictions"] == 0
    preds, _ = load_predictions(pred_file)
    refs = {r.key: r.captions for r in load_references(ref_file)}
    # Each domain is scored as its own corpus (CIDEr's idf from that domain's references), as nocaps does.
    out = mt.compute_scores({k: preds[k] for k in ("4", "5")}, refs, spice=False).metrics
    assert result["domains"]["out-domain"]["CIDEr"] == out["CIDEr"]
    overall = mt.compute_scores(preds, refs, spice=False).metrics
    assert result["CIDEr"] == overall["CIDEr"] and result["BLEU-4"] == overall["BLEU-4"]
    assert [row["domain"] for row in result["per_image"]] == ["in-domain"] * 2 + ["near-domain"] + ["out-domain"] * 2
    assert result["unavailable"]["CLIPScore"].startswith("needs a CLIP model")
    table = ev.format_table(scored)
    assert "| in-domain | 2 |" in table and "| out-domain | 2 |" in table


# -- clipcap evaluate ------------------------------------------------------------------------------------------------
@needs_example
def test_cli_scores_prediction_files_with_clipscore(tmp_path, clip_dir, capsys):
    out = tmp_path / "eval" / "m.json"
    code = main(
        [
            "evaluate",
            "--predictions", str(EXAMPLE / "good_captions.json"),
            "--references", str(EXAMPLE / "refs.json"),
            "--images", str(EXAMPLE / "images"),
            "--clip-model", str(clip_dir),
            "--out", str(out),
        ]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    expected = load("expected.json")["good_captions.json"]["coco_caption"]
    assert f"| {100 * expected['CIDEr']:.2f} |" in captured.out and "| overall | 2 |" in captured.out
    metrics = json.loads(out.read_text())
    assert metrics["CIDEr"] == pytest.approx(expected["CIDEr"], abs=1e-4)
    assert 0 <= metrics["CLIPScore"] <= 2.5 and "RefCLIPScore" in metrics
    assert metrics["settings"]["clip_model"] == str(clip_dir)
    with open(out.with_suffix(".csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["image"] for r in rows] == ["image1", "image2"]
    assert json.loads(rows[0]["references"]) == load("refs.json")["image1"]
    per = mt.compute_scores(load("good_captions.json"), load("refs.json")).per_image
    assert float(rows[1]["CIDEr"]) == pytest.approx(per["image2"]["CIDEr"], abs=1e-9)
    assert {"prediction", "CLIPScore", "RefCLIPScore"} <= set(rows[0])
    assert not out.with_name("m.predictions.json").exists()  # nothing was generated


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "either a model"),
        (["--model", "m"], "--model needs --data"),
        (["--predictions", "p.json", "--references", "r.json", "--beams", "3"], "--beams only applies when generating"),
        (["--predictions", "missing.json", "--references", "r.json"], "file not found"),
    ],
)
def test_cli_user_mistakes_are_one_line_errors(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_cli_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    out = capsys.readouterr().out
    for flag in ("--model", "--data", "--predictions", "--references", "--beams", "--no-spice", "--clip-model"):
        assert flag in out


# -- end to end: a tiny trained model through `clipcap evaluate` -----------------------------------------------------
TRAINED = {  # image -> (nocaps domain, the caption the tiny model is trained to say, another reference)
    "img1": ("in-domain", "a large red circle on the left.", "a red circle at the left."),
    "img2": ("near-domain", "a small blue square above a green triangle.", "a blue square over a triangle."),
    "img3": ("out-domain", "two people riding bikes down the street.", "people on bikes in the street."),
}


def nocaps_source(path: Path, images: list[str], domains: list[str], refs: list[list[str]]) -> Path:
    """A nocaps-style annotation file: images with a `domain`, captions as COCO annotations."""
    return write(
        path,
        {
            "info": {"description": "nocaps-style fixture"},
            "images": [
                {"id": i + 1, "file_name": f"{n}.png", "domain": d}
                for i, (n, d) in enumerate(zip(images, domains, strict=True))
            ],
            "annotations": [
                {"id": 10 * i + j, "image_id": i + 1, "caption": c}
                for i, caps in enumerate(refs)
                for j, c in enumerate(caps)
            ],
        },
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory, lm_dir, clip_dir):
    """A model trained by `clipcap.train` (embed -> store -> train) until it says back one caption for each of
    three images, and a nocaps-style evaluation source: those images with two references each, plus a corrupt one."""
    from PIL import Image

    from clipcap.train import train
    from tests.test_train import small_cfg

    root = tmp_path_factory.mktemp("e2e")
    # Solid colours: the random tiny CLIP tells them apart (noise images all look alike to it).
    for name, colour in zip(TRAINED, [(255, 0, 0), (0, 0, 255), (0, 255, 0)], strict=True):
        Image.new("RGB", (32, 32), colour).save(root / f"{name}.png")
    (root / "img4.png").write_bytes(b"not an image")
    domains = [d for d, _, _ in TRAINED.values()]
    # Each image listed 5 times: 5 optimizer steps per epoch (an epoch also writes a checkpoint).
    said = [[s] for _, s, _ in TRAINED.values()] * 5
    train_source = nocaps_source(root / "train.json", list(TRAINED) * 5, domains * 5, said)
    store = embed_source(train_source, root / "train-store", clip_dir)
    options = dict(epochs=12, batch_size=3, lr=1e-2, num_samples=0, log_every=100, keep_checkpoints=1)
    run = train(small_cfg(store, root / "run", lm_dir, **options))
    refs = [[s, other] for _, s, other in TRAINED.values()] + [["a dog on a beach."]]
    source = nocaps_source(root / "nocaps_tiny.json", [*TRAINED, "img4"], [*domains, "in-domain"], refs)
    return run / "final", source


def test_cli_evaluates_a_trained_model_on_a_nocaps_style_source(trained, tmp_path, capsys):
    model_dir, source = trained
    out = tmp_path / "metrics.json"
    args = ["evaluate", "--model", str(model_dir), "--data", str(source), "--split", "all", "--out", str(out)]
    code = main([*args, "--beams", "2", "--max-new-tokens", "30", "--batch-size", "2"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    metrics = json.loads(out.read_text())
    with open(out.with_suffix(".csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    # The model says back what it was trained on, so every caption matches one of its references exactly.
    assert {r["image"]: r["prediction"] for r in rows} == {"1": TRAINED["img1"][1], "2": TRAINED["img2"][1],
                                                           "3": TRAINED["img3"][1]}  # fmt: skip
    assert [r["domain"] for r in rows] == ["in-domain", "near-domain", "out-domain"]
    assert metrics["ROUGE-L"] == 1.0 and metrics["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["num_images"] == 3 and list(metrics["domains"]) == ["in-domain", "near-domain", "out-domain"]
    assert all(metrics["domains"][d]["num_images"] == 1 for d in metrics["domains"])
    # The corrupt image was skipped, counted and named, not scored.
    assert metrics["skipped"]["count"] == 1 and metrics["skipped"]["items"][0]["image"].endswith("img4.png")
    assert "skipped 1 images" in captured.err
    # Exact decoding settings and timings are recorded.
    decoding = metrics["settings"]["decoding"]
    assert decoding["num_beams"] == 2 and decoding["max_new_tokens"] == 30 and decoding["strategy"] == "beam search"
    assert decoding["length_penalty"] == 1.0 and decoding["stop_token_id"] == 0 and decoding["batch_size"] == 2
    assert set(metrics["time"]) >= {"generation_s", "images_per_s", "total_s"}
    assert 0 <= metrics["CLIPScore"] <= 2.5 and "RefCLIPScore" in metrics
    assert "| overall | 3 |" in captured.out and "| near-domain | 1 |" in captured.out
    assert "beam search (num_beams=2, max_new_tokens=30)" in captured.out
    # The written predictions (COCO results format) rescore to the same numbers.
    predictions = out.with_name("metrics.predictions.json")
    assert json.loads(predictions.read_text())[0] == {"image_id": 1, "caption": TRAINED["img1"][1]}
    rescored = as_dict(
        ev.evaluate_predictions(
            ev.EvalConfig(predictions=str(predictions), references=str(source), clipscore=False, spice=False)
        )
    )
    for name in ("BLEU-4", "ROUGE-L", "CIDEr"):
        assert rescored[name] == metrics[name]
        for domain in metrics["domains"]:
            assert rescored["domains"][domain][name] == metrics["domains"][domain][name]


def generate_and_score(model_dir, data, **options) -> dict:
    cfg = ev.EvalConfig(model=str(model_dir), data=str(data), split="all", num_beams=1, max_new_tokens=30, spice=False)
    return as_dict(ev.evaluate_model(dataclasses.replace(cfg, **options)))


def test_evaluate_model_on_an_embedding_store_matches_the_source(trained, tmp_path, clip_dir):
    model_dir, source = trained
    store = embed_source(source, tmp_path / "store", clip_dir)
    from_store = generate_and_score(model_dir, store)
    from_source = generate_and_score(model_dir, source)
    assert [r["prediction"] for r in from_store["per_image"]] == [said for _, said, _ in TRAINED.values()]
    assert [r["prediction"] for r in from_store["per_image"]] == [r["prediction"] for r in from_source["per_image"]]
    assert from_store["CIDEr"] == from_source["CIDEr"]
    assert from_store["settings"]["decoding"]["strategy"] == "greedy"
    # float16 store embeddings: CLIPScore agrees with the source's to fp16 precision.
    assert from_store["CLIPScore"] == pytest.approx(from_source["CLIPScore"], abs=1e-2)
    assert list(from_store["domains"]) == list(from_source["domains"])


def test_evaluate_model_says_which_splits_exist(trained):
    model_dir, source = trained
    with pytest.raises(ClipCapError, match="no records in split 'test'"):
        generate_and_score(model_dir, source, split="test")


def test_clipscore_is_unavailable_not_fatal_when_the_clip_has_no_tokenizer(trained, clip_dir, monkeypatch):
    import transformers

    model_dir, source = trained
    load = transformers.AutoTokenizer.from_pretrained

    def no_clip_tokenizer(name, *args, **kwargs):  # the encoder dir ships no tokenizer (ImageEncoder -> None)
        if str(name) == str(clip_dir):
            raise OSError("no tokenizer files")
        return load(name, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_clip_tokenizer)
    result = generate_and_score(model_dir, source)
    assert "CLIPScore" not in result and "no tokenizer files" in result["unavailable"]["RefCLIPScore"]
    assert [r["prediction"] for r in result["per_image"]] == [said for _, said, _ in TRAINED.values()]
