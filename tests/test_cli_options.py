"""One source for every option: each command's flags are its options dataclass, with the same defaults and help; the
top-level guard turns every failure into one line; `--device auto` is CUDA wherever CUDA is available."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clipcap.cli import build_parser, main
from clipcap.cli.arguments import flag_name, parse_options, show_default
from clipcap.cli.commands import COMMANDS
from clipcap.demo.world import STYLES
from clipcap.errors import ClipCapError

# The smallest valid command line of each command: its positional arguments and required flags.
REQUIRED = {
    "convert": ["orig.pt", "out"],
    "caption": ["img.jpg", "--model", "m"],
    "embed": ["src.json", "--out", "store", "--clip-model", "clip"],
    "train": ["--data", "store", "--out", "run"],
    "merge-lora": ["model", "merged"],
    "evaluate": ["--predictions", "p.json", "--references", "r.json"],
    "export": ["m", "out"],
    "serve": ["--model", "m"],
    "demo": [],
    "experiment": ["mapping", "--out", "exp"],
    "push": ["model", "you/repo"],
    "card": ["model"],
}


GIVEN = {"evaluate": {"predictions", "references"}}  # optional fields the minimal command line gives


def test_every_command_is_covered():
    assert set(REQUIRED) == {c.name for c in COMMANDS}


def help_text(capsys, name: str) -> str:
    with pytest.raises(SystemExit) as done:
        main([name, "--help"])
    assert done.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines anywhere


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.name)
def test_each_field_is_a_flag_with_its_default_in_help(command, capsys):
    text = help_text(capsys, command.name)
    for f in dataclasses.fields(command.options):
        meta = f.metadata
        assert meta["help"], f"{command.name}.{f.name} has no help text"
        if meta["positional"]:
            shown = "{" + ",".join(meta["choices"]) + "}" if meta["choices"] else meta["metavar"] or f.name
            assert shown in text
            continue
        flags = [f"--{meta['negate']}"] if meta["negate"] else [f"--{n}" for n in meta["pair"] or [flag_name(f)]]
        for flag in flags:
            assert re.search(rf"(^|[\s\[]){re.escape(flag)}([\s,\]]|$)", text), f"{flag} missing from {command.name}"
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if not required:
            assert f"(default: {' '.join(show_default(f).split())})" in text, f"{command.name}.{f.name}"


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.name)
def test_no_flags_gives_exactly_the_dataclass_defaults(command):
    args = build_parser(only=command.name).parse_args([command.name, *REQUIRED[command.name]])
    parsed = parse_options(command.options, args)
    given = {f.name: getattr(parsed, f.name) for f in dataclasses.fields(parsed)}
    named = required_fields(command.options) | GIVEN.get(command.name, set())
    reference = command.options(**{k: v for k, v in given.items() if k in named})
    assert parsed == reference  # every field not on the command line is the dataclass default


def required_fields(cls) -> set[str]:
    return {
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }


def test_a_flag_value_reaches_its_field_unchanged():
    args = build_parser(only="train").parse_args(["train", *REQUIRED["train"], "--epochs", "3", "--frozen-lm"])
    cfg = parse_options(COMMANDS[3].options, args)
    assert (cfg.epochs, cfg.tune_lm, cfg.batch_size) == (3, False, 40)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--data", "s", "--out", "r", "--epochs", "0"], "train: error: --epochs must be at least 1, got 0"),
        (["train", "--data", "s", "--out", "r", "--epochs", "x"], "train: error: argument --epochs: invalid int"),
        (["train", "--data", "s", "--out", "r", "--lm-lr", "1e-5", "--frozen-lm"], "--lm-lr needs --tune-lm"),
        (["evaluate", "--model", "m"], "clipcap evaluate: error: --model needs --data"),
        (["caption", "x.jpg", "--model", "m", "--temperature", "0.5"], "--temperature only applies when sampling"),
        (["serve", "--model", "m", "--beams", "9"], "the default --beams 9 exceeds --max-beams 8"),
        (["nosuch"], "clipcap: error: argument COMMAND: invalid choice: 'nosuch'"),
        (["experiment", "tuning", "--quick", "--out", "x", "--styles", ""], "--styles must name at least one value"),
        (["experiment", "relations", "--quick", "--out", "x", "--token-grids", ","], "--token-grids must name"),
    ],
)
def test_user_mistakes_are_one_line_naming_the_flag(argv, message, capsys):
    try:
        code = main(argv)
    except SystemExit as done:  # argparse's own errors exit from inside parse_args
        code = done.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err, err


STYLE_ITEMS = st.sampled_from([*STYLES, "", " ", "fancy", "PLAIN", " plain", "\udcff", "plain;catalogue"])


@settings(max_examples=60, deadline=None)
@given(st.lists(STYLE_ITEMS, max_size=4).map(",".join) | st.text())
def test_a_list_option_with_choices_keeps_exactly_its_named_items_or_refuses(text):
    """`--styles TEXT`: the comma-separated items, blanks dropped, when every one is a choice; else one ClipCapError."""
    args = build_parser(only="experiment").parse_args(["experiment", "tuning", "--out", "x", f"--styles={text}"])
    options = next(c.options for c in COMMANDS if c.name == "experiment")
    items = [v for v in text.split(",") if v.strip()]
    if items and all(v in STYLES for v in items):
        assert parse_options(options, args).styles == items
    else:
        with pytest.raises(ClipCapError, match="`styles` must"):
            parse_options(options, args)


def test_an_internal_error_is_one_line_with_a_way_to_the_traceback(monkeypatch, capsys):
    from clipcap.cli import commands

    def boom(cfg, progress):
        raise ZeroDivisionError("division by zero")

    broken = [dataclasses.replace(c, run=boom) if c.name == "demo" else c for c in commands.COMMANDS]
    monkeypatch.setattr("clipcap.cli.COMMANDS", tuple(broken))
    assert main(["demo"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error: ZeroDivisionError: division by zero" in err and "--debug" in err
    with pytest.raises(ZeroDivisionError):
        main(["demo", "--debug"])


@pytest.mark.parametrize("command", ["serve", "evaluate", "caption", "embed"])
def test_device_auto_is_the_default_and_picks_cuda(command, monkeypatch):
    from clipcap.devices import resolve_device

    args = build_parser(only=command).parse_args([command, *REQUIRED[command]])
    cfg = parse_options(next(c for c in COMMANDS if c.name == command).options, args)
    assert cfg.device == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert resolve_device(cfg.device) == torch.device("cuda", 0)


@pytest.mark.parametrize("command", ["serve", "evaluate"])
def test_serve_and_evaluate_load_the_model_on_cuda_when_available(command, monkeypatch, capsys, tmp_path):
    """The commands hand `auto` to the loader, which resolves it to CUDA (loading stops there: no GPU here)."""
    from clipcap import captioner as captioner_module
    from clipcap.devices import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    seen = []

    def fake_from_pretrained(name, clip_model=None, device=None, dtype=None, batch_size=32):
        seen.append(resolve_device(device))
        raise ClipCapError("stop here")

    monkeypatch.setattr(captioner_module.Captioner, "from_pretrained", staticmethod(fake_from_pretrained))
    argv = {"serve": ["serve", "--model", "m"], "evaluate": ["evaluate", "--model", "m", "--data", str(tmp_path)]}
    assert main(argv[command]) == 2 and "stop here" in capsys.readouterr().err
    assert seen == [torch.device("cuda", 0)]
