"""Shared fixtures: tiny random models written to temp dirs once per session. Never touches the network."""

from __future__ import annotations

import logging
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # `-n N`: N workers share the cores instead of each taking all of them
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from tests import tiny  # noqa: E402

# Property tests: a bounded number of examples in CI, many more locally with HYPOTHESIS_PROFILE=long.
settings.register_profile(
    "ci",
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.register_profile("long", max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def tokenizer():
    return tiny.tiny_tokenizer()


@pytest.fixture(scope="session")
def lm_dir(tmp_path_factory, tokenizer):
    """A tiny GPT-2 + tokenizer saved as an ordinary HF dir (what `--lm DIR` takes)."""
    return tiny.save_lm_dir(tmp_path_factory.mktemp("lm"), tiny.tiny_gpt2(len(tokenizer)), tokenizer)


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory, tokenizer):
    """A tiny CLIPModel + image processor (+ tokenizer for the text tower), 16-d projections, 32-px images."""
    return tiny.save_clip_dir(tmp_path_factory.mktemp("clip"), tiny.tiny_clip(len(tokenizer)), tokenizer)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer, clip_dir):
    """A ClipCap model dir (MLP, tuned tiny GPT-2, k=4) with its tokenizer and a copy of the encoder under clip/."""
    import shutil

    path = tmp_path_factory.mktemp("model")
    model = tiny.tiny_model("mlp", lm=tiny.tiny_gpt2(len(tokenizer)))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    shutil.copytree(clip_dir, path / "clip")
    return path


@pytest.fixture(scope="session")
def varied_model_dir(tmp_path_factory, tokenizer, clip_dir):
    """Like model_dir, but with tiny.varied_lm (captions of varied tokens) and "." as the stop token, as the
    original stopped."""
    import shutil

    path = tmp_path_factory.mktemp("varied-model")
    stop = tokenizer.convert_tokens_to_ids(".")
    tiny.tiny_model("mlp", lm=tiny.varied_lm(vocab_size=len(tokenizer)), stop_token_id=stop).save_pretrained(path)
    tokenizer.save_pretrained(path)
    shutil.copytree(clip_dir, path / "clip")
    return path


@pytest.fixture(scope="session")
def exported_dir(tmp_path_factory, varied_model_dir):
    """varied_model_dir exported for ONNX Runtime in fp32 by the library (`clipcap export`)."""
    from clipcap.export import export

    return export(varied_model_dir, tmp_path_factory.mktemp("exported") / "fp32", progress=False)


@pytest.fixture
def hf_warnings():
    """The messages transformers logs at WARNING or above during the test (its loggers do not propagate to the
    root, so pytest's caplog does not see them); `warning_once`'s memory is cleared first."""
    from transformers.utils import logging as hf_logging

    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(handler)
    hf_logging.warning_once.cache_clear()
    yield records
    hf_logger.removeHandler(handler)
