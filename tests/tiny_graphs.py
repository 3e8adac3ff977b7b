"""Small ONNX graphs with the interface of the models the project reads, for tests about
shapes, plumbing and export rather than what the real model sees (that is held to real
photos, where the real models run)."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper


def tiny_saliency() -> bytes:
    """A graph with the saliency model's interface: [B, 3, 224, 224] -> output_importance.

    It reads 224 px only (its MatMul is 224 wide): a test that runs it at another
    ``refine.saliency_size`` fails on the stand-in, not on the refiner."""
    rng = np.random.default_rng(0)
    weight = helper.make_tensor(
        "w",
        TensorProto.FLOAT,
        [224, 224],
        rng.standard_normal((224, 224)).astype(np.float32).ravel() / 15,
    )
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["grey"], axes=[1], keepdims=0),
        helper.make_node("MatMul", ["grey", "w"], ["mixed"]),
        helper.make_node("Sigmoid", ["mixed"], ["output_importance"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, 224, 224])],
        [helper.make_tensor_value_info("output_importance", TensorProto.FLOAT, ["b", 224, 224])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()
