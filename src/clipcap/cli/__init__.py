"""The `clipcap` command: the application layer over the library.

Each subcommand's flags are generated from its options dataclass (`arguments.py`); its body is a small function in
`commands.py`. This module is the top-level guard: a user mistake (`ClipCapError`, a bad flag) is one line on stderr
and exit status 2; a closed output pipe ends quietly; anything else is one line naming an internal error, with the
traceback only under `--debug` or CLIPCAP_DEBUG=1.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import warnings

from ..errors import ClipCapError
from ..outputs import disk_full, disk_full_error
from ..version import __version__
from .arguments import add_options, flags_of, parse_options
from .commands import COMMANDS, Command

DEBUG_ENV = "CLIPCAP_DEBUG"
_FIELD = re.compile(r"`([a-z][a-z0-9_]*)`")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (`clipcap CMD: error: ...`, exit 2) instead of usage + message."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _TqdmHandler(logging.Handler):
    """Log lines written with tqdm.write, so they do not tear progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never raise into the program
            self.handleError(record)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The `clipcap` parser, with the options of the command `only`: a command's options are imported only when it
    runs or shows its help."""
    parser = _Parser(
        prog="clipcap",
        description="ClipCap: CLIP prefix captioning — convert, caption, embed, train, evaluate, export, serve, push.",
    )
    parser.add_argument("--version", action="version", version=f"clipcap {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.description)
        if only == command.name:
            add_options(p, command.options)
            if command.progress:
                p.add_argument("--quiet", action="store_true", help="no progress bars or progress messages")
            p.add_argument("--debug", action="store_true", help=f"show an internal error's traceback ({DEBUG_ENV}=1)")
    return parser


def _one_line(message: str, command: Command | None) -> str:
    """The message on one line, with option field names (`batch_size`) spelled as the command's flags."""
    flags = flags_of(command.options) if command is not None else {}
    text = _FIELD.sub(lambda m: flags.get(m.group(1), m.group(0)), str(message))
    return " ".join(text.split())


def _quiet_libraries() -> None:
    """Silence what a user cannot act on: transformers' notices and download bars, tokenizers' fork warning."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*torchvision.*")


def _configure_logging(command: str, quiet: bool) -> None:
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter(f"clipcap {command}: %(message)s"))
    root = logging.getLogger("clipcap")
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING if quiet else logging.INFO)
    root.propagate = False


def _closed_pipe() -> int:
    # The reader went away (`clipcap caption DIR | head -n 1`): stop quietly, as a SIGPIPE'd tool does, and keep the
    # interpreter from complaining while flushing stdout at exit.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 141


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    names = {c.name: c for c in COMMANDS}
    chosen = next((a for a in argv if not a.startswith("-")), None)
    command = names.get(chosen)
    debug = bool(os.environ.get(DEBUG_ENV)) or "--debug" in argv
    try:
        args = build_parser(only=chosen).parse_args(argv)
        _quiet_libraries()
        _configure_logging(command.name, getattr(args, "quiet", False))
        options = parse_options(command.options, args)
        return int(command.run(options, progress=not getattr(args, "quiet", False)) or 0)
    except ClipCapError as e:
        print(f"clipcap {chosen}: error: {_one_line(e, command)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"clipcap {chosen}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _closed_pipe()
    except OSError as e:  # the machine said no (disk full, permission denied, ...): not a bug in clipcap
        if debug:
            raise
        where = f": {e.filename}" if e.filename else ""
        print(f"clipcap {chosen}: error: {e.strerror or _one_line(e, None)}{where}", file=sys.stderr)
        return 2
    except Exception as e:
        if debug:
            raise
        if disk_full(e):  # a write no library call wrapped, reported in the writer's own words: still the machine
            print(f"clipcap {chosen}: error: {disk_full_error('the output')}", file=sys.stderr)
            return 2
        name = type(e).__name__
        print(
            f"clipcap {chosen}: internal error: {name}: {_one_line(e, None)} "
            f"(this is a bug; rerun with --debug or {DEBUG_ENV}=1 for the traceback, and please report it)",
            file=sys.stderr,
        )
        return 1
