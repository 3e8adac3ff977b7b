"""A Python-based Triton backend named ``onnxruntime``: runs ``model.onnx`` with ONNX Runtime.

The tritonserver shipped in the nvidia-pytriton wheel has only the Python backend. Triton
loads ``<backend-directory>/<name>/model.py`` for any model whose config says
``backend: "<name>"``, so this file lets the very config.pbtxt that the native ONNX Runtime
backend of ``nvcr.io/nvidia/tritonserver`` reads run here unchanged. It honours the parts of
that config which change results or speed: the model file name, the instance kind (CUDA
provider on KIND_GPU when a GPU is present), and ONNX Runtime's optimisation parameters.
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

from wsss.served.configs import declared, onnx_mismatches, parameters
from wsss.served.respond import respond

_GRAPH_LEVELS = {
    "0": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "1": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "2": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "99": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def _session_options(config: dict) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    level = str(config.get("optimization", {}).get("graph", {}).get("level", "99"))
    opts.graph_optimization_level = _GRAPH_LEVELS.get(
        level, ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    )
    params = parameters(config)
    if "intra_op_thread_count" in params:
        opts.intra_op_num_threads = int(params["intra_op_thread_count"])
    if "inter_op_thread_count" in params:
        opts.inter_op_num_threads = int(params["inter_op_thread_count"])
    if params.get("enable_mem_pattern") == "0":
        opts.enable_mem_pattern = False
    return opts


def _run_options(config: dict) -> ort.RunOptions:
    """Per-run options: ``memory.enable_memory_arena_shrinkage`` (as the native backend
    reads it) returns the arena's extra chunks after each run."""
    options = ort.RunOptions()
    params = parameters(config)
    shrink = params.get("memory.enable_memory_arena_shrinkage")
    if shrink:
        options.add_run_config_entry("memory.enable_memory_arena_shrinkage", shrink)
    return options


def _providers(config: dict, args: dict) -> list:
    """CPU, or on a GPU instance CUDA (and TensorRT first when the config asks for it)."""
    available = ort.get_available_providers()
    if args.get("model_instance_kind") != "GPU" or "CUDAExecutionProvider" not in available:
        return ["CPUExecutionProvider"]
    device = int(args.get("model_instance_device_id", "0"))
    providers = [("CUDAExecutionProvider", {"device_id": device}), "CPUExecutionProvider"]
    accelerators = (
        config.get("optimization", {})
        .get("execution_accelerators", {})
        .get("gpu_execution_accelerator", [])
    )
    for acc in accelerators:
        if acc.get("name") == "tensorrt" and "TensorrtExecutionProvider" in available:
            fp16 = acc.get("parameters", {}).get("precision_mode") == "FP16"
            options = {"device_id": device, "trt_fp16_enable": fp16}
            providers.insert(0, ("TensorrtExecutionProvider", options))
    return providers


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        filename = config.get("default_model_filename") or "model.onnx"
        path = os.path.join(args["model_repository"], args["model_version"], filename)
        providers = _providers(config, args)
        self.session = ort.InferenceSession(path, _session_options(config), providers=providers)
        # A file whose tensors are not the ones its config declares fails the load, as the
        # native backend's does (the previous version keeps serving), not every request.
        problems = onnx_mismatches(
            self.session,
            declared(config, "input"),
            declared(config, "output"),
            int(config.get("max_batch_size", 0)) > 0,
        )
        if problems:
            raise ValueError(f"{path}: {'; '.join(problems)}")
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [name for name, _, _ in declared(config, "output")]
        self.run_options = _run_options(config)

    def execute(self, requests):
        """Run every request of a dynamic batch in one session call, then split the results.
        Only the outputs the batch's requests ask for are computed and sent, as the native
        backend does: an ensemble step asks for those its output_map names (the bytes
        ensemble's segmenter step for SEGMENTATION, not the 21-class SEG_PROBS beside it)."""
        try:
            arrays = [
                [pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n in self.inputs]
                for r in requests
            ]
            sizes = [a[0].shape[0] for a in arrays]
            feeds = {n: np.concatenate([a[i] for a in arrays]) for i, n in enumerate(self.inputs)}
            asked = [self._asked(r) for r in requests]
            wanted = [n for n in self.outputs if any(n in a for a in asked)]
            results = self.session.run(wanted, feeds, self.run_options)
        except Exception:  # one bad request must not take its batch-mates' answers down
            return respond(requests, self._one, "onnxruntime")
        responses, start = [], 0
        for size, names in zip(sizes, asked, strict=True):
            tensors = [
                pb_utils.Tensor(n, np.ascontiguousarray(res[start : start + size]))
                for n, res in zip(wanted, results, strict=True)
                if n in names
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses

    def _asked(self, request) -> set:
        """The outputs ``request`` asks for (every one where it names none)."""
        return set(request.requested_output_names()) or set(self.outputs)

    def _one(self, request):
        feeds = {n: pb_utils.get_input_tensor_by_name(request, n).as_numpy() for n in self.inputs}
        wanted = [n for n in self.outputs if n in self._asked(request)]
        results = self.session.run(wanted, feeds, self.run_options)
        return [pb_utils.Tensor(n, r) for n, r in zip(wanted, results, strict=True)]
