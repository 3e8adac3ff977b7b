"""The client tells an ensemble of its chain (every export since ``wsss.tensors.CHAINS``)
from one that steps through its models (an older export's), from the configs the server
holds, and asks each what it answers whole."""

import types

import pytest

from serving.client import PipelineClient, encoded_input, requested_outputs
from wsss.tensors import (
    CHAINS,
    CLASSIFIER,
    ENSEMBLES,
    EXPORT_ID,
    IMAGE_BYTES,
    PIPELINE,
    PIPELINE_BYTES,
    PSEUDO_MASK,
    SCORES,
    SEGMENTATION,
    SEGMENTER,
)

METADATA = {  # a pass-through profile's classifier and segmenter, 32 px, 3 classes
    CLASSIFIER: {
        "inputs": [{"name": "IMAGE", "shape": ["-1", "32", "32", "3"]}],
        "outputs": [
            {"name": SCORES, "shape": ["-1", "3"]},
            {"name": "CAMS", "shape": ["-1", "3", "32", "32"]},
        ],
    },
    SEGMENTER: {
        "inputs": [{"name": PSEUDO_MASK, "shape": ["-1", "32", "32"]}],
        "outputs": [{"name": "SEG_PROBS", "shape": ["-1", "2", "32", "32"]}],
    },
}


def _config(model: str, chained: bool) -> dict:
    steps = [CHAINS[model]] if chained else list(ENSEMBLES[CHAINS[model]])
    return {"ensemble_scheduling": {"step": [{"model_name": s} for s in steps]}}


@pytest.mark.parametrize(
    "chained, asked_of_pipeline",
    [
        ({PIPELINE: True, PIPELINE_BYTES: True}, [SEGMENTATION]),
        # an older export, or one ensemble not yet reloaded: the pruning's extras
        ({PIPELINE: False, PIPELINE_BYTES: False}, [SCORES, PSEUDO_MASK, SEGMENTATION]),
        ({PIPELINE: True, PIPELINE_BYTES: False}, [SCORES, PSEUDO_MASK, SEGMENTATION]),
    ],
)
def test_the_client_asks_a_chain_what_was_asked_and_an_older_export_what_it_answers(
    monkeypatch, chained, asked_of_pipeline
):
    monkeypatch.setattr(PipelineClient, "_metadata", lambda self, m, url: METADATA.get(m, {}))
    monkeypatch.setattr(PipelineClient, "_config", lambda self, m, url: _config(m, chained[m]))
    client = PipelineClient("127.0.0.1:1", "grpc")  # nothing is sent: the channel is lazy
    assert (CHAINS[PIPELINE] in client.all_specs) == all(chained.values())
    assert requested_outputs(client.all_specs, PIPELINE, [SEGMENTATION]) == asked_of_pipeline
    client.close()


def test_encoded_input_is_what_infer_encoded_sends(monkeypatch):
    """A client of its own (the benchmarks' async requests) builds the bytes ensemble's
    input from its spec with ``encoded_input``: the same tensor ``infer_encoded`` sends."""
    import tritonclient.grpc as grpc

    monkeypatch.setattr(PipelineClient, "_metadata", lambda self, m, url: METADATA.get(m, {}))
    monkeypatch.setattr(PipelineClient, "_config", lambda self, m, url: _config(m, True))
    client = PipelineClient("127.0.0.1:1", "grpc", PIPELINE_BYTES)
    sent = []

    def infer(model, inputs, outputs):
        sent.append(inputs)
        return types.SimpleNamespace(  # nothing is sent
            as_numpy=lambda name: None, get_response=lambda: {"model_version": "1"}
        )

    monkeypatch.setattr(client.client, "infer", infer)
    blobs = [b"\x89PNG one", b"\xff\xd8 two, longer"]
    client.infer_encoded(blobs)
    (sent,) = sent
    ours = encoded_input(grpc, blobs)
    assert [t._get_tensor() for t in sent] == [ours._get_tensor()]
    assert [t._get_content() for t in sent] == [ours._get_content()]
    assert ours.name() == IMAGE_BYTES and ours.shape() == [2, 1] and ours.datatype() == "BYTES"
    client.close()


def test_an_export_landing_while_the_client_reads_is_read_whole(monkeypatch):
    """The client reads the server in several requests; an export that lands between them
    (here: after the ensemble's metadata named version 1, before its config) must not pair
    version 1 with the next export's name: the client reads again, and names version 2."""
    landed = []

    def metadata(self, model, url):
        if model == PIPELINE_BYTES:
            meta = {"versions": ["1", "2"] if landed else ["1"]}
            landed.append(True)  # the export lands right after the first read
            return meta
        return METADATA.get(model, {})

    def config(self, model, url):
        name = "second" if landed else "first"
        return {**_config(model, True), "parameters": {EXPORT_ID: {"string_value": name}}}

    monkeypatch.setattr(PipelineClient, "_metadata", metadata)
    monkeypatch.setattr(PipelineClient, "_config", config)
    client = PipelineClient("127.0.0.1:1", "grpc", PIPELINE_BYTES)
    assert (client.version, client.export_id) == (2, "second")
    client.close()
