"""What `make serve` builds (configs/serve.yaml), served and asked about real photos.

No training at all: the ImageNet head's cat and dog groups, saliency-guided pseudo-masks,
the pass-through segmenter. On real Pet test photos sent as their files, the served top
class must name the species (>= 0.9 on 13 photos; 0.953 on all 149 in reports/serve/) and
the served masks must sit on the pet (IoU >= 0.75; 0.843 on all 149).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.served_quality import served_quality
from export.repository import export_repository
from serving.server import TritonServer
from tests.conftest import ONE_INSTANCE, ROOT, port_settings
from training import stages
from training.data.dataset import WSSSDataset
from training.data.layouts import list_samples
from training.data.synth import SynthOptions, ensure_synth
from wsss.config import load_config

CONFIG = ROOT / "configs" / "serve.yaml"

pytestmark = [pytest.mark.slow, pytest.mark.triton, pytest.mark.realdata]


@pytest.fixture(scope="module")
def served(real_pets, tmp_path_factory):
    work = tmp_path_factory.mktemp("serve_profile")
    cfg = load_config(
        CONFIG,
        [
            *ONE_INSTANCE,
            f"data.root={work / 'data'}",
            f"runs={work / 'runs'}",
            f"export.repository={work / 'model_repository'}",
            *port_settings(),
        ],
    )
    ensure_synth(cfg.data.root, SynthOptions.of(cfg.data))
    stages.run(cfg)  # nothing trained: the ImageNet head and the pass-through are written
    export_repository(cfg)
    with TritonServer(Path(cfg.export.repository), cfg.serve, work / "server") as server:
        yield cfg, server


def test_make_serves_model_names_the_species_and_finds_the_pet(served, real_pets):
    cfg, _ = served
    photos = list_samples(real_pets, "pets", "test")[::12]  # 13 photos, all three breeds
    data = WSSSDataset(real_pets, "pets", "test", 64, samples=photos)
    result, meta = served_quality(data, f"127.0.0.1:{cfg.serve.grpc_port}", concurrency=2)
    row = result.row()
    assert meta["class_names"] == ["cat", "dog"] and meta["labelled_images"] == len(photos)
    assert row["accuracy"] >= 0.9, row
    assert row["pseudo_iou"] >= 0.75, row
    assert row["seg_iou"] == row["pseudo_iou"], row  # the pass-through serves the mask
