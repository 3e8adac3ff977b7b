"""Triton python-backend model: model-size masks -> masks at each image's original size.

Copied into ``<repository>/postprocess/<version>/model.py``. Nearest-neighbour, so class
indices never blend. A batched tensor has one shape, so the images of one request must share
a size; send differently sized images as separate requests (Triton batches those anyway).
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from .errors import InputError
from .images import resize_mask
from .respond import respond


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.inputs = [t["name"] for t in config["input"]]  # masks..., then the original size
        self.outputs = [t["name"] for t in config["output"]]  # one per mask, same order

    def execute(self, requests):
        return respond(requests, self._one, "postprocess")

    def _one(self, request):
        *masks, sizes = (
            pb_utils.get_input_tensor_by_name(request, n).as_numpy() for n in self.inputs
        )
        if len({tuple(s) for s in sizes}) > 1:
            raise InputError(
                "images of one request must share a size: "
                "send differently sized images as separate requests"
            )
        return [
            pb_utils.Tensor(
                name, np.stack([resize_mask(m, s) for m, s in zip(batch, sizes, strict=True)])
            )
            for name, batch in zip(self.outputs, masks, strict=True)
        ]
