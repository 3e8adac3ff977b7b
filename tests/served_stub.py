"""Runs one Python model of an exported repository the way Triton's stub does, with the project
and its training stack unimportable: proof that the version folder stands alone.

    python tests/served_stub.py <model dir> <version> <config.json> <inputs.npz> <out.npz>

``config.json`` is the model config as Triton passes it (JSON); every array of
``inputs.npz`` is one request's input of that name. The outputs, or the error's message and
code, are written to ``out.npz``.
"""

import importlib
import importlib.abc
import json
import sys
import types

import numpy as np

BLOCKED = {"wsss", "training", "export", "serving", "torch", "torchvision", "timm", "skimage"}
BLOCKED |= {"scipy", "onnx", "tritonclient"}


class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is not available to the served repository")
        return None


def _fake_backend_utils():
    """The parts of ``triton_python_backend_utils`` our models use."""
    pb = types.ModuleType("triton_python_backend_utils")

    class Tensor:
        def __init__(self, name, array):
            self._name, self._array = name, np.asarray(array)

        def name(self):
            return self._name

        def as_numpy(self):
            return self._array

    class TritonError(Exception):
        UNKNOWN, INTERNAL, NOT_FOUND, INVALID_ARG = 0, 1, 2, 3

        def __init__(self, message, code=0):
            super().__init__(message)
            self._message, self._code = message, code

        def message(self):
            return self._message

        def code(self):
            return self._code

    class InferenceResponse:
        def __init__(self, output_tensors, error=None):
            self.output_tensors, self.error = output_tensors, error

    def get_input_tensor_by_name(request, name):
        return request.get(name)

    pb.Tensor, pb.TritonError, pb.InferenceResponse = Tensor, TritonError, InferenceResponse
    pb.get_input_tensor_by_name = get_input_tensor_by_name
    return pb


def main(model_dir, version, config_path, inputs_path, out_path):
    sys.meta_path.insert(0, _Block())
    sys.modules["triton_python_backend_utils"] = _fake_backend_utils()
    sys.path.append(model_dir)  # as the stub does: the version folder is package <version>
    model = importlib.import_module(f"{version}.model").TritonPythonModel()
    config = json.loads(open(config_path).read())
    model.initialize({"model_config": json.dumps(config), "model_version": version})
    with np.load(inputs_path, allow_pickle=True) as data:
        request = {k: types.SimpleNamespace(as_numpy=lambda a=data[k]: a) for k in data.files}
    (response,) = model.execute([request])
    if response.error is not None:
        out = {"error": response.error.message(), "code": response.error.code()}
    else:
        out = {t.name(): t.as_numpy() for t in response.output_tensors}
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    np.savez(out_path, loaded=np.array(loaded, dtype=object), **out)


if __name__ == "__main__":
    main(*sys.argv[1:])
