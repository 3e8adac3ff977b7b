"""Clients of the served ensemble over gRPC or HTTP, generated from ``wsss.tensors``.

Names come from the spec module; sizes come from the server's own metadata, so a client
never disagrees with the repository it talks to. Inputs are checked before they are sent,
and server-side errors are re-raised with the server's message.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from wsss.tensors import PIPELINE, TensorSpec, served_models


class ClientError(ValueError):
    """Bad input, or a request the server refused; the message says which and why."""


def _protocol(protocol: str):
    if protocol == "grpc":
        import tritonclient.grpc as module
    elif protocol == "http":
        import tritonclient.http as module
    else:
        raise ClientError(f"protocol must be grpc or http, not {protocol!r}")
    return module


class PipelineClient:
    def __init__(self, url: str, protocol: str = "grpc", model: str = PIPELINE):
        self.module = _protocol(protocol)
        self.protocol, self.model = protocol, model
        self.client = self.module.InferenceServerClient(url)
        try:
            meta = self.client.get_model_metadata(model)
        except Exception as exc:
            raise ClientError(f"cannot reach model {model!r} at {url} ({protocol}): {exc}") from exc
        meta = meta if isinstance(meta, dict) else _grpc_to_dict(meta)
        (image,) = meta["inputs"]
        h, w, _ = (int(d) for d in image["shape"][1:])
        scores = next(o for o in meta["outputs"] if o["name"] == "SCORES")
        probs = next(o for o in meta["outputs"] if o["name"] == "SEG_PROBS")
        self.specs = served_models(h, int(scores["shape"][1]), int(probs["shape"][1]))[model]
        self.image_spec: TensorSpec = self.specs.inputs[0]

    @property
    def image_size(self) -> tuple[int, int]:
        return self.image_spec.shape[0], self.image_spec.shape[1]

    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 [B, H, W, 3] -> every output of the ensemble, by name."""
        images = np.asarray(images)
        try:
            self.image_spec.check(images)
        except ValueError as exc:
            raise ClientError(f"bad input for {self.model}: {exc}") from exc
        return self.infer_raw({self.image_spec.name: images})

    def infer_raw(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Send arrays as they are (no client-side checks); server errors become ClientError."""
        inputs = []
        for name, array in arrays.items():
            dtype = self.module.np_to_triton_dtype(array.dtype)
            tensor = self.module.InferInput(name, list(array.shape), dtype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        outputs = [self.module.InferRequestedOutput(t.name) for t in self.specs.outputs]
        try:
            result = self.client.infer(self.model, inputs, outputs=outputs)
        except Exception as exc:  # InferenceServerException from either protocol
            raise ClientError(f"server refused the request: {exc}") from exc
        return {t.name: result.as_numpy(t.name) for t in self.specs.outputs}

    def close(self) -> None:
        self.client.close()


def _grpc_to_dict(meta) -> dict:
    return {
        "inputs": [{"name": t.name, "shape": list(t.shape)} for t in meta.inputs],
        "outputs": [{"name": t.name, "shape": list(t.shape)} for t in meta.outputs],
    }


def load_image(source: str | Path | bytes) -> np.ndarray:
    """Decode a JPEG/PNG/... file or bytes into RGB uint8; a clear error if it is not an image."""
    if not isinstance(source, bytes) and not Path(source).is_file():
        raise ClientError(f"{source}: no such image file")
    try:
        data = io.BytesIO(source) if isinstance(source, bytes) else source
        with Image.open(data) as img:
            return np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        where = "the given bytes" if isinstance(source, bytes) else str(source)
        raise ClientError(f"cannot decode {where} as an image: {exc}") from exc


def resize(image: np.ndarray, size: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """Resize HxW[xC] to (height, width); nearest for label maps, area for pixels."""
    import cv2

    interp = cv2.INTER_NEAREST if nearest else cv2.INTER_AREA
    return cv2.resize(image, (size[1], size[0]), interpolation=interp)
