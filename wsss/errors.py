"""What the CLI prints as one clear line instead of a traceback: ``WsssError``, a failed
step (an export that is locked, a server that went away), and ``InputError``, input the
project refuses (``wsss.served.errors``: the served models raise it too). Anything else is
a bug and shows its traceback."""

from wsss.served.errors import InputError

__all__ = ["InputError", "UsageError", "WsssError"]


class WsssError(Exception):
    """Bad input or a failed step, reported to the user as one line."""


class UsageError(WsssError, InputError):
    """A command line whose options do not go together, or an option's value out of its
    range: said with the command's own usage, status 2, as argparse says what it finds
    itself. Input refused, too (an ``InputError``) for callers of the functions behind the
    commands."""
