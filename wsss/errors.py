"""The base of every error wsss raises for bad input or a failed step: the CLI prints these
as one clear line instead of a traceback."""


class WsssError(Exception):
    """Bad input or a failed step, reported to the user as one line."""
