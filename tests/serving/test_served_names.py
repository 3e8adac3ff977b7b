"""Names come from the server: a client reads the class names and the masks' palette from the
served models' config, and Triton's classification extension answers top-k with them."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from export.check import versions
from export.configs import parse
from serving.client import PipelineClient, load_image, requested_outputs, resize
from tests.conftest import free_port, random_export_cfg
from wsss.tensors import (
    CLASSIFIER,
    IMAGE,
    PIPELINE,
    PIPELINE_BYTES,
    SCORES,
    read_label_parameters,
)

# Runs `wsss` as its entry point does, then says whether anything imported torch.
_WSSS_WITHOUT_TORCH = """
import sys
from cli.main import main
try:
    main(sys.argv[1:])
finally:
    torch = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
    print("torch modules:", torch, file=sys.stderr)
"""


def _wsss(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-c", _WSSS_WITHOUT_TORCH, *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


def test_the_client_and_wsss_infer_import_no_torch(tmp_path):
    code = "import sys, serving.client, serving.infer; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip() == "False", proc.stderr
    assert "torch modules: []" in _wsss("infer", "--help").stderr
    # The whole infer path up to the server, which is not there: a clear error, no torch.
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    proc = _wsss("infer", str(tmp_path / "x.png"), "--url", f"127.0.0.1:{free_port()}")
    assert proc.returncode != 0 and f"cannot reach model '{PIPELINE_BYTES}'" in proc.stderr
    assert "torch modules: []" in proc.stderr


@pytest.mark.parametrize(
    "args, said",
    [
        (["export", "--check", "--repository", "nowhere"], "no such repository folder"),
        (["train", "--set", "train.epochs=many"], "train.epochs"),
        (["evaluate", "--set", "train.epochs=many"], "train.epochs"),
        (["soak", "--concurrency", "0"], "at least 1: not 0"),
    ],
    ids=["export-check", "train", "evaluate", "soak"],
)
def test_checks_and_refusals_import_no_torch(tmp_path, args, said):
    """Checking a repository reads it alone, and a bad setting is said before torch is
    imported: in under a second, not the 5-6 s that importing torch takes here."""
    proc = _wsss(*args, cwd=tmp_path)
    assert proc.returncode != 0 and said in proc.stderr + proc.stdout, proc.stderr[-2000:]
    assert "torch modules: []" in proc.stderr


def _served_names(exported) -> list[str]:
    folder = Path(exported.export.repository) / CLASSIFIER
    return json.loads((folder / str(versions(folder)[-1]) / "class_names.json").read_text())


def _sample(exported) -> Path:
    from training.data import list_samples

    return list_samples(exported.data.root, "pets", "test")[0].image_path


@pytest.mark.slow
@pytest.mark.triton
@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("model", [PIPELINE, CLASSIFIER])
def test_top_k_answers_with_the_served_class_names(server, exported, protocol, model):
    names = _served_names(exported)
    url = server.grpc_url if protocol == "grpc" else server.http_url
    client = PipelineClient(url, protocol)
    assert client.class_names == names and client.palette is not None
    image = resize(load_image(_sample(exported)), client.image_size)[None]
    scores = client.infer(image, [SCORES])[SCORES][0]
    k = 3
    tensor = client.module.InferInput(IMAGE, list(image.shape), "UINT8")
    tensor.set_data_from_numpy(image)
    # Ask the chain together (see serving.client), SCORES as top-k "score:index:label".
    outputs = [
        client.module.InferRequestedOutput(n, class_count=k if n == SCORES else 0)
        for n in requested_outputs(client.all_specs, model, [SCORES])
    ]
    result = client.client.infer(model, [tensor], outputs=outputs)
    top = [b.decode() for b in result.as_numpy(SCORES)[0]]
    client.close()
    assert len(top) == k
    got = [(float(s), int(i), label) for s, i, label in (t.split(":", 2) for t in top)]
    for score, index, label in got:
        assert label == names[index], top
        assert abs(score - scores[index]) < 1e-4, (top, scores)
    assert [s for s, _, _ in got] == sorted((s for s, _, _ in got), reverse=True)
    assert got[0][0] == pytest.approx(scores.max(), abs=1e-4)


LOCAL = ("aeroplane", "bicycle", "boat", "bus")  # another profile's classes


@pytest.mark.slow
@pytest.mark.triton
def test_wsss_infer_names_what_the_server_serves_not_the_local_repository(
    server, exported, tmp_path
):
    """Run from a folder whose model_repository/ holds another profile's export."""
    from export.repository import export_repository

    local = random_export_cfg(
        tmp_path, f"export.repository={tmp_path / 'model_repository'}", class_names=LOCAL
    )
    export_repository(local)
    path = _sample(exported)
    out = tmp_path / "out"
    proc = _wsss("infer", str(path), "--url", server.grpc_url, "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "torch modules: []" in proc.stderr
    printed = re.fullmatch(
        rf"{re.escape(str(path))}: (.+) \((\d\.\d\d)\) -> .+", proc.stdout.strip()
    )
    assert printed, proc.stdout
    client = PipelineClient(server.grpc_url)
    scores = client.infer(resize(load_image(path), client.image_size)[None], [SCORES])[SCORES][0]
    names, palette = client.class_names, client.palette
    client.close()
    assert names == _served_names(exported) and not set(names) & set(LOCAL)
    assert printed.group(1) == names[int(scores.argmax())]
    png = Image.open(out / f"{path.stem}_segmentation.png")
    assert png.getpalette() == palette
    # The names the local repository holds, which the old lookup would have printed.
    local_cfg = parse((Path(local.export.repository) / PIPELINE / "config.pbtxt").read_text())
    params = {k: v.string_value for k, v in local_cfg.parameters.items()}
    assert read_label_parameters(params)[0] == list(LOCAL)
