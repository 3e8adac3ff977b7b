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
    params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
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
    params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
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


_ONNX_TYPES = {
    "tensor(uint8)": "TYPE_UINT8",
    "tensor(int32)": "TYPE_INT32",
    "tensor(int64)": "TYPE_INT64",
    "tensor(float)": "TYPE_FP32",
    "tensor(float16)": "TYPE_FP16",
    "tensor(bool)": "TYPE_BOOL",
}


def _check_against_config(session, config: dict, path: str) -> None:
    """Refuse to load a model file whose tensors are not the ones its config declares, as the
    native backend does: a wrong name, dtype or shape fails the load (the previous version
    keeps serving), not every request afterwards."""
    batched = int(config.get("max_batch_size", 0)) > 0
    for kind, declared, actual in (
        ("input", config.get("input", []), session.get_inputs()),
        ("output", config.get("output", []), session.get_outputs()),
    ):
        found = {t.name: t for t in actual}
        for tensor in declared:
            name = tensor["name"]
            if name not in found:
                raise ValueError(
                    f"{path}: the config's {kind} {name} is not in the model "
                    f"(it has {', '.join(sorted(found)) or 'none'})"
                )
            got = found[name]
            if _ONNX_TYPES.get(got.type, got.type) != tensor["data_type"]:
                raise ValueError(
                    f"{path}: {kind} {name} is {got.type}, the config says {tensor['data_type']}"
                )
            shape = got.shape[1:] if batched else got.shape
            dims = [int(d) for d in tensor["dims"]]
            if len(shape) != len(dims) or any(
                isinstance(s, int) and d != -1 and s != d for s, d in zip(shape, dims, strict=True)
            ):
                raise ValueError(
                    f"{path}: {kind} {name} has shape {list(got.shape)}, the config says "
                    f"{'[batch] + ' if batched else ''}{dims}"
                )


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        filename = config.get("default_model_filename") or "model.onnx"
        path = os.path.join(args["model_repository"], args["model_version"], filename)
        providers = _providers(config, args)
        self.session = ort.InferenceSession(path, _session_options(config), providers=providers)
        _check_against_config(self.session, config, path)
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.run_options = _run_options(config)

    def execute(self, requests):
        """Run every request of a dynamic batch in one session call, then split the results."""
        try:
            arrays = [
                [pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n in self.inputs]
                for r in requests
            ]
            sizes = [a[0].shape[0] for a in arrays]
            feeds = {n: np.concatenate([a[i] for a in arrays]) for i, n in enumerate(self.inputs)}
            results = self.session.run(self.outputs, feeds, self.run_options)
        except Exception as exc:  # one bad request must not take its batch-mates' answers down
            return (
                [self._run_one(r) for r in requests]
                if len(requests) > 1
                else [
                    pb_utils.InferenceResponse(
                        output_tensors=[], error=pb_utils.TritonError(str(exc))
                    )
                ]
            )
        responses, start = [], 0
        for size in sizes:
            tensors = [
                pb_utils.Tensor(n, np.ascontiguousarray(res[start : start + size]))
                for n, res in zip(self.outputs, results, strict=True)
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses

    def _run_one(self, request):
        try:
            feeds = {
                n: pb_utils.get_input_tensor_by_name(request, n).as_numpy() for n in self.inputs
            }
            results = self.session.run(self.outputs, feeds, self.run_options)
            return pb_utils.InferenceResponse(
                output_tensors=[
                    pb_utils.Tensor(n, r) for n, r in zip(self.outputs, results, strict=True)
                ]
            )
        except Exception as exc:
            return pb_utils.InferenceResponse(
                output_tensors=[], error=pb_utils.TritonError(str(exc))
            )
