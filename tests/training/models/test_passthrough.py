"""segmenter.arch passthrough: no segmenter trained, the refined mask served as SEGMENTATION."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from export.configs import build_configs, parse
from export.onnx_export import check_parity, export_onnx
from export.torchscript_export import check_torchscript_parity, export_torchscript
from tests.conftest import random_export_cfg
from training.pipeline import InProcessPassThrough, PassThroughSegmenter, Pipeline
from wsss.config import PASSTHROUGH, load_config, with_overrides
from wsss.tensors import (
    CHAINS,
    ENSEMBLES,
    IMAGE,
    PIPELINE,
    PIPELINE_BYTES,
    POSTPROCESS,
    PSEUDO_MASK,
    SEG_PROBS,
    SEGMENTATION,
    SEGMENTER,
    served_models,
)


def _masks(batch: int, classes: int, size: int = 16) -> torch.Tensor:
    """Every class value and 255 (ignored), at random."""
    values = torch.tensor([*range(classes), 255], dtype=torch.uint8)
    return values[torch.randint(0, classes + 1, (batch, size, size))]


@pytest.mark.parametrize("classes", [2, 4])
def test_segmentation_is_the_mask_and_probs_its_one_hot(classes):
    masks = _masks(3, classes)
    probs, seg = PassThroughSegmenter(classes)(masks)
    assert probs.dtype == torch.float32 and probs.shape == (3, classes, 16, 16)
    assert seg.dtype == torch.uint8 and torch.equal(seg, masks)
    labelled = masks != 255
    assert torch.equal(probs.argmax(1)[labelled], masks[labelled].long())
    assert torch.equal(probs.sum(1), labelled.float())  # one-hot; 255 gets no class at all


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_exports_with_parity_and_a_free_batch_axis(fmt, tmp_path):
    module = PassThroughSegmenter(3).eval()
    spec = served_models(16, 2, 3, segmenter_input=PSEUDO_MASK)[SEGMENTER]
    trace, probe = (_masks(2, 3),), (_masks(5, 3),)
    if fmt == "onnx":
        path = export_onnx(module, spec, trace, tmp_path / "model.onnx")
        errors = check_parity(module, path, spec, probe, atol=0.0)
    else:
        path = export_torchscript(module, trace, tmp_path / "model.pt")
        errors = check_torchscript_parity(module, path, spec, probe, atol=0.0)
    assert errors == {SEG_PROBS: 0.0, SEGMENTATION: 0.0}


def test_the_segmenter_spec_reads_the_pseudo_mask_and_the_ensembles_keep_their_tensors():
    plain, passed = served_models(32, 3, 2), served_models(32, 3, 2, segmenter_input=PSEUDO_MASK)
    assert plain == served_models(32, 3, 2, segmenter_input=IMAGE)
    assert [t.name for t in passed[SEGMENTER].inputs] == [PSEUDO_MASK]
    assert passed[SEGMENTER].inputs[0] == plain[PIPELINE].outputs[2]  # the refiner's tensor
    assert passed[SEGMENTER].outputs == plain[SEGMENTER].outputs
    assert all(passed[n] == plain[n] for n in passed if n != SEGMENTER)
    with pytest.raises(ValueError, match="reads IMAGE or PSEUDO_MASK"):
        served_models(32, 3, 2, segmenter_input=SEGMENTATION)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_both_ensembles_map_the_pseudo_mask_into_the_segmenter(fmt):
    export = load_config(None, [f"export.segmenter.format={fmt}"]).export
    specs = served_models(32, 3, 2, segmenter_input=PSEUDO_MASK)
    versions = {name: [1] for name in specs}
    params = {"refiner": {"refine": "{}", "multi_label": "false"}}
    configs = build_configs(specs, export, params, versions)
    name = {"onnx": PSEUDO_MASK, "torchscript": f"{PSEUDO_MASK}__0"}[fmt]
    assert [i.name for i in configs[SEGMENTER].input] == [name]
    for ensemble in ENSEMBLES:
        config = parse(str(configs[ensemble]))  # still Triton's schema
        assert [o.name for o in config.output] == [t.name for t in specs[ensemble].outputs]
        steps = {s.model_name: s for s in config.ensemble_scheduling.step}
        if ensemble == CHAINS[PIPELINE]:  # the pixels' ensemble steps through this chain
            assert dict(steps[SEGMENTER].input_map) == {name: PSEUDO_MASK}
        elif ensemble == CHAINS[PIPELINE_BYTES]:  # no segmenter step: postprocess reads both
            assert SEGMENTER not in steps
            assert steps[POSTPROCESS].input_map[SEGMENTATION] == PSEUDO_MASK


@pytest.fixture
def passthrough_cfg(tmp_path, pets_root):
    """Random classifier, the fixed threshold, and the pass-through written by `wsss train`."""
    from training import stages

    cfg = random_export_cfg(tmp_path, f"data.root={pets_root}", "refine.method=fixed")
    cfg = with_overrides(cfg, [f"segmenter.arch={PASSTHROUGH}"])
    stages.run(cfg, ("pseudo", "segmenter", "supervised"))
    return cfg


def test_train_writes_the_pass_through_and_skips_what_would_train_it(passthrough_cfg, capsys):
    from training.pipeline import load_model

    runs = Path(passthrough_cfg.runs)
    module, meta = load_model(runs / "segmenter" / "best.pt")
    assert isinstance(module, PassThroughSegmenter) and module.num_classes == 2  # pets
    assert meta["arch"] == PASSTHROUGH and meta["palette"] and meta["class_names"]
    assert not (runs / "pseudo").exists() and not (runs / "supervised").exists()
    from training import stages

    stages.run(passthrough_cfg, ("pseudo", "supervised"))
    assert "pseudo, supervised: skipped" in capsys.readouterr().out
    assert not (runs / "pseudo").exists() and not (runs / "supervised").exists()


def test_nothing_to_train_decodes_no_photo(passthrough_cfg, monkeypatch, capsys):
    """A pass-through segmenter and nothing else to train (make serve's first run): the
    photos are not decoded, and no "train data: N images, K classes" line names classes the
    served model does not answer."""
    from training import stages
    from training.data.layouts import read_class_names
    from training.pipeline import load_model

    def no_photos(cfg):
        raise AssertionError("the training photos were decoded")

    monkeypatch.setattr(stages, "load_train_set", no_photos)
    runs = Path(passthrough_cfg.runs)
    (runs / "segmenter" / "best.pt").unlink()
    stages.run(passthrough_cfg, ("pseudo", "segmenter", "supervised"))
    _, meta = load_model(runs / "segmenter" / "best.pt")
    data = passthrough_cfg.data
    assert meta["class_names"] == read_class_names(data.root, data.task, data.layout)
    assert "train data:" not in capsys.readouterr().out


def test_make_serves_first_run_trains_nothing_and_decodes_no_photo(
    pets_root, tmp_path, monkeypatch
):
    """configs/serve.yaml's stages as `make serve` runs them on a fresh clone: the ImageNet
    head and the pass-through are written, and not one training photo is decoded."""
    from training import stages
    from training.pipeline import load_model

    monkeypatch.setattr(stages, "load_train_set", lambda cfg: pytest.fail("photos decoded"))
    cfg = load_config("configs/serve.yaml", [f"data.root={pets_root}", f"runs={tmp_path}"])
    stages.run(cfg)
    _, cmeta = load_model(tmp_path / "classifier" / "best.pt")
    _, smeta = load_model(tmp_path / "segmenter" / "best.pt")
    assert cmeta["class_names"] == ["cat", "dog"] and smeta["arch"] == PASSTHROUGH


def test_the_pipeline_serves_the_refined_mask_as_the_segmentation(passthrough_cfg):
    from training.pipeline import pipeline_from_config

    pipe = pipeline_from_config(passthrough_cfg)
    assert isinstance(pipe.segmenter, InProcessPassThrough)
    images = np.random.default_rng(0).integers(0, 256, (3, 48, 48, 3), dtype=np.uint8)
    out = pipe(images)
    np.testing.assert_array_equal(out[SEGMENTATION], out[PSEUDO_MASK])
    assert out[SEG_PROBS].shape == (3, 2, 48, 48) and out[SEG_PROBS].dtype == np.float32
    np.testing.assert_array_equal(out[SEG_PROBS].argmax(1), out[SEGMENTATION])
    # Scored alone (as `wsss evaluate` scores a segmenter), it makes the served mask itself.
    probs, seg = Pipeline(None, pipe.segmenter, None).segment(images)
    np.testing.assert_array_equal(seg, out[SEGMENTATION])
    np.testing.assert_array_equal(probs, out[SEG_PROBS])


def test_the_pass_through_makes_the_mask_of_the_served_refiner(passthrough_cfg):
    """A profile whose training refiner is not served (export.refine names the served one,
    as configs/coco_voc.yaml serves the fixed seed of its fixed + CRF): scored in process,
    the pass-through segmentation is the served refiner's mask, not the training one's."""
    from training.pipeline import pipeline_from_config

    cfg = with_overrides(passthrough_cfg, ["refine.threshold=0.9", "export.refine.method=fixed"])
    cfg = with_overrides(cfg, ["export.refine.threshold=0.1"])
    pipe = pipeline_from_config(cfg)
    images = np.random.default_rng(1).integers(0, 256, (4, 48, 48, 3), dtype=np.uint8)
    outputs = pipe.classify(images)
    training = pipe.refine(images, outputs)
    served = pipeline_from_config(with_overrides(cfg, ["refine.threshold=0.1"]))
    want = served.refine(images, served.classify(images))
    _, seg = Pipeline(None, pipe.segmenter, None).segment(images)
    np.testing.assert_array_equal(seg, want)
    assert (seg != training).mean() > 0.1  # 0.9 and 0.1 cut different masks
    # One classifier for both refiners: the whole pipeline runs it once a batch.
    assert pipe.segmenter.source.classifier is pipe.classifier
    calls = []
    pipe.classifier.register_forward_hook(lambda *_: calls.append(1))
    out = pipe(images)  # the whole pipeline: its pseudo-mask is training's, as before
    np.testing.assert_array_equal(out[PSEUDO_MASK], training)
    np.testing.assert_array_equal(out[SEGMENTATION], want)
    assert len(calls) == 1


def test_evaluate_runs_the_shared_classifier_once_a_batch(passthrough_cfg):
    """As `wsss evaluate` scores a profile that serves another refiner: the pseudo-mask row
    and the pass-through's row share one classifier, run once a batch, and the served row
    is the served refiner's mask of the predictions."""
    from training.evaluate import evaluate, load_test_set
    from training.pipeline import pipeline_from_config

    cfg = with_overrides(passthrough_cfg, ["export.refine.method=otsu"])
    pipe = pipeline_from_config(cfg)
    assert pipe.segmenter.source.classifier is pipe.classifier
    calls = []
    pipe.classifier.register_forward_hook(lambda *_: calls.append(1))
    pipes = {"pseudo": Pipeline(pipe.classifier, None, pipe.refiner)}
    pipes["served"] = Pipeline(None, pipe.segmenter, None)
    data = load_test_set(cfg, say=False)
    results = evaluate(pipes, data, batch_size=4)
    assert len(calls) == -(-len(data) // 4)
    alone = evaluate({"served": Pipeline(None, pipe.segmenter, None)}, data, batch_size=4)
    assert results["served"].row() == alone["served"].row()  # the same masks, run apart


def test_export_serves_the_pass_through_graph(passthrough_cfg):
    import onnx

    from export.check import check_repository
    from export.repository import export_repository

    result = export_repository(passthrough_cfg)
    repo = Path(passthrough_cfg.export.repository)
    assert result.parity[SEGMENTER] == {SEG_PROBS: 0.0, SEGMENTATION: 0.0}
    graph = onnx.load(str(repo / SEGMENTER / str(result.version) / "model.onnx")).graph
    assert [i.name for i in graph.input] == [PSEUDO_MASK]
    assert len(graph.initializer) + len(graph.node) < 20  # a tiny graph, no network
    report = check_repository(repo)
    assert report.ok, str(report)
    # make bench's in-process twin of the bytes chain reads what its served config reads: the
    # refined mask in the skipped segmenter's place, the same masks as stepping through it.
    import numpy as np

    from benchmarks.serving import OrtPipeline

    pipe = OrtPipeline(passthrough_cfg, 1)
    assert pipe.bytes_reads == PSEUDO_MASK
    size = passthrough_cfg.data.image_size
    images = np.random.default_rng(0).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    skipped, stepped = pipe(images, bytes_chain=True), pipe(images)
    assert all(np.array_equal(a, b) for a, b in zip(skipped, stepped, strict=True))


def test_evaluate_scores_it_as_the_served_segmentation(passthrough_cfg):
    from experiments.studies import evaluate_profile

    table = evaluate_profile(passthrough_cfg)
    (row,) = [r for r in table.splitlines() if r.startswith("| segmenter (passthrough")]
    assert "from predictions" in row and any(c.strip() for c in row.split("|")[2:])
