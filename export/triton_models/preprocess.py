"""Triton python-backend model: encoded image bytes -> model-size RGB pixels + original size.

Copied into ``<repository>/preprocess/<version>/model.py``. Decoding and resizing are
``wsss.images``, the same code clients use, so both paths give identical pixels.
Normalisation lives inside the exported networks, where no client can get it wrong.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from export.triton_models.respond import respond
from wsss.images import decode_image, resize_image


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        (self.input,) = [t["name"] for t in config["input"]]
        image, size = config["output"]
        self.image_name, self.size_name = image["name"], size["name"]
        self.size = tuple(int(d) for d in image["dims"][:2])

    def execute(self, requests):
        return respond(requests, self._one, "preprocess")

    def _one(self, request):
        blobs = pb_utils.get_input_tensor_by_name(request, self.input).as_numpy()
        images, sizes = [], []
        for k, blob in enumerate(blobs.reshape(len(blobs), -1)[:, 0]):
            try:
                image = decode_image(bytes(blob))
            except ValueError as exc:
                raise ValueError(f"item {k}: {exc}") from exc
            sizes.append(image.shape[:2])
            images.append(resize_image(image, self.size))
        return [
            pb_utils.Tensor(self.image_name, np.stack(images)),
            pb_utils.Tensor(self.size_name, np.asarray(sizes, np.int32)),
        ]
