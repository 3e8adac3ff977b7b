"""The base of every error wsss raises for bad input or a failed step: the CLI prints these
as one clear line instead of a traceback."""


class WsssError(Exception):
    pass
