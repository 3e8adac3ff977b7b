"""Training on a device other than the CPU: the run's checkpoints load on a machine without
one (weights only, onto the CPU), and the networks the export would serve answer there as
they answer on the device. The CUDA case carries the `gpu` marker and skips where torch sees
no GPU (this project's CI). The CPU case runs the same steps everywhere, so the test's own
code is exercised where no GPU is lent; there it checks only that the run loads and answers
with the served shapes (its comparison is of the CPU with itself)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import TINY
from training import stages
from training.data.dataset import WSSSDataset
from training.data.synth import SynthOptions, write_synth
from training.pipeline import SegmenterGraph, load_model, refine_step
from wsss.config import load_config

pytestmark = pytest.mark.slow  # trains a (tiny) classifier and segmenter

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU torch can use"),
        ],
    ),
]


@pytest.mark.parametrize("device", DEVICES)
def test_a_run_trained_on_a_device_loads_on_the_cpu_and_answers_as_there(tmp_path, device):
    root = write_synth(tmp_path / "data", SynthOptions("pets", 40, 64, seed=0))
    cfg = load_config(
        None, [*TINY, f"data.root={root}", f"runs={tmp_path / 'runs'}", f"train.device={device}"]
    )
    stages.run(cfg, ("classifier", "pseudo", "segmenter"))
    classifier, _, _ = refine_step(cfg)  # what export loads: onto the CPU
    segmenter, _ = load_model(tmp_path / "runs" / "segmenter" / "best.pt")
    segmenter = SegmenterGraph(segmenter).eval()
    assert {p.device.type for n in (classifier, segmenter) for p in n.parameters()} == {"cpu"}
    images = torch.from_numpy(WSSSDataset(root, "pets", "test", 64).images[:8])
    with torch.no_grad():
        on_cpu = [*classifier(images), *segmenter(images)]
        classifier.to(device), segmenter.to(device)
        there = [*classifier(images.to(device)), *segmenter(images.to(device))]
    assert [t.device.type for t in there] == [device] * len(on_cpu)
    scores, cams, probs, mask = on_cpu
    assert scores.shape == (8, 10) and cams.shape == (8, 10, 64, 64)  # the 10 breeds
    assert probs.shape == (8, 2, 64, 64)  # pet or background
    for a, b in zip(on_cpu[:3], there[:3], strict=True):
        torch.testing.assert_close(b.cpu(), a, atol=1e-3, rtol=1e-3)
    # The masks: the same class at all but the pixels where two probabilities tie within it.
    agree = (there[3].cpu() == mask).float().mean().item()
    assert agree >= 0.999, agree
