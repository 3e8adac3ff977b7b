"""The project's ONNX Runtime backend shim (serving/backends/onnxruntime), which runs the
native backend's config.pbtxt under the wheel's tritonserver: it refuses a file whose tensors
are not its config's at load, as the native backend does, and one bad request of a dynamic
batch fails alone. Run in process with a stand-in for Triton's ``pb_utils``."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

BACKENDS = Path(__file__).parents[2] / "serving" / "backends"
SHIM = BACKENDS / "onnxruntime" / "model.py"


class _Tensor:
    def __init__(self, name, array):
        self.name, self.array = name, np.asarray(array)

    def as_numpy(self):
        return self.array


class _Response:
    def __init__(self, output_tensors, error=None):
        self.output_tensors, self.error = output_tensors, error


class _Request(dict):
    """A request: its inputs by name, and the outputs it asks for (none: every one)."""

    def __init__(self, inputs, asked=()):
        super().__init__(inputs)
        self.asked = list(asked)

    def requested_output_names(self):
        return self.asked


class _Error:
    INTERNAL, INVALID_ARG = "INTERNAL", "INVALID_ARG"

    def __init__(self, message, code="INTERNAL"):
        self.message, self.code = message, code


def _load(monkeypatch, path: Path, name: str):
    """A backend shim's module, with a stand-in for Triton's ``pb_utils``."""
    fake = types.SimpleNamespace(
        Tensor=_Tensor,
        InferenceResponse=_Response,
        TritonError=_Error,
        get_input_tensor_by_name=lambda request, name: _Tensor(name, request[name]),
    )
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def shim(monkeypatch):
    return _load(monkeypatch, SHIM, "onnx_shim")


def _repository(tmp_path: Path, dims: list[int]) -> dict:
    """A model doubling X [batch, 3] into Y and negating it into Z, and the args Triton
    would give its shim."""
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 3])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", 3])
    z = helper.make_tensor_value_info("Z", TensorProto.FLOAT, ["batch", 3])
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    graph = helper.make_graph(
        [helper.make_node("Mul", ["X", "two"], ["Y"]), helper.make_node("Neg", ["X"], ["Z"])],
        "double",
        [x],
        [y, z],
        [two],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (tmp_path / "1").mkdir()
    onnx.save(model, tmp_path / "1" / "model.onnx")
    config = {
        "max_batch_size": 8,
        "input": [{"name": "X", "data_type": "TYPE_FP32", "dims": [str(d) for d in dims]}],
        "output": [
            {"name": n, "data_type": "TYPE_FP32", "dims": [str(d) for d in dims]} for n in "YZ"
        ],
        "parameters": {"intra_op_thread_count": {"string_value": "1"}},
    }
    return {
        "model_config": json.dumps(config),
        "model_repository": str(tmp_path),
        "model_version": "1",
    }


def test_the_shim_refuses_a_file_unlike_its_config(shim, tmp_path):
    model = shim.TritonPythonModel()
    with pytest.raises(
        ValueError, match=r"input X has shape \[-1, 3\] in the ONNX file, \[-1, 4\]"
    ):
        model.initialize(_repository(tmp_path, [4]))


def test_one_bad_request_of_a_batch_fails_alone(shim, tmp_path):
    model = shim.TritonPythonModel()
    model.initialize(_repository(tmp_path, [3]))
    good = _Request({"X": np.ones((2, 3), np.float32)})
    bad = _Request({"X": np.ones((1, 3), np.float64)})  # float64: ONNX Runtime refuses it
    responses = model.execute([good, bad, good])
    assert [r.error is None for r in responses] == [True, False, True], [
        r.error and r.error.message for r in responses
    ]
    np.testing.assert_array_equal(responses[0].output_tensors[0].as_numpy(), np.full((2, 3), 2.0))
    assert responses[1].error.message.startswith("onnxruntime: ")
    assert [len(r.output_tensors[0].as_numpy()) for r in model.execute([good, good])] == [2, 2]


def test_only_the_outputs_a_request_asks_for_are_computed_and_sent(shim, tmp_path):
    """As the native backend: an ensemble step asks for the outputs its output_map names
    (the bytes ensemble's segmenter step SEGMENTATION, not SEG_PROBS: 8.6 MB a photo for the
    multi-object profile's 21 classes at 320 px); a request naming none gets every one."""
    model = shim.TritonPythonModel()
    model.initialize(_repository(tmp_path, [3]))
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    y_only, z_only, every = (_Request({"X": x}, asked) for asked in (["Y"], ["Z"], []))
    responses = model.execute([y_only, z_only, every])
    sent = [{t.name: t.as_numpy() for t in r.output_tensors} for r in responses]
    assert [sorted(s) for s in sent] == [["Y"], ["Z"], ["Y", "Z"]]
    np.testing.assert_array_equal(sent[0]["Y"], 2 * x)
    np.testing.assert_array_equal(sent[1]["Z"], -x)
    np.testing.assert_array_equal(sent[2]["Z"], -x)
    # One request at a time (after a batch call failed) asks the same way.
    assert [t.name for t in model._one(z_only)] == ["Z"]
    # A batch asking for Y alone runs the graph for Y alone.
    asked = []
    session = model.session

    class Spy:
        def run(self, names, feeds, options=None):
            asked.append(list(names))
            return session.run(names, feeds, options)

    model.session = Spy()
    model.execute([y_only, y_only])
    assert asked == [["Y"]]


def test_the_pytorch_shim_sends_only_the_outputs_asked_for(monkeypatch, tmp_path):
    """The TorchScript stand-in runs the whole module (TorchScript cannot prune outputs)
    but sends a request only the outputs it asks for (every one where it names none)."""
    import torch

    class TwoOutputs(torch.nn.Module):
        def forward(self, x):
            return 2 * x, -x

    (tmp_path / "1").mkdir()
    torch.jit.save(torch.jit.script(TwoOutputs()), tmp_path / "1" / "model.pt")
    dims = {"data_type": "TYPE_FP32", "dims": ["3"]}
    config = {
        "max_batch_size": 8,
        "input": [{"name": "INPUT__0", **dims}],
        "output": [{"name": "Y__0", **dims}, {"name": "Z__1", **dims}],
        "parameters": {"INTRA_OP_THREAD_COUNT": {"string_value": "1"}},
    }
    threads = []  # the instance's threads, as the native backend's parameter sets them
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    pytorch = _load(monkeypatch, BACKENDS / "pytorch" / "model.py", "pytorch_shim")
    model = pytorch.TritonPythonModel()
    model.initialize(
        {
            "model_config": json.dumps(config),
            "model_repository": str(tmp_path),
            "model_version": "1",
        }
    )
    x = np.ones((1, 3), np.float32)
    z_only, every = (_Request({"INPUT__0": x}, asked) for asked in (["Z__1"], []))
    responses = model.execute([z_only, every])
    sent = [{t.name: t.as_numpy() for t in r.output_tensors} for r in responses]
    assert [sorted(s) for s in sent] == [["Z__1"], ["Y__0", "Z__1"]]
    np.testing.assert_array_equal(sent[0]["Z__1"], -x)
    assert threads == [1]
