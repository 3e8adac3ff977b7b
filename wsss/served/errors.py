"""Bad input, told apart from bugs.

``InputError`` is what the project raises for input it refuses: a config value, a file, a
request. The CLI prints it as one line and the served models answer it as the client's
fault (INVALID_ARG: HTTP 400, gRPC INVALID_ARGUMENT, as ``respond`` maps it; a
``ValueError`` too, for callers that catch those). Any other exception is a bug and keeps
its traceback (a served model answers it INTERNAL, HTTP 500). Here, beside the
served models that raise it, because the served repository carries this package alone.
"""


class InputError(ValueError):
    """Input the project refuses, with a message that says what to change."""
