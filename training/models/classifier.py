"""A global-average-pooled classifier whose forward pass also returns class activation maps.

For a GAP + linear head the gradient of a class score with respect to the last feature map is
the class weight over the map area, constant in space. So CAM, Grad-CAM and Grad-CAM++ all
have closed forms in the forward pass, and the exported graph needs no autograd. Methods
differ only in how they weigh the K feature channels for each class (see ``training.cams``).
"""

from __future__ import annotations

import torch
from torch import nn

from training.cams import CAM_METHODS


class CAMClassifier(nn.Module):
    def __init__(
        self, features: nn.Module, feature_channels: int, num_classes: int, cam_method: str = "cam"
    ):
        super().__init__()
        if cam_method not in CAM_METHODS:
            raise ValueError(f"unknown CAM method {cam_method!r}: one of {sorted(CAM_METHODS)}")
        self.features = features
        self.fc = nn.Linear(feature_channels, num_classes)
        self.cam_method = cam_method

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.fc(feats.mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def logits_and_cams(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, K] and CAMs [B, K, H, W] at the input size, each map scaled to [0, 1]."""
        feats = self.forward_features(x)
        logits = self.forward_head(feats)
        return logits, CAM_METHODS[self.cam_method](feats, self.fc.weight, x.shape[-2:])
