"""DeepLabV3: torchvision's ASPP head (``DeepLabHead``) on a backbone of the classifier registry.

The backbones are the classifiers' own feature extractors (the registry builds the
classifier and hands it over: ``training.models.registry.deeplabv3``), so
weight loading, input normalisation and output stride are written once: ResNet50 as in
paper 000 (ImageNet weights from the torch cache, or ``weights``), and the backbones whose
ImageNet weights ship offline (MobileNetV2, EfficientNet-Lite0), so that the comparison with
UNet is meaningful on a machine without the ResNet file. The logits are upsampled back to
the input size, so any input size works.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.segmentation.deeplabv3 import DeepLabHead

from training.models.classifier import CAMClassifier
from wsss.errors import InputError

# DeepLabV3's atrous rates for its output strides (Chen et al. 2017, section 4.1).
ATROUS_RATES = {8: (12, 24, 36), 16: (6, 12, 18), 32: (3, 6, 9)}


class DeepLabV3(nn.Module):
    """``net``'s normalisation and feature extractor (built at ``output_stride``), the ASPP
    head on top."""

    def __init__(self, num_classes: int, net: CAMClassifier, output_stride: int = 16):
        super().__init__()
        if output_stride not in ATROUS_RATES:
            raise InputError(f"output_stride must be one of {sorted(ATROUS_RATES)}")
        self.normalize, self.backbone = net.normalize, net.features
        self.head = DeepLabHead(net.fc.in_features, num_classes, ATROUS_RATES[output_stride])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.backbone(self.normalize(x)))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
