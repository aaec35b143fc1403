"""Model cards: front matter that parses and names what the Hub needs, metrics and training settings found beside
the model, usage snippets; `clipcap card`."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

from clipcap import ClipCapError
from clipcap.card import CardConfig, build_card, write_card
from clipcap.cli import main
from clipcap.train import TrainConfig
from tests import tiny

# What `clipcap evaluate --model M --data D` writes to metrics.json (scores, then the settings they came from).
EVALUATED = {
    "BLEU-1": 0.7012,
    "BLEU-4": 0.3158,
    "METEOR": 0.2721,
    "ROUGE-L": 0.5432,
    "CIDEr": 1.0571,
    "SPICE": 0.2034,
    "CLIPScore": 0.7655,
    "num_images": 5000,
    "tokenizer": "ptb",
    "settings": {"model": "run/final", "data": "data/coco/dataset_coco.json", "split": "test"},
}


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


@pytest.fixture()
def run_dir(tmp_path):
    """RUN_DIR/final as `clipcap train` leaves it, with train_config.json in RUN_DIR and metrics.json beside."""
    final = tmp_path / "run" / "final"
    tiny.tiny_model("mlp", lm_name="gpt2", clip_model="openai/clip-vit-base-patch32").save_pretrained(final)
    config = TrainConfig(data="data/coco-store", out=str(tmp_path / "run"), lm="gpt2", epochs=10)
    (tmp_path / "run" / "train_config.json").write_text(json.dumps(dataclasses.asdict(config)))
    (tmp_path / "run" / "metrics.json").write_text(json.dumps(EVALUATED))
    return final


def test_card_front_matter_usage_and_training(run_dir):
    text = str(build_card(CardConfig(model_dir=str(run_dir), repo_id="someone/clipcap-coco", license="mit")))
    meta = front_matter(text)
    assert meta["pipeline_tag"] == "image-to-text" and meta["library_name"] == "transformers"
    assert meta["license"] == "mit" and "clipcap" in meta["tags"]
    assert meta["base_model"] == ["gpt2", "openai/clip-vit-base-patch32"]
    assert meta["metrics"] == ["bleu", "cider", "clipscore", "meteor", "rouge", "spice"]
    (result,) = meta["model-index"][0]["results"]
    assert result["dataset"] == {"name": "dataset_coco.json", "type": "dataset_coco.json", "split": "test"}
    values = {m["name"]: m["value"] for m in result["metrics"]}
    assert values == {k: round(v, 4) for k, v in EVALUATED.items() if k in values} and len(values) == 7
    assert 'Captioner.from_pretrained("someone/clipcap-coco")' in text and "pip install clipcap-hf`" in text
    # a dir that names its encoder cannot run in pipeline: the card says how to make it complete instead
    assert "pipeline(" not in text and '.save_pretrained("someone/clipcap-coco-complete")' in text
    pushed = str(build_card(CardConfig(model_dir=str(run_dir), repo_id="someone/clipcap-coco"), complete=True))
    assert 'pipeline("image-text-to-text", model="someone/clipcap-coco", trust_remote_code=True)' in pushed
    training = json.loads(text.split("```json\n")[1].split("```")[0])
    assert training["lm"] == "gpt2" and training["epochs"] == 10 and training["data"] == "data/coco-store"


def test_local_names_are_not_base_models_and_no_metrics_means_no_model_index(tmp_path, lm_dir):
    model = tmp_path / "model"
    tiny.tiny_model("mlp", lm_name=str(lm_dir), clip_model="clip").save_pretrained(model)
    (model / "clip").mkdir()
    meta = front_matter(str(build_card(CardConfig(model_dir=str(model)))))
    assert "base_model" not in meta and "model-index" not in meta and "metrics" not in meta
    assert meta["license"] == "unknown" and meta["pipeline_tag"] == "image-to-text"


def test_cli_card_writes_readme(run_dir, capsys):
    assert main(["card", str(run_dir), "--license", "apache-2.0"]) == 0
    assert "wrote" in capsys.readouterr().err
    meta = front_matter((run_dir / "README.md").read_text())
    assert meta["license"] == "apache-2.0" and meta["model-index"][0]["name"] == "final"


def test_card_errors(run_dir, tmp_path):
    with pytest.raises(ClipCapError, match="metrics file not found"):
        write_card(CardConfig(model_dir=str(run_dir), metrics=str(tmp_path / "nope.json")))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ClipCapError, match="bad.json is not readable JSON"):
        write_card(CardConfig(model_dir=str(run_dir), metrics=str(tmp_path / "bad.json")))
    with pytest.raises(ClipCapError, match="is a directory"):
        write_card(CardConfig(model_dir=str(run_dir), out=str(tmp_path)))
    with pytest.raises(ClipCapError, match="not a ClipCap model dir"):
        write_card(CardConfig(model_dir=str(tmp_path)))
    (tmp_path / "odd.json").write_text(json.dumps({"CIDEr": "high", "variants": 3}))
    meta = front_matter(str(build_card(CardConfig(model_dir=str(run_dir), metrics=str(tmp_path / "odd.json")))))
    assert "model-index" not in meta  # a metrics file without numbers adds nothing
