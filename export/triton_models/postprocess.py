"""Triton python-backend model: model-size masks -> masks at each image's original size.

Copied into ``<repository>/postprocess/<version>/model.py``. Nearest-neighbour, so class
indices never blend. A batched tensor has one shape, so the images of one request must share
a size; send differently sized images as separate requests (Triton batches those anyway).
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from wsss.images import resize_mask


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.inputs = [t["name"] for t in config["input"]]  # masks..., then the original size
        self.outputs = [t["name"] for t in config["output"]]  # one per mask, same order

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                *masks, sizes = (
                    pb_utils.get_input_tensor_by_name(request, n).as_numpy() for n in self.inputs
                )
                if len({tuple(s) for s in sizes}) > 1:
                    raise ValueError(
                        "images of one request must share a size: "
                        "send differently sized images as separate requests"
                    )
                out = [
                    pb_utils.Tensor(
                        name,
                        np.stack([resize_mask(m, s) for m, s in zip(batch, sizes, strict=True)]),
                    )
                    for name, batch in zip(self.outputs, masks, strict=True)
                ]
                responses.append(pb_utils.InferenceResponse(output_tensors=out))
            except Exception as exc:  # this request fails; the model keeps serving
                responses.append(
                    pb_utils.InferenceResponse(
                        output_tensors=[], error=pb_utils.TritonError(f"postprocess: {exc}")
                    )
                )
        return responses
