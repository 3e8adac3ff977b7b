"""Triton python-backend model: encoded image bytes -> model-size RGB pixels + original size.

Copied into ``<repository>/preprocess/<version>/model.py``. Decoding and resizing are
``wsss.served.images.decode_resized``, the code training and clients use, so all of them
give identical pixels.
Normalisation lives inside the exported networks, where no client can get it wrong.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from .configs import parameters
from .errors import InputError
from .heap import keep_blocks_on_heap
from .images import MAX_PIXELS, check_pixels, decode_resized, header_size
from .respond import respond
from .threads import single_threaded


class TritonPythonModel:
    def initialize(self, args):
        keep_blocks_on_heap()  # not tritonserver's 128 KiB mmap threshold (heap.py)
        single_threaded()  # no OpenCV pool spinning beside the other stubs (threads.py)
        config = json.loads(args["model_config"])
        (self.input,) = [t["name"] for t in config["input"]]
        image, size = config["output"]
        self.image_name, self.size_name = image["name"], size["name"]
        self.size = tuple(int(d) for d in image["dims"][:2])
        params = parameters(config)
        self.max_pixels = int(params.get("max_pixels", MAX_PIXELS))

    def execute(self, requests):
        return respond(requests, self._one, "preprocess")

    def _one(self, request):
        blobs = pb_utils.get_input_tensor_by_name(request, self.input).as_numpy()
        blobs = [bytes(b) for b in blobs.reshape(len(blobs), -1)[:, 0]]
        # From the headers, before decoding anything: too many pixels, or sizes that differ
        # (the masks of one request come back as one tensor, so they share a size).
        headers = [header_size(b, self.max_pixels) for b in blobs]
        for k, size in enumerate(headers):
            try:
                check_pixels(size, self.max_pixels)
            except ValueError as exc:
                raise InputError(f"item {k}: {exc}") from exc
        _same_size(headers)
        images, sizes = [], []
        for k, blob in enumerate(blobs):
            try:
                image, size = decode_resized(blob, self.size, self.max_pixels)
            except ValueError as exc:
                raise InputError(f"item {k}: {exc}") from exc
            sizes.append(size)
            images.append(image)
        _same_size(sizes)
        return [
            pb_utils.Tensor(self.image_name, np.stack(images)),
            pb_utils.Tensor(self.size_name, np.asarray(sizes, np.int32)),
        ]


def _same_size(sizes) -> None:
    known = {tuple(s) for s in sizes if s is not None}
    if len(known) > 1:
        shown = ", ".join(f"{w}x{h}" for h, w in sorted(known))
        raise InputError(
            f"images of one request must share a size (got {shown}): "
            "send differently sized images as separate requests"
        )
