"""Triton python-backend model: CAMs -> pseudo-mask with GrabCut, Chan-Vese, ViT attention or
saliency.

Copied into ``<repository>/refiner/<version>/model.py`` with this package's other modules
beside it; the fixed and Otsu thresholds alone are served as an ONNX graph instead. Its
settings (``refine``: the fields of RefineConfig and the ONNX models it runs, ``multi_label``)
come from the ``parameters`` of the generated config.pbtxt, so the file is the same for every
export. ViT attention reads ``vit_attention.onnx`` from the version folder (the exporter
writes it with the chosen layers' attention as graph outputs); saliency runs ``saliency.onnx``
there on the model-size IMAGE. One response per request.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from .classical import OnnxAttention, OnnxSaliency
from .refiners import build_classical
from .respond import respond

RUNNERS = {"attention": OnnxAttention, "saliency": OnnxSaliency}  # ONNX models by role


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        # Written at export by training.refine.served_settings: the RefineConfig's fields,
        # and which ONNX model in this folder plays which role.
        settings = json.loads(params["refine"])
        runners = {
            role: RUNNERS[role](Path(__file__).with_name(name))
            for role, name in settings.pop("runners").items()
        }
        multi_label = params["multi_label"] == "true"
        self.refiner = build_classical(settings, multi_label, **runners)
        self.inputs = [i["name"] for i in config["input"]]
        (self.output,) = [o["name"] for o in config["output"]]

    def execute(self, requests):
        return respond(requests, self._one, "refiner")

    def _one(self, request):
        image, scores, cams = (
            pb_utils.get_input_tensor_by_name(request, n).as_numpy() for n in self.inputs
        )
        if not np.isfinite(cams).all():
            raise ValueError("CAMS holds NaN or infinite values")
        mask = self.refiner(image, scores, cams)
        return [pb_utils.Tensor(self.output, np.ascontiguousarray(mask, dtype=np.uint8))]
