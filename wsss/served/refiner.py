"""Triton python-backend model: CAMs -> pseudo-mask with GrabCut, Chan-Vese, ViT attention,
saliency or the ViT random walk.

Copied into ``<repository>/refiner/<version>/model.py`` with this package's other modules
beside it; the fixed and Otsu thresholds alone are served as an ONNX graph instead. Its
settings (``refine``: the fields of RefineConfig; ``multi_label``) come from the
``parameters`` of the generated config.pbtxt, so the file is the same for every export. The
saliency, attention and walk refiners read their ViT's output as a fourth input (SALIENCY,
ATTENTION or TOKENS), made by the repository's ViT model beside the classifier: this model
runs no network, it combines maps. One response per request.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from .configs import parameters
from .errors import InputError
from .heap import keep_blocks_on_heap
from .refiners import build_classical
from .respond import respond
from .threads import single_threaded


class TritonPythonModel:
    def initialize(self, args):
        keep_blocks_on_heap()  # not tritonserver's 128 KiB mmap threshold (heap.py)
        single_threaded()  # no OpenCV pool spinning beside the other stubs (threads.py)
        config = json.loads(args["model_config"])
        params = parameters(config)
        # Written at export by training.torch_refiners.served_settings: the RefineConfig's fields.
        settings = json.loads(params["refine"])
        settings.pop("runners", None)  # exports before the ViT was a model of its own
        multi_label = params["multi_label"] == "true"
        self.refiner = build_classical(settings, multi_label)
        # IMAGE, SCORES, CAMS, then the ViT's map where it reads one (wsss.tensors' order).
        names = [i["name"] for i in config["input"]]
        self.inputs, self.maps = names[:3], (names[3] if len(names) > 3 else None)
        (self.output,) = [o["name"] for o in config["output"]]

    def execute(self, requests):
        return respond(requests, self._one, "refiner")

    def _one(self, request):
        image, scores, cams = (
            pb_utils.get_input_tensor_by_name(request, n).as_numpy() for n in self.inputs
        )
        for name, values in zip(self.inputs[1:], (scores, cams), strict=True):
            if not np.isfinite(values).all():
                raise InputError(f"{name} holds NaN or infinite values")
        maps = None
        if self.maps is not None:
            maps = pb_utils.get_input_tensor_by_name(request, self.maps).as_numpy()
            if not np.isfinite(maps).all():
                raise InputError(f"{self.maps} holds NaN or infinite values")
        mask = self.refiner(image, scores, cams, maps=maps)
        return [pb_utils.Tensor(self.output, np.ascontiguousarray(mask, dtype=np.uint8))]
