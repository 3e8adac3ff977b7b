"""Clients of the served ensemble over gRPC or HTTP, generated from ``wsss.tensors``.

Names come from the spec module; sizes come from the server's own metadata and the class
names and mask colours from its model config, so a client never disagrees with the server it
talks to (whatever a local model repository holds). Inputs are checked before they are sent,
and server-side errors are re-raised with the server's message.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from wsss.errors import InputError, WsssError
from wsss.pruning import outputs_to_request
from wsss.served.classical import present_classes
from wsss.served.configs import parameters
from wsss.served.images import (
    ImageError,
    decode_image,
    decode_resized,
    encode_png,
    resize_image,
    resize_mask,
)
from wsss.tensors import (
    CHAINS,
    CLASSIFIER,
    ENCODED_IMAGE,
    ENSEMBLES,
    EXPORT_ID,
    FEATURES,
    PIPELINE,
    PIPELINE_BYTES,
    SCORES,
    SEG_PROBS,
    SEGMENTER,
    ModelSpec,
    TensorSpec,
    read_label_parameters,
    read_presence,
    served_models,
)


def requested_outputs(specs: dict[str, ModelSpec], model: str, asked: Sequence[str]) -> list[str]:
    """What to request from Triton for the outputs ``asked`` of ``model`` (a superset).

    Exported since ``wsss.tensors.CHAINS``, an ensemble answers any subset as asked. An
    older export steps through its models directly, and Triton 2.51's pruning drops steps a
    request needs (SCORES and CAMS feed the refiner; a pass-through segmenter reads
    PSEUDO_MASK): the request then fails with "unexpected deadlock". ``wsss.pruning``
    models the walk and names the fewest extra outputs that keep such a chain whole; tests
    try every subset on the real server.
    """
    if model not in ENSEMBLES:  # a single model answers whatever it is asked
        return sorted(set(asked))
    return outputs_to_request(specs, model, asked)


# How each protocol says the server refused a request's input (HTTP 400 / INVALID_ARGUMENT):
# bytes that are not an image, say, as opposed to a server that is down or failing.
_INVALID_INPUT = ("400", "StatusCode.INVALID_ARGUMENT")


class ClientError(WsssError, ValueError):
    """Bad input, or a request the server refused; the message says which and why.
    ``reason`` is the server's own message where it refused one."""

    def __init__(
        self,
        message: str,
        status: str | None = None,
        reason: str | None = None,
        sent: bool = False,
    ):
        super().__init__(message)
        self.status, self.reason = status, reason or message
        # Raised by a request sent: the server's answer, or the connection's failure (not
        # the client's own checks, which sending again would not change).
        self.sent = sent

    @property
    def invalid_input(self) -> bool:
        """The server refused what was sent (not: it could not be reached, or failed)."""
        return self.status in _INVALID_INPUT


def encoded_input(module, blobs: Sequence[bytes]):
    """The bytes ensemble's input (``wsss.tensors.ENCODED_IMAGE``) holding ``blobs``, one
    encoded image an item, as ``module`` (tritonclient.grpc or .http) builds it: for a
    client of its own (async requests, perf) that sends what ``infer_encoded`` sends."""
    array = np.array(list(blobs), dtype=ENCODED_IMAGE.np_dtype).reshape(-1, *ENCODED_IMAGE.shape)
    tensor = module.InferInput(ENCODED_IMAGE.name, list(array.shape), ENCODED_IMAGE.triton_dtype)
    tensor.set_data_from_numpy(array)
    return tensor


def server_address(url: str) -> str:
    """``url`` as tritonclient takes it, HOST:PORT: an ``http://`` or ``grpc://`` in front is
    dropped; anything else that is not HOST:PORT with a port in 1-65535 is refused here, in
    one line, before tritonclient raises from its constructor (and again from its
    ``__del__``)."""
    address = url.strip()
    scheme, sep, rest = address.partition("://")
    if sep:
        if scheme.lower() not in ("http", "grpc"):
            raise ClientError(f"--url takes HOST:PORT (http:// or grpc:// may lead), not {url!r}")
        address = rest
    address = address.rstrip("/")
    host, colon, port = address.rpartition(":")
    if not colon or not host or "/" in address or not port.isdigit() or not 0 < int(port) < 65536:
        raise ClientError(f"--url takes HOST:PORT, e.g. 127.0.0.1:8001, not {url!r}")
    return address


def _protocol(protocol: str):
    if protocol == "grpc":
        import tritonclient.grpc as module
    elif protocol == "http":
        import tritonclient.http as module
    else:
        raise ClientError(f"protocol must be grpc or http, not {protocol!r}")
    return module


READS = 3  # times a client reads the server's models while an export lands


def _newest(meta: dict) -> int | None:
    """The newest version a model's metadata lists (None: it lists none)."""
    return max((int(v) for v in meta.get("versions", [])), default=None)


class PipelineClient:
    """Either ensemble (``wsss_pipeline``: pixels in; ``wsss_pipeline_bytes``: encoded images
    in), over gRPC or HTTP. Sizes, class counts and the level-set refiner's FEATURES come
    from the served classifier's and segmenter's metadata; ``class_names``, ``palette`` and
    ``presence`` (which classes a photo holds) from the ensemble's config (None where an
    older export serves none)."""

    def __init__(self, url: str, protocol: str = "grpc", model: str = PIPELINE):
        if model not in (PIPELINE, PIPELINE_BYTES):
            raise ClientError(f"model must be {PIPELINE} or {PIPELINE_BYTES}, not {model!r}")
        self.module = _protocol(protocol)
        url = server_address(url)
        self.url, self.protocol, self.model = url, protocol, model
        self.client = self.module.InferenceServerClient(url)
        # What the server holds, read in several requests: an export landing between them
        # (the ensemble's newest version moved) would pair one export's version with the
        # next one's classes and name; read again until the version holds still.
        for _ in range(READS):
            self._read(model, url)
            if _newest(self._metadata(model, url)) == self.version:
                break
        # The version of the model that answered this client's last request (the server
        # says; a mid-run export the server loaded answers with the next one).
        self.answered: int | None = None

    def _read(self, model: str, url: str) -> None:
        """Shapes, class counts, labels and the newest version from the server."""
        meta = {m: self._metadata(m, url) for m in (model, CLASSIFIER, SEGMENTER)}
        (image,) = meta[CLASSIFIER]["inputs"]
        h, w, _ = (int(d) for d in image["shape"][1:])
        outputs = {_served_name(o["name"]): o["shape"] for o in meta[CLASSIFIER]["outputs"]}
        probs = {_served_name(o["name"]): o["shape"] for o in meta[SEGMENTER]["outputs"]}
        probs = probs[SEG_PROBS]
        features = tuple(int(d) for d in outputs[FEATURES][1:]) if FEATURES in outputs else None
        # A pass-through segmenter reads the refiner's PSEUDO_MASK instead of IMAGE.
        (seg_input,) = (_served_name(i["name"]) for i in meta[SEGMENTER]["inputs"])
        config = self._config(model, url)
        # An export before the chains (wsss.tensors.CHAINS) stepped through the models
        # directly: ask it what its pruning answers whole. Both ensembles are read (a fork
        # asks the other), and one not yet chained (mid-upgrade) makes the client ask both
        # that way: the extra outputs it then names a chained ensemble answers too.
        other = PIPELINE_BYTES if model == PIPELINE else PIPELINE
        chained = all(
            [s.get("model_name") for s in c.get("ensemble_scheduling", {}).get("step", [])]
            == [CHAINS[m]]
            for m, c in ((model, config), (other, self._config(other, url)))
        )
        self.all_specs = served_models(
            h, int(outputs[SCORES][1]), int(probs[1]), features, seg_input, chains=chained
        )
        self.mask_classes = int(probs[1])  # background + the classes; 2: binary masks
        self.specs = self.all_specs[model]
        self.image_spec: TensorSpec = self.all_specs[PIPELINE].inputs[0]
        params = parameters(config)
        self.class_names, self.palette = read_label_parameters(params)
        self.presence = read_presence(params)  # None: an export from before it
        self.export_id = params.get(EXPORT_ID)  # which export this is; None: one before it
        # The newest version of the ensemble (an export writes every model at one version):
        # which export answers, for a record of its predictions.
        self.version = _newest(meta[model])

    def fork(self, model: str | None = None) -> PipelineClient:
        """A client of its own (of ``model``, either ensemble; default this one) sharing what
        this one read from the server: one per thread, as tritonclient's HTTP client wants."""
        twin = copy.copy(self)
        twin.client = self.module.InferenceServerClient(self.url)
        if model is not None and model != self.model:
            if model not in (PIPELINE, PIPELINE_BYTES):
                raise ClientError(f"model must be {PIPELINE} or {PIPELINE_BYTES}, not {model!r}")
            twin.model, twin.specs = model, self.all_specs[model]
        return twin

    def _metadata(self, model: str, url: str) -> dict:
        try:
            meta = self.client.get_model_metadata(model)
        except Exception as exc:
            raise ClientError(
                f"cannot reach model {model!r} at {url} ({self.protocol}): {exc}"
                + _port_hint(self.protocol, str(exc))
            ) from exc
        return meta if isinstance(meta, dict) else _grpc_to_dict(meta)

    def _config(self, model: str, url: str) -> dict:
        """``model``'s config as the server holds it, as JSON."""
        try:
            if self.protocol == "grpc":
                config = self.client.get_model_config(model, as_json=True)["config"]
            else:
                config = self.client.get_model_config(model)
        except Exception as exc:
            raise ClientError(
                f"cannot read model {model!r}'s config at {url} ({self.protocol}): {exc}"
            ) from exc
        return config

    @property
    def image_size(self) -> tuple[int, int]:
        return self.image_spec.shape[0], self.image_spec.shape[1]

    def infer(
        self, images: np.ndarray, outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """uint8 [B, H, W, 3] -> the ensemble's outputs, by name: all of them, or only
        ``outputs`` (the whole chain runs; only those come back). At the model size for
        ``wsss_pipeline``; any one size for the bytes ensemble, to which each image travels
        as a lossless PNG and whose masks come back at that size."""
        images = np.asarray(images)
        try:
            if self.model == PIPELINE_BYTES:
                if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
                    raise InputError(f"{images.dtype}{images.shape}, expected uint8 [B, H, W, 3]")
            else:
                self.image_spec.check(images)
        except ValueError as exc:
            raise ClientError(f"bad input for {self.model}: {exc}") from exc
        if self.model == PIPELINE_BYTES:
            return self.infer_encoded([encode_png(image) for image in images], outputs)
        return self.infer_raw({self.image_spec.name: images}, outputs=outputs)

    def infer_encoded(
        self, blobs: list[bytes], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Encoded images of one size (JPEG, PNG, ...) -> the bytes-in ensemble's outputs."""
        spec = self.all_specs[PIPELINE_BYTES]
        (tensor,) = spec.inputs
        array = np.array(list(blobs), dtype=tensor.np_dtype).reshape(-1, *tensor.shape)
        return self.infer_raw({tensor.name: array}, spec, outputs)

    def infer_raw(
        self,
        arrays: dict[str, np.ndarray],
        spec: ModelSpec | None = None,
        outputs: Sequence[str] | None = None,
    ) -> dict[str, np.ndarray]:
        """Send arrays as they are (no client-side checks); server errors become ClientError."""
        spec = spec or self.specs
        served = [t.name for t in spec.outputs]
        wanted = list(outputs) if outputs is not None else served
        unknown = sorted(set(wanted) - set(served))
        if unknown or not wanted:
            raise ClientError(
                f"{spec.name} has outputs {', '.join(served)}; asked for "
                f"{', '.join(unknown) if unknown else 'none'}"
            )
        inputs = []
        for name, array in arrays.items():
            dtype = self.module.np_to_triton_dtype(array.dtype)
            tensor = self.module.InferInput(name, list(array.shape), dtype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        requested = [
            self.module.InferRequestedOutput(name)
            for name in requested_outputs(self.all_specs, spec.name, wanted)
        ]
        try:
            result = self.client.infer(spec.name, inputs, outputs=requested)
        except Exception as exc:  # InferenceServerException from either protocol
            status = exc.status() if hasattr(exc, "status") else None
            reason = exc.message() if hasattr(exc, "message") else None
            raise ClientError(
                f"server refused the request: {_innermost(str(exc))}",
                status,
                reason and _innermost(reason),
                sent=True,
            ) from exc
        response = result.get_response()
        version = (
            response["model_version"] if isinstance(response, dict) else response.model_version
        )
        self.answered = int(version) if str(version).isdigit() else None
        return {name: result.as_numpy(name) for name in wanted}

    def close(self) -> None:
        self.client.close()


def _innermost(message: str) -> str:
    """A step's error without the ensembles it was raised through (Triton prefixes one
    "in ensemble 'NAME', " for each: two since the chains)."""
    return re.sub(r"in ensemble '[^']*', ", "", message)


def _served_name(name: str) -> str:
    """A TorchScript model's tensors are ``<name>__<index>`` (Triton's PyTorch backend binds
    by position); the ensembles map them back to the served names."""
    base, _, index = name.rpartition("__")
    return base if base and index.isdigit() else name


# What a client of one protocol reads from a port that answers in another: Triton's gRPC
# port to an HTTP client, its HTTP or metrics port to a gRPC one, the metrics port to HTTP.
_OTHER_PROTOCOL = {
    "http": ("Expected HTTP/", "The document is empty"),
    "grpc": ("Socket closed",),
}


def present_at(scores: np.ndarray, presence: dict) -> list[int]:
    """The classes one image's ``scores`` hold at the server's own thresholds (the
    ensemble's ``presence`` parameter, as ``PipelineClient.presence`` reads it)."""
    threshold = np.asarray(presence["threshold"], np.float32)
    return present_classes(
        scores, presence["multi_label"], threshold, presence.get("min_score", 0.0)
    )


def _port_hint(protocol: str, error: str) -> str:
    """A hint where the error says something answers at the address, but not in
    ``protocol``: the other protocol's port (or the metrics port) was given; or where
    nothing listens there at all."""
    if "Connection refused" in error or "ECONNREFUSED" in error:
        return (
            " (nothing listens there: start the server, `make serve` or `wsss serve`, or "
            "give --url where it runs)"
        )
    if not any(sign in error for sign in _OTHER_PROTOCOL.get(protocol, ())):
        return ""
    name, port = ("HTTP", "HTTP_PORT, default 8000")
    if protocol == "grpc":
        name, port = ("gRPC", "GRPC_PORT, default 8001")
    return (
        f" (something answers there, but not as Triton's {name} endpoint: the other "
        f"protocol's port, or the metrics port? {name} is on {port}; `--protocol` picks "
        "the protocol)"
    )


def _grpc_to_dict(meta) -> dict:
    return {
        "versions": list(meta.versions),
        "inputs": [{"name": t.name, "shape": list(t.shape)} for t in meta.inputs],
        "outputs": [{"name": t.name, "shape": list(t.shape)} for t in meta.outputs],
    }


def load_image(source: str | Path | bytes, size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode an image file or bytes into RGB uint8; a clear error if it is not an image.
    ``size`` (height, width): at that size, as the server's preprocess model reads it
    (``decode_resized``), for a request of pixels."""
    if isinstance(source, bytes):
        data, where = source, "the given bytes"
    else:
        if not Path(source).is_file():
            raise ClientError(f"{source}: no such image file")
        data, where = Path(source).read_bytes(), str(source)
    try:
        return decode_image(data) if size is None else decode_resized(data, size)[0]
    except ImageError as exc:
        raise ClientError(f"cannot decode {where}: {exc}") from exc


def resize(image: np.ndarray, size: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """Pixels (area/bilinear) or label maps (nearest) to (height, width), as the server
    resizes them (a photo's file: ``load_image(path, size)``, which decodes it as the server
    does too)."""
    return resize_mask(image, size) if nearest else resize_image(image, size)
