"""The registry builds channels-last networks, and the layout changes no value."""

import torch

from benchmarks.memory_format import layouts, measure, report
from training.models import build_classifier, build_segmenter


def test_registry_networks_are_channels_last_and_compute_what_nchw_does():
    for net in (
        build_classifier("mobilenet_v2", num_classes=3),
        build_segmenter("unet", num_classes=2),
    ):
        convs = [p for p in net.parameters() if p.dim() == 4]
        assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    nets = layouts("classifier", {"arch": "mobilenet_v2", "num_classes": 3})
    assert next(nets["NCHW"].parameters()).is_contiguous()
    networks = [("tiny UNet", "segmenter", {"arch": "unet", "base_channels": 4, "depth": 2}, 32, 2)]
    (row,) = measure(rounds=1, networks=networks)
    assert row["max_abs_diff"] < 1e-4
    assert all(row[k] > 0 for k in ("train_NCHW", "train_channels-last", "infer_NCHW"))
    assert "| tiny UNet | 32 px, 2 |" in report([row], 1, "python -m benchmarks.memory_format")
