"""Candidates, quality scores, CLIP reranking, filters and the dataset report (`clipcap.rerank`,
`clipcap.caption_report`, `clipcap caption --candidates/--rerank/--min-clip-score`), with hostile inputs through the
real CLI."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest
import torch

from clipcap import Captioner, ClipCapModel
from clipcap.caption_report import dataset_report, repeated_ngram
from clipcap.evaluate import EvalConfig, evaluate_model
from clipcap.metrics import clip_score
from clipcap.rerank import MAX_CANDIDATES, Candidate, choose
from tests.hostile import clipcap, one_line_error
from tests.test_caption_job import TOKENS, run_job, shard_rows
from tests.test_sources import write_image


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Eight small random pictures and a JSONL source naming them with reference captions."""
    root = tmp_path_factory.mktemp("images")
    lines = []
    for i in range(8):
        write_image(root / f"{i}.png", seed=i)
        lines.append(json.dumps({"image": f"{i}.png", "caption": f"picture number {i}."}))
    (root / "d.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def scored_model_dir(tmp_path_factory, varied_model_dir):
    """varied_model_dir whose CLIP tokenizer ends every text with its end token, as real CLIP tokenizers (and the
    demo's) do: CLIP pools the text at the first end token, so without one a text's features depend on the padding
    of the batch it is encoded in, and no two batchings give the same CLIPScore."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("scored") / "model"
    shutil.copytree(varied_model_dir, path)
    tokenizer = AutoTokenizer.from_pretrained(path / "clip")
    eos = tokenizer.eos_token
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, tokenizer.eos_token_id)]
    )
    tokenizer.save_pretrained(path / "clip")
    return path


@pytest.fixture(scope="module")
def collapsed_model_dir(tmp_path_factory, varied_model_dir):
    """varied_model_dir with the mapper's last layer zeroed: every image gets the same prefix (its bias), so the
    same caption."""
    path = tmp_path_factory.mktemp("collapsed") / "model"
    shutil.copytree(varied_model_dir, path)
    model = ClipCapModel.from_pretrained(path)
    last = [m for m in model.mapper.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.zero_()
    model.save_pretrained(path)
    return path


def paths(images) -> list:
    return [images / f"{i}.png" for i in range(8)]


# -- library -------------------------------------------------------------------------------------------------------
def test_candidates_come_from_one_generate_call_with_the_scores_evaluate_gives(scored_model_dir, images):
    captioner = Captioner.from_pretrained(scored_model_dir, batch_size=8)
    calls = []
    generate = captioner.model.generate
    captioner.model.generate = lambda *a, **k: calls.append(k) or generate(*a, **k)
    found = captioner.caption(paths(images), candidates=3, scores=True, max_new_tokens=TOKENS)
    assert len(calls) == 1 and calls[0]["num_return_sequences"] == 3 and calls[0]["num_beams"] == 3
    assert all(len(s.candidates) == 3 for s in found)
    # The search's 3 best in its order: the kept one is beam search's best, as plain captioning gives it.
    captioner.model.generate = generate
    assert [s.caption for s in found] == captioner.caption(paths(images), num_beams=3, max_new_tokens=TOKENS)
    # clip_score: metrics.clip_score (what evaluate reports) on the image's own embedding.
    features = captioner.encoder.encode(paths(images))
    for n, s in enumerate(found):
        texts = [c.caption for c in s.candidates]
        expected = clip_score(texts, captioner.encoder, image_features=features[n].expand(3, -1))["per_image"]
        assert [c.clip_score for c in s.candidates] == pytest.approx(expected["CLIPScore"], abs=1e-4)
    # logprob: minus the LM's own loss on (prefix, caption tokens up to the stop token).
    row = captioner.model.generate(features[:1], num_beams=3, max_new_tokens=TOKENS)[0].tolist()
    stop = captioner.model.config.stop_token_id
    ids = torch.tensor([row[: row.index(stop) + 1] if stop in row else row])
    assert captioner.decode(ids) == [found[0].caption]
    loss = captioner.model(features[:1], ids, labels=ids).loss
    assert found[0].logprob == pytest.approx(-loss.item(), abs=1e-4)


def test_clip_rerank_keeps_the_candidate_with_the_best_clip_score(varied_model_dir, images):
    captioner = Captioner.from_pretrained(varied_model_dir, batch_size=8)
    found = captioner.caption(paths(images), candidates=4, rerank="clip", scores=True, max_new_tokens=TOKENS)
    for s in found:
        assert s.clip_score == max(c.clip_score for c in s.candidates)
        assert [c.clip_score for c in s.runners_up] == sorted((c.clip_score for c in s.runners_up), reverse=True)
    sampled = captioner.caption(paths(images), candidates=4, rerank="clip", do_sample=True, max_new_tokens=TOKENS)
    assert len(sampled) == 8 and all(isinstance(c, str) for c in sampled)


def test_choose_orders_by_clip_score_plus_weighted_logprob_and_keeps_ties_in_search_order():
    cands = [Candidate("a", 0.5, -3.0), Candidate("b", 0.5, -1.0), Candidate("c", 0.4, -0.1)]
    assert choose(cands, "none").caption == "a"
    assert [c.caption for c in choose(cands, "clip").candidates] == ["a", "b", "c"]  # a and b tie: search order
    assert [c.caption for c in choose(cands, "clip", 1.0).candidates] == ["c", "b", "a"]


@pytest.mark.parametrize(
    "options, fragment",
    [
        ({"candidates": 0}, "`candidates` must be a whole number of at least 1"),
        ({"candidates": 2.5}, "`candidates` must be a whole number"),
        ({"candidates": MAX_CANDIDATES + 1}, f"at most {MAX_CANDIDATES}"),
        ({"candidates": 2, "rerank": "best"}, "`rerank` must be one of none, clip"),
        ({"candidates": 2, "rerank": "clip", "rerank_weight": float("nan")}, "finite number"),
        ({"candidates": 2, "rerank": "clip", "rerank_weight": "1"}, "finite number"),
        ({"candidates": 4, "num_beams": 2}, "4 candidates per image need at least 4 beams"),
    ],
)
def test_captioner_refuses_bad_candidate_settings(varied_model_dir, images, options, fragment):
    from clipcap import ClipCapError

    captioner = Captioner.from_pretrained(varied_model_dir)
    with pytest.raises(ClipCapError, match=fragment.replace("(", r"\(")):
        captioner.caption(paths(images)[:1], max_new_tokens=TOKENS, **options)


def test_repeated_ngrams_are_flagged():
    assert repeated_ngram("a red circle a red circle a red circle.") == "a red circle a"
    assert repeated_ngram("a small red circle above a small red square.") is None
    assert repeated_ngram("") is None


def test_report_warns_of_collapse_below_the_threshold_only():
    collapsed = dataset_report(["same."] * 9 + ["other."], [0.5] * 10, [-1.0] * 10, [None] * 10, [True] * 10, 0)
    assert collapsed["distinct_ratio"] == 0.2
    assert "the most frequent, 'same.', is written 9 times" in collapsed["collapse_warning"]
    assert collapsed["top_captions"] == [{"caption": "same.", "count": 9}, {"caption": "other.", "count": 1}]
    assert collapsed["clip_score_quantiles"]["p50"] == 0.5
    varied = dataset_report([f"{i}." for i in range(10)], [None] * 10, [-1.0] * 10, [None] * 10, [True] * 10, 0)
    assert varied["collapse_warning"] is None and varied["clip_score_quantiles"] is None


# -- caption jobs ----------------------------------------------------------------------------------------------------
def test_job_rows_carry_scores_equal_to_evaluate_and_read_back_with_datasets(tmp_path, scored_model_dir, images):
    """--out parquet with 3 candidates reranked by CLIP: every row's clip_score is evaluate's CLIPScore of that
    (image, caption), its candidates are the runners-up, and HF datasets reads the shards."""
    options = dict(max_new_tokens=TOKENS, candidates=3, rerank="clip", workers=0)
    result = run_job(images / "d.jsonl", tmp_path / "out", scored_model_dir, **options)
    rows = {r["key"]: r for r in shard_rows(result.out)}
    assert len(rows) == 8 and all(len(r["candidates"]) == 2 for r in rows.values())
    for r in rows.values():
        assert r["clip_score"] >= max(c["clip_score"] for c in r["candidates"])
        assert r["logprob"] < 0 and r["passed"] is True
    evaluated = evaluate_model(
        EvalConfig(
            model=str(scored_model_dir),
            data=str(images / "d.jsonl"),
            split="all",
            spice=False,
            **{k: v for k, v in options.items() if k != "workers"},
        )  # fmt: skip
    )
    assert len(evaluated.rows) == 8
    for row in evaluated.rows:
        ours = rows[row["image"]]
        assert ours["caption"] == row["prediction"]
        assert ours["clip_score"] == pytest.approx(row["CLIPScore"], abs=1e-4)
    info = json.loads((result.out / "info.json").read_text())
    assert info["report"]["captions_written"] == 8 and info["histogram"] == "clip_score_hist.png"
    assert (result.out / "clip_score_hist.png").read_bytes()[:4] == b"\x89PNG"
    schema = pq.read_schema(next((result.out / "captions").glob("*.parquet")))
    assert str(schema.field("candidates").type) == (
        "list<element: struct<caption: string, clip_score: double, logprob: double>>"
    )
    from datasets import load_dataset

    loaded = load_dataset("parquet", data_files=str(result.out / "captions" / "*.parquet"), split="train")
    assert sorted(loaded["key"]) == sorted(rows) and loaded[0]["candidates"][0].keys() == {
        "caption", "clip_score", "logprob"}  # fmt: skip


def test_min_clip_score_marks_or_drops_and_jsonl_carries_the_same_fields(tmp_path, varied_model_dir, images):
    base = run_job(images / "d.jsonl", tmp_path / "all", varied_model_dir, max_new_tokens=TOKENS, workers=0)
    scores = sorted(r["clip_score"] for r in shard_rows(base.out))
    distinct = sorted(set(scores))
    cut = distinct[len(distinct) // 2]
    below = sum(s < cut for s in scores)
    assert 0 < below < 8
    marked = run_job(images / "d.jsonl", tmp_path / "marked", varied_model_dir, max_new_tokens=TOKENS, workers=0,
                     min_clip_score=cut, shard_format="jsonl")  # fmt: skip
    rows = shard_rows(marked.out, "jsonl")
    assert sorted(r["passed"] for r in rows) == [False] * below + [True] * (8 - below)
    assert set(rows[0]) >= {"key", "image", "caption", "clip_score", "logprob", "repeated_ngram", "passed"}
    assert marked.info["report"]["not_passed"] == below
    dropped = run_job(images / "d.jsonl", tmp_path / "dropped", varied_model_dir, max_new_tokens=TOKENS, workers=0,
                      min_clip_score=cut, drop_below=True)  # fmt: skip
    kept = shard_rows(dropped.out)
    assert len(kept) == 8 - below and all(r["clip_score"] >= cut for r in kept)
    assert dropped.info["num_dropped"] == below and dropped.info["num_skipped"] == 0
    assert dropped.info["report"]["dropped_below_min_clip_score"] == below


def test_a_collapsed_model_triggers_the_collapse_warning_and_a_healthy_one_does_not(
    tmp_path, collapsed_model_dir, varied_model_dir, images
):
    flags = ["--max-new-tokens", TOKENS, "--workers", 0, "--quiet"]
    done = clipcap("caption", *paths(images), "--model", collapsed_model_dir, *flags, "--out", tmp_path / "c")
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "c" / "info.json").read_text())["report"]
    assert report["distinct_ratio"] == 0.125 and report["collapse_warning"]
    assert "WARNING: mode collapse" in done.stderr and len(done.stderr.splitlines()) == 1
    done = clipcap("caption", *paths(images), "--model", varied_model_dir, *flags, "--out", tmp_path / "v")
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "v" / "info.json").read_text())["report"]
    assert report["distinct_ratio"] >= 0.5 > report["collapse_threshold"] and report["collapse_warning"] is None
    assert done.stderr == ""


def test_a_rerun_with_other_candidate_settings_is_refused(tmp_path, varied_model_dir, images):
    flags = ["--model", varied_model_dir, "--max-new-tokens", TOKENS, "--workers", 0, "--quiet", "--out", tmp_path]
    assert clipcap("caption", images / "d.jsonl", *flags, "--candidates", 2).returncode == 0
    for other, differs in ((["--candidates", 3], "candidates"), (["--candidates", 2, "--rerank", "clip"], "rerank")):
        one_line_error(clipcap("caption", images / "d.jsonl", *flags, *other), "differs in: ", differs)


# -- serve ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(scored_model_dir):
    from fastapi.testclient import TestClient

    from clipcap.serve import ServerLimits, create_app

    captioner = Captioner.from_pretrained(scored_model_dir)
    with TestClient(create_app(captioner, ServerLimits(max_beams=4))) as c:
        yield c, captioner


def test_serve_returns_the_reranked_caption_with_its_runners_up(client, images):
    c, captioner = client
    data = (images / "1.png").read_bytes()
    form = {"num_beams": 3, "candidates": 3, "rerank": "clip", "max_new_tokens": TOKENS}
    r = c.post("/v1/captions", files=[("image", ("1.png", data, "image/png"))], data=form)
    assert r.status_code == 200, r.text
    (result,) = r.json()["results"]
    (expected,) = captioner.caption([images / "1.png"], candidates=3, rerank="clip", scores=True,
                                    max_new_tokens=TOKENS)  # fmt: skip
    assert result["captions"] == [expected.caption]
    assert result["scores"][0]["clip_score"] == pytest.approx(expected.clip_score, abs=1e-4)
    assert [x["caption"] for x in result["candidates"]] == [x.caption for x in expected.runners_up]


@pytest.mark.parametrize(
    "form, status, words",
    [
        ({"candidates": 0}, 422, "greater than or equal to 1"),
        ({"candidates": MAX_CANDIDATES + 1, "do_sample": True}, 422, f"less than or equal to {MAX_CANDIDATES}"),
        ({"candidates": 4, "num_beams": 2}, 400, "candidates (4) cannot exceed num_beams (2)"),
        ({"candidates": 2, "num_beams": 2, "rerank": "best"}, 422, "'none' or 'clip'"),
        ({"rerank": "clip"}, 400, "set candidates to 2 or more"),
        ({"candidates": 2, "num_beams": 2, "rerank": "clip", "rerank_weight": "heavy"}, 422, "valid number"),
        ({"candidates": 2, "num_beams": 2, "rerank": "clip", "rerank_weight": "nan"}, 422, "finite number"),
        ({"candidates": 2, "num_beams": 2, "num_captions": 2}, 400, "one caption per image"),
    ],
)
def test_serve_refuses_bad_candidate_settings(client, images, form, status, words):
    c, _ = client
    r = c.post("/v1/captions", files=[("image", ("a.png", (images / "0.png").read_bytes(), "image/png"))], data=form)
    assert r.status_code == status and words in r.text, r.text


# -- hostile, through the real CLI --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--candidates", "0"], "--candidates must be at least 1"),
        (["--candidates", str(MAX_CANDIDATES + 1)], f"at most {MAX_CANDIDATES}"),
        (["--candidates", "many"], "--candidates"),
        (["--candidates", "4", "--beams", "2"], "4 candidates per image need at least 4 beams"),
        (["--rerank", "clip"], "--candidates to 2 or more"),
        (["--rerank", "best"], "--rerank"),
        (["--candidates", "2", "--rerank", "clip", "--rerank-weight", "heavy"], "--rerank-weight"),
        (["--candidates", "2", "--rerank", "clip", "--rerank-weight", "nan"], "--rerank-weight"),
        (["--candidates", "2", "--rerank-weight", "1"], "--rerank-weight only applies with --rerank clip"),
        (["--min-clip-score", "-1"], "--min-clip-score must be at least 0"),
        (["--min-clip-score", "x"], "--min-clip-score"),
        (["--drop-below"], "--drop-below needs --min-clip-score"),
        (["--collapse-threshold", "2"], "--collapse-threshold"),
        (["--candidates", "2", "--num-captions", "2"], "--candidates applies to one caption per image"),
    ],
)
def test_bad_candidate_and_filter_flags_are_one_line(tmp_path, varied_model_dir, images, flags, fragment):
    done = clipcap("caption", images / "0.png", "--model", varied_model_dir, *flags, "--out", tmp_path / "o")
    one_line_error(done, fragment)
    assert not (tmp_path / "o" / "captions").exists()


def test_evaluate_refuses_bad_candidates_in_one_line(tmp_path, varied_model_dir, images):
    data = ["--data", images / "d.jsonl", "--split", "all"]
    flags = ["--model", varied_model_dir, *data, "--quiet", "--out", tmp_path / "m.json"]
    one_line_error(clipcap("evaluate", *flags, "--candidates", "0"), "--candidates must be at least 1")
    one_line_error(clipcap("evaluate", *flags, "--candidates", "3", "--beams", "2"), "at least 3 beams")


def test_an_encoder_without_a_text_tower_is_one_line(tmp_path, varied_model_dir, images):
    """Its clip/ without tokenizer files (the text tower unusable), and a complete captioning dir (a vision tower
    only): reranking and a score filter are refused, plain captioning still works with clip_score null."""
    blind = tmp_path / "no-tokenizer"
    shutil.copytree(varied_model_dir, blind)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"):
        (blind / "clip" / name).unlink(missing_ok=True)
    complete = Captioner.from_pretrained(varied_model_dir).save_pretrained(tmp_path / "complete")
    for model, fragment in ((blind, "no tokenizer files"), (complete, "no text tower")):
        for flags in (["--candidates", "2", "--rerank", "clip"], ["--min-clip-score", "0.1"]):
            done = clipcap("caption", images / "0.png", "--model", model, *flags, "--max-new-tokens", TOKENS)
            one_line_error(done, fragment)
    done = clipcap("caption", images / "0.png", "--model", blind, "--max-new-tokens", TOKENS, "--quiet")
    assert done.returncode == 0 and json.loads(done.stdout)["clip_score"] is None


def test_a_store_that_names_no_encoder_is_one_line_when_scores_are_needed(tmp_path, varied_model_dir, images):
    store = tmp_path / "store"
    assert clipcap("embed", images / "d.jsonl", "--out", store, "--clip-model", varied_model_dir / "clip",
                   "--workers", 0, "--quiet").returncode == 0  # fmt: skip
    info = json.loads((store / "info.json").read_text())
    info.pop("clip_model")
    info.pop("clip_fingerprint", None)
    (store / "info.json").write_text(json.dumps(info))
    flags = ["--model", varied_model_dir, "--max-new-tokens", TOKENS]
    done = clipcap("caption", store, *flags, "--candidates", "2", "--rerank", "clip")
    one_line_error(done, "does not record which encoder made its embeddings")
    done = clipcap("evaluate", "--data", store, "--split", "all", *flags, "--candidates", "2", "--rerank", "clip",
                   "--quiet", "--out", tmp_path / "m.json")  # fmt: skip
    one_line_error(done, "does not record which encoder made its embeddings")


def test_a_store_captions_without_scores_when_its_encoder_cannot_be_loaded(tmp_path, varied_model_dir, images):
    """Stored vectors caption without the encoder, as before scores existed: only clip_score is lost, with one
    warning line; asking for scores then is one error line."""
    import shutil

    shutil.copytree(varied_model_dir / "clip", tmp_path / "clip")
    assert clipcap("embed", images / "d.jsonl", "--out", "store", "--clip-model", "clip", "--workers", 0, "--quiet",
                   cwd=tmp_path).returncode == 0  # fmt: skip
    shutil.rmtree(tmp_path / "clip")  # the encoder the store and the model name is gone
    model = tmp_path / "model"
    shutil.copytree(varied_model_dir, model, ignore=shutil.ignore_patterns("clip"))
    done = clipcap("caption", "store", "--model", model, "--max-new-tokens", TOKENS, "--out", "out", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    warning = [line for line in done.stderr.splitlines() if "clip_score" in line]
    assert len(warning) == 1 and "cannot load CLIP encoder" in warning[0], done.stderr
    info = json.loads((tmp_path / "out" / "info.json").read_text())
    rows = pq.read_table(tmp_path / "out" / "captions").to_pylist()
    assert rows and info["num_captioned"] == len(rows)
    assert all(r["clip_score"] is None and r["caption"] for r in rows)
    done = clipcap("caption", "store", "--model", model, "--max-new-tokens", TOKENS, "--out", "out2",
                   "--candidates", "2", "--rerank", "clip", cwd=tmp_path)  # fmt: skip
    one_line_error(done, "cannot load CLIP encoder")
