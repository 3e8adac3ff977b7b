"""Triton python-backend model: CAMs -> pseudo-mask, with the project's own refiners.

Copied into ``<repository>/refiner/<version>/model.py`` by the exporter; its settings (method,
thresholds, task) come from the ``parameters`` of the generated config.pbtxt, so the file is
the same for every export. One response per request, as the backend requires.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from export.triton_models.respond import respond
from training.refine import build_refiner, present_classes, refine_batch
from wsss.config import RefineConfig


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.multi_label = params["multi_label"] == "true"
        refine = RefineConfig(**json.loads(params["refine"]))
        self.score_threshold = refine.score_threshold
        self.refiner = build_refiner(refine)
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
        classes = [present_classes(s, self.multi_label, self.score_threshold) for s in scores]
        mask = refine_batch(self.refiner, image, cams, classes, not self.multi_label)
        return [pb_utils.Tensor(self.output, np.ascontiguousarray(mask, dtype=np.uint8))]
