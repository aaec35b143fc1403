"""Prompted captioning (a caption that continues given text, as BLIP offers) through every front end: Captioner,
`clipcap caption --prompt`, and the server's `prompt` field / `clipcap serve --prompt` default."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from clipcap import Captioner
from clipcap.cli import build_parser, main
from clipcap.serve import ServerLimits, create_app

PROMPT = "a red"


@pytest.fixture(scope="module")
def captioner(varied_model_dir):
    return Captioner.from_pretrained(varied_model_dir)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prompt-images")
    out = []
    for i in range(3):
        out.append(folder / f"{i}.png")
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(out[-1])
    return out


def test_captioner_prompt_is_the_start_of_each_caption(captioner, paths):
    plain = captioner.caption(paths, max_new_tokens=8)
    prompted = captioner.caption(paths, max_new_tokens=8, prompt=PROMPT)
    assert all(c.startswith(PROMPT) for c in prompted) and prompted != plain
    assert captioner.caption(paths, max_new_tokens=8, prompt="") == plain  # an empty prompt is no prompt


def test_cli_caption_prompt(varied_model_dir, captioner, paths, capsys):
    code = main(
        ["caption", *map(str, paths), "--model", str(varied_model_dir), "--max-new-tokens", "8"]
        + ["--prompt", PROMPT, "--quiet"]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["caption"] for r in records] == captioner.caption(paths, max_new_tokens=8, prompt=PROMPT)


def _png(path) -> bytes:
    buffer = io.BytesIO()
    Image.open(path).save(buffer, format="PNG")
    return buffer.getvalue()


def test_server_prompt_field_and_default(captioner, paths):
    expected = captioner.caption(paths[:2], max_new_tokens=8, prompt=PROMPT)
    files = [("image", (p.name, _png(p), "image/png")) for p in paths[:2]]
    with TestClient(create_app(captioner, ServerLimits())) as client:
        response = client.post("/v1/captions", files=files, data={"prompt": PROMPT, "max_new_tokens": "8"})
        assert response.status_code == 200, response.text
        assert [r["captions"][0] for r in response.json()["results"]] == expected
        too_long = client.post("/v1/captions", files=files, data={"prompt": "x" * 201})
        assert too_long.status_code == 422
    with TestClient(create_app(captioner, ServerLimits(prompt=PROMPT))) as client:
        response = client.post("/v1/captions", files=files, data={"max_new_tokens": "8"})
        assert [r["captions"][0] for r in response.json()["results"]] == expected
    assert build_parser(only="serve").parse_args(["serve", "--model", "m", "--prompt", PROMPT]).prompt == PROMPT
