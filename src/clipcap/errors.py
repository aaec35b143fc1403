"""User-facing errors: the CLI prints their message as one line and exits non-zero, with no traceback."""


class ClipCapError(Exception):
    """A user mistake or an unusable input (missing file, bad option, unreachable hub id, corrupt checkpoint).
    The message is kept on one line (a wrapped library message, e.g. tarfile's, is joined)."""

    def __init__(self, message: str = "", *args):
        super().__init__(" ".join(str(message).split()), *args)
