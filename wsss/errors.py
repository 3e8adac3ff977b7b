"""What the CLI prints as one clear line instead of a traceback: ``WsssError``, a failed
step (an export that is locked, a server that went away), and ``InputError``, input the
project refuses (``wsss.served.errors``: the served models raise it too). Anything else is
a bug and shows its traceback."""

from wsss.served.errors import InputError

__all__ = ["InputError", "WsssError"]


class WsssError(Exception):
    """Bad input or a failed step, reported to the user as one line."""
