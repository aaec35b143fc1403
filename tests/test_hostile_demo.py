"""`clipcap demo` and `clipcap experiment` on hostile outputs and options, through the real command."""

from __future__ import annotations

import pytest

from tests.hostile import clipcap, one_line_error


@pytest.mark.parametrize("command", [["demo", "--quick"], ["experiment", "mapping", "--quick"]])
def test_an_output_that_is_a_file_is_one_line(command, tmp_path):
    (tmp_path / "file").write_text("x")
    done = clipcap(*command, "--out", tmp_path / "file")
    one_line_error(done, f"clipcap {command[0]}: error:", "is a file, not a directory")


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["demo", "--encoders", "/no/such/encoders"], ["shapes-world encoders are missing under /no/such/encoders"]),
        (["experiment", "mapping"], ["the following arguments are required: --out"]),
        (["experiment", "depth", "--out", "x"], ["argument kind: invalid choice: 'depth'"]),
        (["experiment", "mapping", "--out", "x", "--lengths", "a,b"], ["argument --lengths: expected a comma"]),
        (["experiment", "prefix-length", "--out", "x", "--lengths", "0,4"], ["--lengths must be at least 1, got 0"]),
        (["experiment", "mapping", "--out", "x", "--data", "/no/store", "--lm", "y"], ["embedding store not found"]),
        (["experiment", "tuning", "--quick", "--out", "x", "--styles", ""], ["--styles must name at least one value"]),
        (["experiment", "tuning", "--quick", "--out", "x", "--styles", " , "], ["--styles must name at least one"]),
        (["experiment", "tuning", "--quick", "--out", "x", "--styles", "plain,fancy"], ["--styles must be one of"]),
        (["experiment", "tuning", "--quick", "--out", "x", "--styles", "PLAIN"], ["got 'PLAIN'"]),
        (["experiment", "tuning", "--quick", "--out", "x", "--styles", "plain,\udcff"], ["got '\\udcff'"]),
        (["experiment", "tuning", "--out", "x", "--data", "s", "--lm", "m", "--styles", "catalogue"], ["to tuning on"]),
        (["experiment", "relations", "--quick", "--out", "x", "--styles", "catalogue"], ["not to relations (plain"]),
        (["experiment", "tuning", "--quick", "--out", "x", "--lora-ranks", ""], ["--lora-ranks must name at least"]),
    ],
)
def test_bad_options_are_one_line(args, fragments, tmp_path):
    one_line_error(clipcap(*args, cwd=tmp_path), f"clipcap {args[0]}: error:", *fragments)
