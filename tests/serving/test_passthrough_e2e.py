"""The pass-through segmenter on the real stack: exported, served by tritonserver, asked over
gRPC through both ensembles, every subset of their outputs answered, and their chains (the
ensembles as exports before ``wsss.tensors.CHAINS`` served them) pruned as ``wsss.pruning``
says."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpc
from tritonclient.utils import InferenceServerException

from serving.client import PipelineClient
from tests.conftest import passthrough_export
from training.data import list_samples, read_image
from wsss.pruning import answered, ensemble_steps, outputs_to_request
from wsss.served.images import encode_png, resize_image
from wsss.tensors import (
    CHAINS,
    CLASSIFIER,
    PIPELINE,
    PIPELINE_BYTES,
    PSEUDO_MASK,
    PSEUDO_MASK_FULL,
    SCORES,
    SEG_PROBS,
    SEGMENTATION,
    SEGMENTATION_FULL,
    SEGMENTER,
    served_models,
)

pytestmark = [pytest.mark.slow, pytest.mark.triton]


@pytest.fixture(scope="module")
def passthrough(trained, tmp_path_factory):
    """The tiny trained classifier, the fixed threshold, the pass-through segmenter."""
    return passthrough_export(
        trained, tmp_path_factory.mktemp("passthrough"), "refine.method=fixed"
    )


@pytest.fixture(scope="module")
def server(passthrough, tmp_path_factory):
    from serving.server import TritonServer

    repo = Path(passthrough.export.repository)
    with TritonServer(repo, passthrough.serve, tmp_path_factory.mktemp("server")) as srv:
        yield srv


@pytest.fixture(scope="module")
def images(passthrough):
    size = (passthrough.data.image_size,) * 2
    samples = list_samples(passthrough.data.root, "pets", "test")[:3]
    return np.stack([resize_image(read_image(s.image_path), size) for s in samples])


def test_both_ensembles_serve_the_refined_mask_as_the_segmentation(server, passthrough, images):
    from training.pipeline import pipeline_from_config

    client = PipelineClient(server.grpc_url, "grpc")
    got = client.infer(images)
    assert set(got) == {t.name for t in client.specs.outputs}  # every tensor, as before
    np.testing.assert_array_equal(got[SEGMENTATION], got[PSEUDO_MASK])
    assert got[SEG_PROBS].shape == (len(images), 2, *images.shape[1:3])
    np.testing.assert_array_equal(got[SEG_PROBS].argmax(1), got[SEGMENTATION])
    np.testing.assert_array_equal(got[SEG_PROBS].sum(1), 1.0)  # one-hot
    assert 0 < got[PSEUDO_MASK].mean() < 1  # a mask with both classes: a real check
    want = pipeline_from_config(passthrough)(images)
    assert (got[PSEUDO_MASK] != want[PSEUDO_MASK]).mean() <= 1e-3
    np.testing.assert_array_equal(want[SEGMENTATION], want[PSEUDO_MASK])
    np.testing.assert_allclose(got[SCORES], want[SCORES], atol=1e-4)

    full = PipelineClient(server.grpc_url, "grpc", model=PIPELINE_BYTES).infer(images)
    assert set(full) == {SCORES, PSEUDO_MASK_FULL, SEGMENTATION_FULL}
    np.testing.assert_array_equal(full[SEGMENTATION_FULL], full[PSEUDO_MASK_FULL])
    np.testing.assert_array_equal(full[SEGMENTATION_FULL], got[SEGMENTATION])  # same size
    client.close()


def test_every_subset_is_answered_and_the_chains_pruned_as_the_model_says(server, images):
    """Each subset of each ensemble's outputs, asked with plain tritonclient: the ensemble
    answers it with the full request's values. Its chain, which steps through the models as
    the ensemble itself did before the chains (and an older export's still does; the bytes
    chain now without the pass-through segmenter, its postprocess reading PSEUDO_MASK for
    both masks), answers it or fails with "unexpected deadlock" exactly as ``wsss.pruning``
    predicts, and answers it asked with ``outputs_to_request``'s extras."""
    client = grpc.InferenceServerClient(server.grpc_url)
    meta = client.get_model_metadata(SEGMENTER)
    assert [i.name for i in meta.inputs] == [PSEUDO_MASK]
    k, s = (int(client.get_model_metadata(m).outputs[0].shape[1]) for m in (CLASSIFIER, SEGMENTER))
    specs = served_models(images.shape[1], k, s, segmenter_input=PSEUDO_MASK)
    blobs = np.array([[encode_png(image)] for image in images[:1]], dtype=np.object_)
    deadlocks = 0
    for model, array in {PIPELINE: images[:1], PIPELINE_BYTES: blobs}.items():
        (name,), outputs = [t.name for t in specs[model].inputs], specs[model].outputs
        names, steps = [t.name for t in outputs], ensemble_steps(specs, CHAINS[model])
        full = _infer(client, model, name, array, names)
        for n in range(1, len(names) + 1):
            for asked in itertools.combinations(names, n):
                got = _infer(client, model, name, array, list(asked))
                for out in asked:
                    np.testing.assert_allclose(got[out], full[out], atol=1e-5, err_msg=out)
                chain = CHAINS[model]
                if answered(steps, [name], names, asked):
                    _infer(client, chain, name, array, list(asked))
                else:
                    deadlocks += 1
                    with pytest.raises(InferenceServerException, match="deadlock"):
                        _infer(client, chain, name, array, list(asked))
                wanted = outputs_to_request(specs, CHAINS[model], asked)
                got = _infer(client, chain, name, array, wanted)
                for out in asked:
                    np.testing.assert_allclose(got[out], full[out], atol=1e-5, err_msg=out)
    assert deadlocks > 0 and client.is_model_ready(PIPELINE)  # and it goes on serving
    client.close()


def _infer(client, model: str, name: str, array: np.ndarray, outputs: list[str]) -> dict:
    tensor = grpc.InferInput(name, list(array.shape), grpc.np_to_triton_dtype(array.dtype))
    tensor.set_data_from_numpy(array)
    requested = [grpc.InferRequestedOutput(n) for n in outputs]
    result = client.infer(model, [tensor], outputs=requested)
    return {n: result.as_numpy(n) for n in outputs}
