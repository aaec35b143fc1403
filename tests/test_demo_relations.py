"""The demo's model on scenes drawn by an independent renderer (tests/independent_scenes.py): both objects of two
in one caption, the relation between them, novel compositions, single objects.

The model is trained here with the demo's own recipe (DemoRecipe(): the same world, store and first variant, which
is what `clipcap demo` ships as DIR/model), so the figures are those of the model a user gets from `make demo`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from clipcap.demo import world as shapes
from clipcap.demo.encoders import ASSETS
from tests import independent_scenes as independent

COUNT = 300  # scenes per kind: a standard error of at most 2.9 points on each fraction
TARGETS = {  # the bar: (kind, metric) -> minimum
    ("pair", "pairs_exact"): 0.95,
    ("pair", "relation_right"): 0.90,
    ("novel pair", "pairs_exact"): 0.85,
    ("single", "single"): 0.98,
    ("novel single", "single"): 0.95,
}


@pytest.fixture(scope="module")
def demo_captioner(tmp_path_factory):
    from clipcap import Captioner
    from clipcap.demo.runner import DemoRecipe, build_model

    recipe = DemoRecipe()
    threads = torch.get_num_threads()
    try:
        model_dir = build_model(tmp_path_factory.mktemp("demo-model"), recipe, ASSETS)
    finally:
        torch.set_num_threads(threads)
    return Captioner.from_pretrained(model_dir, batch_size=128), recipe


@pytest.fixture(scope="module")
def scored(demo_captioner):
    captioner, recipe = demo_captioner
    rng = np.random.default_rng(2026)
    results = {}
    for kind, draw, novel in (
        ("pair", independent.pair, False),
        ("novel pair", independent.pair, True),
        ("single", independent.single, False),
        ("novel single", independent.single, True),
    ):
        drawn = [draw(rng, novel) for _ in range(COUNT)]
        images = [Image.fromarray(pixels) for pixels, _ in drawn]
        captions = captioner.caption(images, num_beams=recipe.num_beams, max_new_tokens=recipe.max_new_tokens)
        references = [[truth] for _, truth in drawn]
        results[kind] = shapes.binding_accuracy(captions, references) | shapes.relation_accuracy(captions, references)
    return results


@pytest.mark.skipif(not (ASSETS / "clip" / "config.json").is_file(), reason="shipped encoders not built")
@pytest.mark.parametrize(("kind", "metric"), sorted(TARGETS))
def test_demo_model_on_independently_drawn_scenes(scored, kind, metric):
    result = scored[kind]
    assert result[metric] >= TARGETS[kind, metric], f"{kind} {metric} {result[metric]:.3f}: {result['errors']}"
