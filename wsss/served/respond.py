"""One response per request, as Triton's python backend requires; an exception fails only
the request that raised it, with its message, and the model keeps serving.

An ``InputError`` is the client's fault (bytes that are not an image, images of different
sizes, NaN CAMs): INVALID_ARG, which Triton answers as HTTP 400 / gRPC INVALID_ARGUMENT.
Anything else is the server's, a plain ``ValueError`` from numpy or OpenCV included:
INTERNAL (HTTP 500).
"""

from collections.abc import Callable

from .errors import InputError


def respond(requests, handle: Callable, label: str) -> list:
    """``handle(request) -> list[pb_utils.Tensor]`` for each request, errors kept apart."""
    import triton_python_backend_utils as pb_utils  # exists only inside the backend stub

    responses = []
    for request in requests:
        try:
            responses.append(pb_utils.InferenceResponse(output_tensors=handle(request)))
        except Exception as exc:  # this request fails; the others and the model go on
            kind = "INVALID_ARG" if isinstance(exc, InputError) else "INTERNAL"
            error = pb_utils.TritonError(f"{label}: {exc}", getattr(pb_utils.TritonError, kind))
            responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
    return responses
