"""`clipcap serve` start-up on hostile settings, through the real command: one line, no traceback, no server left.
(Hostile requests to a running server are tests/test_serve.py's.)"""

from __future__ import annotations

import pytest

from tests.hostile import clipcap, one_line_error


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--port", "-1"], ["--port must be at least 0"]),
        (["--port", "http"], ["argument --port: invalid int value"]),
        (["--max-upload-mb", "0"], ["--max-upload-mb must be at least 0.001"]),
        (["--max-images", "0"], ["--max-images must be at least 1"]),
        (["--beams", "12"], ["the default --beams 12 exceeds --max-beams 8"]),
        (["--max-new-tokens", "120", "--max-tokens", "110"], ["the default --max-new-tokens 120 exceeds --max-tokens"]),
        (["--timeout", "nan"], ["--timeout must be float, got nan"]),
        (["--device", "cuda"], ["device 'cuda' is not available here"]),
        (["--temperature", "0.7"], ["--temperature only applies when sampling"]),
    ],
)
def test_bad_settings_are_one_line(args, fragments, model_dir):
    one_line_error(clipcap("serve", "--model", model_dir, *args, timeout=120), "clipcap serve: error:", *fragments)


def test_a_missing_model_is_one_line(tmp_path):
    one_line_error(clipcap("serve", "--model", tmp_path / "nope"), "model directory not found")
