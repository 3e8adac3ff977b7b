"""The random walk served on the real stack: the ViT model returns its patch tokens beside
the classifier, the Python refiner walks the CAMs over them, and the masks the ensembles
answer over gRPC are the ones made in process."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from serving.client import PipelineClient
from tests.conftest import passthrough_export
from training.data import list_samples, read_image
from wsss.served.images import resize_image
from wsss.tensors import PIPELINE_BYTES, PSEUDO_MASK, SCORES, SEGMENTATION, SEGMENTATION_FULL

pytestmark = [pytest.mark.slow, pytest.mark.triton]


@pytest.fixture(scope="module")
def walk(trained, tmp_path_factory):
    """The tiny trained classifier, the walk, the pass-through segmenter."""
    work = tmp_path_factory.mktemp("walk")
    return passthrough_export(trained, work, "refine.method=walk", "refine.threshold=0.5")


def test_the_served_walk_answers_the_masks_made_in_process(walk, tmp_path):
    from serving.server import TritonServer
    from training.pipeline import pipeline_from_config

    size = (walk.data.image_size,) * 2
    samples = list_samples(walk.data.root, "pets", "test")[:3]
    images = np.stack([resize_image(read_image(s.image_path), size) for s in samples])
    want = pipeline_from_config(walk)(images)
    assert 0.05 < (want[PSEUDO_MASK] > 0).mean() < 0.95  # a real mask, not an empty or full one
    with TritonServer(Path(walk.export.repository), walk.serve, tmp_path / "server") as server:
        client = PipelineClient(server.grpc_url, "grpc")
        got = client.infer(images)
        full = PipelineClient(server.grpc_url, "grpc", model=PIPELINE_BYTES).infer(images)
        client.close()
    np.testing.assert_allclose(got[SCORES], want[SCORES], atol=1e-4)
    # The ViT's input resized in its graph as OpenCV resizes it, up to a rounding tie.
    assert (got[PSEUDO_MASK] == want[PSEUDO_MASK]).mean() >= 0.99
    np.testing.assert_array_equal(got[SEGMENTATION], got[PSEUDO_MASK])
    np.testing.assert_array_equal(full[SEGMENTATION_FULL], got[SEGMENTATION])
