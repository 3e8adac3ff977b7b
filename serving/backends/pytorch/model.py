"""A Python-based Triton backend named ``pytorch``: runs a TorchScript ``model.pt``.

Stands in for Triton's native PyTorch (LibTorch) backend, which the server in the
nvidia-pytriton wheel lacks, so the same config.pbtxt runs here and in the NGC image. Like
the native backend it binds tensors by position: config names end in ``__<index>``.
"""

import json
import os

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from wsss.served.configs import parameters
from wsss.served.respond import respond


def _by_index(tensors):
    return [t["name"] for t in sorted(tensors, key=lambda t: int(t["name"].rsplit("__", 1)[1]))]


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        filename = config.get("default_model_filename") or "model.pt"
        path = os.path.join(args["model_repository"], args["model_version"], filename)
        gpu = args.get("model_instance_kind") == "GPU" and torch.cuda.is_available()
        self.device = torch.device(
            f"cuda:{args.get('model_instance_device_id', '0')}" if gpu else "cpu"
        )
        # The native backend's thread settings; each stub is its own process, so unlike
        # there they hold per instance. Unset, torch takes a thread per core in every
        # instance: two instances on a small CPU server fight over its cores.
        params = parameters(config)
        if int(params.get("INTRA_OP_THREAD_COUNT", 0)) > 0:
            torch.set_num_threads(int(params["INTRA_OP_THREAD_COUNT"]))
        if int(params.get("INTER_OP_THREAD_COUNT", 0)) > 0:
            torch.set_num_interop_threads(int(params["INTER_OP_THREAD_COUNT"]))
        self.model = torch.jit.load(path, map_location=self.device).eval()
        self.inputs = _by_index(config["input"])
        self.outputs = _by_index(config["output"])

    def execute(self, requests):
        return respond(requests, self._one, "pytorch")

    def _one(self, request):
        args = [
            torch.from_numpy(pb_utils.get_input_tensor_by_name(request, n).as_numpy()).to(
                self.device
            )
            for n in self.inputs
        ]
        with torch.no_grad():
            out = self.model(*args)
        out = out if isinstance(out, tuple) else (out,)
        # Only what the request asks for is sent (every output where it names none), as
        # the native backend does: an ensemble step asks for what its output_map names.
        asked = set(request.requested_output_names()) or set(self.outputs)
        return [
            pb_utils.Tensor(n, np.ascontiguousarray(o.cpu().numpy()))
            for n, o in zip(self.outputs, out, strict=True)
            if n in asked
        ]
