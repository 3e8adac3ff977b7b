"""Triton python-backend model: CAMs -> pseudo-mask, with the project's own refiners.

Copied into ``<repository>/refiner/<version>/model.py`` by the exporter; its settings (method,
thresholds, task) come from the ``parameters`` of the generated config.pbtxt, so the file is
the same for every export. One response per request, as the backend requires.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from export.triton_models.respond import respond
from training.refine import build_refiner
from wsss.config import RefineConfig


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        multi_label = params["multi_label"] == "true"
        self.refiner = build_refiner(RefineConfig(**json.loads(params["refine"])), multi_label)
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
