"""User-facing errors: the CLI prints their message as one line and exits non-zero, with no traceback."""


class ClipCapError(Exception):
    """A user mistake or an unusable input (missing file, bad flag, unreachable hub id, corrupt checkpoint)."""
