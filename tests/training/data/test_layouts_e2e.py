"""Each new layout end to end: `wsss data synth --layout`, train, evaluate, export, serve.

One tiny run per layout (24 images at 64 px, one epoch), shared by the tests of this module:
the class count and names must follow the data into the served repository.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from export.configs import parse
from tests.conftest import TINY, port_settings
from training.data import list_samples, read_class_names, read_image
from training.data.writers import folder_palette
from training.pipeline import pipeline_from_config
from wsss.config import load_config
from wsss.palette import VOC_PALETTE
from wsss.served.images import resize_image

pytestmark = pytest.mark.slow

COUNT = 24  # 18 train, 6 test


def _settings(work: Path, layout: str) -> list[str]:
    return TINY + [
        "data.task=voc",
        f"data.layout={layout}",
        f"data.root={work / 'data'}",
        f"runs={work / 'runs'}",
        f"export.repository={work / 'repo'}",
        *port_settings(),
    ]


def _synth(settings: list[str]) -> None:
    from cli import main as cli

    cli.main(["data", "synth", "--count", str(COUNT), *(x for s in settings for x in ("--set", s))])


@pytest.fixture(scope="module", params=["coco", "voc_aug", "folder"])
def exported_layout(request, tmp_path_factory):
    """Synth data in the layout, the weakly supervised chain trained on it, and exported."""
    from export.repository import export_repository
    from training import stages

    settings = _settings(tmp_path_factory.mktemp(request.param), request.param)
    _synth(settings)
    cfg = load_config(None, settings)
    stages.run(cfg)
    export_repository(cfg)
    return cfg


def _test_images(cfg, count=3) -> np.ndarray:
    samples = list_samples(cfg.data.root, "voc", "test", cfg.data.layout)[:count]
    size = (cfg.data.image_size, cfg.data.image_size)
    return np.stack([resize_image(read_image(s.image_path), size) for s in samples])


def test_each_layout_trains_evaluates_and_exports_its_classes(exported_layout):
    from experiments.studies import evaluate_profile
    from export.check import check_repository

    cfg = exported_layout
    names = read_class_names(cfg.data.root, "voc", cfg.data.layout)
    assert len(names) == (80 if cfg.data.layout == "coco" else 10)
    table = evaluate_profile(cfg)
    assert "| pseudo-masks (resnet18 cam + otsu) |" in table
    results = json.loads((Path(cfg.runs) / "eval" / "results.json").read_text())
    assert results["images"] == COUNT // 4 and results["masks"] is True
    assert results["task"] == "voc"
    assert {"map", "pseudo_miou"} <= set(results["rows"][0])
    assert {"seg_miou"} <= set(results["rows"][1])
    repo = Path(cfg.export.repository)
    assert check_repository(repo).ok
    assert json.loads((repo / "classifier" / "1" / "class_names.json").read_text()) == names
    # The masks' colours follow the data: the folder's own, VOC's for the others.
    palette = json.loads((repo / "classifier" / "1" / "palette.json").read_text())
    own = cfg.data.layout == "folder"
    assert palette == (folder_palette(len(names)) if own else VOC_PALETTE)
    seg = parse((repo / "segmenter" / "config.pbtxt").read_text())
    assert list(seg.output[0].dims) == [len(names) + 1, 64, 64]  # background + the data's
    refiner = parse((repo / "refiner" / "config.pbtxt").read_text())
    # The Otsu refiner is an ONNX graph; its multi-label presence rule is inside it.
    assert refiner.backend == "onnxruntime" and list(refiner.input[1].dims) == [len(names)]
    outputs = pipeline_from_config(cfg)(_test_images(cfg))
    assert outputs["SCORES"].shape == (3, len(names))
    assert outputs["SEGMENTATION"].max() <= len(names)


@pytest.mark.triton
def test_each_layout_is_served_as_in_process(exported_layout, tmp_path):
    """The served ensemble of each layout's export against the in-process pipeline."""
    from serving.client import PipelineClient
    from serving.server import TritonServer
    from tests.serving.test_serving_e2e import _assert_close

    cfg = exported_layout
    images = _test_images(cfg)
    reference = pipeline_from_config(cfg)(images)
    with TritonServer(Path(cfg.export.repository), cfg.serve, tmp_path / "server") as server:
        client = PipelineClient(server.grpc_url, "grpc")
        got = client.infer(images)
        client.close()
    # Otsu's cut of 80 near-flat CAMs of a one-epoch 64-px model moves with float noise (the
    # CAMs agree to 1e-3): 0.03-0.11% of PSEUDO_MASK's pixels here. What this test is for is
    # the classes following the data; the parity of the graphs is test_serving_e2e's, at 0.1%.
    _assert_close(got, reference, mismatch={"PSEUDO_MASK": 0.005})
    names = read_class_names(cfg.data.root, "voc", cfg.data.layout)
    assert got["SCORES"].shape[1] == len(names)


def test_a_folder_without_masks_trains_and_evaluation_scores_the_classifier_only(tmp_path):
    from experiments.studies import evaluate_profile
    from training import stages

    settings = _settings(tmp_path, "folder")
    _synth(settings)
    shutil.rmtree(tmp_path / "data" / "masks")
    cfg = load_config(None, settings)
    stages.run(cfg)  # classifier, pseudo-masks, segmenter: none needs a true mask
    assert (tmp_path / "runs" / "segmenter" / "best.pt").exists()
    table = evaluate_profile(cfg)
    assert table.startswith("nothing to score but the classifier: no test image has a mask")
    results = json.loads((tmp_path / "runs" / "eval" / "results.json").read_text())
    assert results["masks"] is False
    pseudo, seg = results["rows"]
    assert set(pseudo) == {"output", "map", "map_classes", "label_f1", "refine_ms"}
    assert set(seg) == {"output"}
    with pytest.raises(ValueError, match="no training image has a mask"):
        stages.run(cfg, ("supervised",))


def test_bad_data_is_one_line_from_the_cli(tmp_path):
    settings = _settings(tmp_path, "folder")
    _synth(settings)
    labels = tmp_path / "data" / "labels.csv"
    lines = labels.read_text().splitlines()
    lines[1] = "photo_0001.jpg,unicorn,train"
    labels.write_text("\n".join(lines) + "\n")
    proc = subprocess.run(
        [sys.executable, "-m", "cli", "train", *(x for s in settings for x in ("--set", s))],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith(f"wsss train: {labels}, line 2: label 'unicorn' is not in the class list")
    )


def test_a_folder_per_class_trains_evaluates_and_exports_its_folders_as_classes(tmp_path):
    """ImageFolder's layout, as most image-level labels come: the chain trains on it, the
    classifier is scored (no masks), and the served classes are the folders' names."""
    from experiments.studies import evaluate_profile
    from export.repository import export_repository
    from training import stages

    settings = [*_settings(tmp_path, "imagefolder"), "data.task=pets"]
    _synth(settings)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["synth.json", "test", "train"]
    cfg = load_config(None, settings)
    stages.run(cfg)
    table = evaluate_profile(cfg)
    assert table.startswith("nothing to score but the classifier: no test image has a mask")
    results = json.loads((tmp_path / "runs" / "eval" / "results.json").read_text())
    assert results["images"] == COUNT // 4 and "accuracy" in results["rows"][0]
    export_repository(cfg)
    names = sorted(p.name for p in (tmp_path / "data" / "train").iterdir())
    served = json.loads((tmp_path / "repo" / "classifier" / "1" / "class_names.json").read_text())
    assert served == read_class_names(cfg.data.root, "pets", "imagefolder") == names
