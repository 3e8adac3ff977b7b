"""Triton python-backend model: model-size masks -> masks at each image's original size.

Copied into ``<repository>/postprocess/<version>/model.py``. Nearest-neighbour, so class
indices never blend. A batched tensor has one shape, so the images of one request must share
a size; send differently sized images as separate requests (Triton batches those anyway).
A size over the ``max_pixels`` parameter (``export.max_image_pixels``, as the preprocess
model's) is refused before any mask is made: a client may call this model directly, with
any ORIGINAL_SIZE.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from .configs import parameters
from .errors import InputError
from .images import MAX_PIXELS, output_size, resize_mask
from .respond import respond
from .threads import single_threaded


class TritonPythonModel:
    def initialize(self, args):
        single_threaded()  # no OpenCV pool spinning beside the other stubs (threads.py)
        config = json.loads(args["model_config"])
        self.inputs = [t["name"] for t in config["input"]]  # masks..., then the original size
        self.outputs = [t["name"] for t in config["output"]]  # one per mask, same order
        params = parameters(config)
        self.max_pixels = int(params.get("max_pixels", MAX_PIXELS))  # older configs: none

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
        for k, size in enumerate(sizes):  # all of them before any mask is made
            try:
                output_size(size, self.max_pixels)
            except ValueError as exc:
                raise InputError(f"item {k}: {exc}") from exc
        # A pass-through segmenter's SEGMENTATION is the PSEUDO_MASK: resized once. Under
        # tritonserver's 128 KiB mmap threshold, which this stub keeps (wsss.served.heap),
        # each full-size mask is a fresh mapping, so a batch of one is not copied either.
        made: list[tuple[np.ndarray, np.ndarray]] = []  # (a batch of masks, resized)
        outputs = []
        for name, batch in zip(self.outputs, masks, strict=True):
            full = next((f for b, f in made if np.array_equal(b, batch)), None)
            if full is None:
                full = _stack(
                    [resize_mask(m, s, self.max_pixels) for m, s in zip(batch, sizes, strict=True)]
                )
                made.append((batch, full))
            outputs.append(pb_utils.Tensor(name, full))
        return outputs


def _stack(masks: list[np.ndarray]) -> np.ndarray:
    return masks[0][np.newaxis] if len(masks) == 1 else np.stack(masks)
