"""A server of one tiny Python model in two instances, behind an ensemble named as the
pipeline: it starts in seconds (no training, no export), which the tests of the restricted
APIs and of the stub watchdog need, and it runs under `explicit` model control, where the
model-repository API matters most."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from serving.server import TritonServer, on_free_ports
from wsss.config import ServeConfig
from wsss.tensors import PIPELINE

ECHO = "echo"  # Y = X, in two instances (two stub processes)
ECHO_CODE = """import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [
            pb_utils.InferenceResponse(
                [pb_utils.Tensor("Y", pb_utils.get_input_tensor_by_name(r, "X").as_numpy())]
            )
            for r in requests
        ]
"""


def _tensor(cls, name: str):
    return cls(name=name, data_type=pb.TYPE_FP32, dims=[1])


def _write(repo: Path, config: pb.ModelConfig, code: str | None = None) -> None:
    (repo / config.name / "1").mkdir(parents=True)
    (repo / config.name / "config.pbtxt").write_text(text_format.MessageToString(config))
    if code is not None:
        (repo / config.name / "1" / "model.py").write_text(code)


def echo_repository(repo: Path) -> Path:
    step = pb.ModelEnsembling.Step(
        model_name=ECHO, model_version=-1, input_map={"X": "X"}, output_map={"Y": "Y"}
    )
    io = {"input": [_tensor(pb.ModelInput, "X")], "output": [_tensor(pb.ModelOutput, "Y")]}
    _write(
        repo,
        pb.ModelConfig(
            name=ECHO,
            backend="python",
            instance_group=[pb.ModelInstanceGroup(count=2, kind=pb.ModelInstanceGroup.KIND_CPU)],
            **io,
        ),
        ECHO_CODE,
    )
    ensemble = pb.ModelEnsembling(step=[step])
    _write(
        repo, pb.ModelConfig(name=PIPELINE, platform="ensemble", ensemble_scheduling=ensemble, **io)
    )
    return repo


@pytest.fixture(scope="session")
def echo_server(tmp_path_factory):
    work = tmp_path_factory.mktemp("echo")
    serve = dataclasses.replace(on_free_ports(ServeConfig()), model_control="explicit")
    with TritonServer(echo_repository(work / "repo"), serve, work / "server") as server:
        yield server
