"""Command-line flags generated from option dataclasses (`clipcap.options`), as transformers' HfArgumentParser does.

Every field becomes `--field-name` (or a positional argument, or the flags its metadata names) with its type, its
choices and its help text followed by its default, so a default is written once, in the dataclass. Parsing gives back
an instance of the dataclass: with no flags, exactly its defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

from ..options import field_types, unwrap_optional


def flag_name(f: dataclasses.Field) -> str:
    """The command-line flag of an option field (without the leading dashes)."""
    return f.metadata.get("flag") or f.name.replace("_", "-")


def show_default(f: dataclasses.Field) -> str:
    """How a field's default is shown in --help: its `default_text`, or the value itself."""
    if f.metadata.get("default_text"):
        return f.metadata["default_text"]
    default = f.default if f.default is not dataclasses.MISSING else None
    if f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    if isinstance(default, (list, tuple)):
        return ",".join(map(str, default))
    return "none" if default is None else str(default)


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _comma_list(item_type):
    def parse(text: str) -> list:
        try:
            return [item_type(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from None

    parse.__name__ = f"list of {item_type.__name__}"
    return parse


def _escape(text: str) -> str:
    return text.replace("%", "%%")


def add_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one argument per CLI field of the option dataclass `cls` to `parser`."""
    hints = field_types(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        tp, _ = unwrap_optional(hints[f.name])
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        text = _escape(meta.get("help", ""))
        if meta.get("max") is not None:
            low = meta.get("min")
            text += f" (at most {meta['max']:g})" if low is None else f" ({low:g} to {meta['max']:g})"
        if not required:
            text += f" (default: {_escape(show_default(f))})"
        kwargs: dict[str, Any] = {"dest": f.name, "help": text}
        if not required:
            has_factory = f.default_factory is not dataclasses.MISSING
            kwargs["default"] = f.default_factory() if has_factory else f.default
        if meta.get("choices") is not None:
            kwargs["choices"] = list(meta["choices"])
        if meta.get("metavar"):
            kwargs["metavar"] = meta["metavar"]
        if meta.get("pair"):
            on, off = meta["pair"]
            on_help, off_help = meta.get("pair_help") or (text, text)
            group = parser.add_mutually_exclusive_group()
            group.add_argument(f"--{on}", dest=f.name, action="store_true", default=None, help=_escape(on_help))
            group.add_argument(
                f"--{off}",
                dest=f.name,
                action="store_false",
                help=_escape(off_help) + f" (default: {_escape(show_default(f))})",
            )
            continue
        if tp is bool and meta.get("negate"):
            parser.add_argument(f"--{meta['negate']}", action="store_false", **kwargs)
            continue
        if tp is bool and f.default is False:
            parser.add_argument(f"--{flag_name(f)}", action="store_true", **kwargs)
            continue
        if typing.get_origin(tp) is list:
            (item,) = typing.get_args(tp)
            if meta.get("positional"):
                parser.add_argument(f.name, nargs="+", type=item, **{k: v for k, v in kwargs.items() if k != "dest"})
            else:
                # argparse would check the whole list against the choices; check_options checks each item
                choices = kwargs.pop("choices", None)
                if choices:
                    kwargs["metavar"] = "{" + ",".join(map(str, choices)) + "}[,...]"
                parser.add_argument(f"--{flag_name(f)}", type=_comma_list(item), **kwargs)
            continue
        kwargs["type"] = _parse_bool if tp is bool else tp
        if meta.get("positional"):
            kwargs.pop("dest")
            parser.add_argument(f.name, **kwargs)
        else:
            parser.add_argument(f"--{flag_name(f)}", required=required, **kwargs)


def parse_options(cls: type, args: argparse.Namespace):
    """The option dataclass `cls` built from parsed arguments (fields not on the command line keep defaults)."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**given)


def flags_of(cls: type) -> dict[str, str]:
    """field name -> its flag as a user types it (for messages that name a field)."""
    out = {}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if meta.get("pair"):
            out[f.name] = f"--{meta['pair'][0]}"
        elif meta.get("negate"):
            out[f.name] = f"--{meta['negate']}"
        elif meta.get("positional"):
            out[f.name] = f.name.upper()
        else:
            out[f.name] = f"--{flag_name(f)}"
    return out
