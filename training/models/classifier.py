"""A global-average-pooled classifier whose forward pass also returns class activation maps.

For a GAP + linear head the gradient of a class score with respect to the last feature map is
the class weight over the map area, constant in space. So CAM, Grad-CAM and Grad-CAM++ all
have closed forms in the forward pass, and the exported graph needs no autograd. Methods
differ only in how they weigh the feature channels for each class (see ``training.cams``).

Two kinds of head:

- a task head, ``num_classes`` outputs trained on the task's image-level labels;
- the pretrained ImageNet head (``head="imagenet"``), kept as it is: pseudo-masks on real
  photos with no training at all. Its classes are the 1000 ImageNet categories, or, with
  ``class_groups``, the task's classes, each a group of ImageNet ids (cat: 281-285). A
  group's logit is logsumexp of its members' logits, its score the softmax mass of its
  members, and its CAM the one of its logit: member weight rows mixed by their softmax
  within the group. All of it is tensor arithmetic, so it exports and serves like any head.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from training.cams import CAM_METHODS
from training.models.common import IMAGENET_MEAN, IMAGENET_STD, Normalize
from wsss.errors import InputError

# Far below any logit, yet finite: exp() gives exact zeros and ONNX needs no infinities.
_MASKED = -1e4


class CAMClassifier(nn.Module):
    def __init__(
        self,
        features: nn.Module,
        feature_channels: int,
        num_classes: int,
        cam_method: str = "cam",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        fc: nn.Linear | None = None,
        class_groups: Sequence[Sequence[int]] | None = None,
    ):
        super().__init__()
        if cam_method not in CAM_METHODS:
            raise InputError(f"unknown CAM method {cam_method!r}: one of {sorted(CAM_METHODS)}")
        self.normalize = Normalize(mean, std)
        self.features = features
        self.fc = fc if fc is not None else nn.Linear(feature_channels, num_classes)
        self.cam_method = cam_method
        # The side of the four corner tiles presence also reads, as a fraction of the
        # image's (0: the image alone): ``presence``. Set by ``build_classifier``.
        self.tiles = 0.0
        self.grouped = bool(class_groups)
        self.learned = None  # the head of the groups with no ImageNet ids
        if self.grouped:
            outputs = self.fc.out_features
            member = torch.zeros(len(class_groups), outputs, dtype=torch.bool)
            for g, ids in enumerate(class_groups):
                if ids and (min(ids) < 0 or max(ids) >= outputs):
                    raise InputError(f"class group {g} needs ids in 0..{outputs - 1}, got {ids}")
                member[g, list(ids)] = True
            # 0 on a group's members, _MASKED elsewhere: added to logits, it keeps the group.
            mask = torch.where(member, 0.0, _MASKED)
            self.register_buffer("group_mask", mask, persistent=False)
            learned = [g for g, ids in enumerate(class_groups) if not ids]
            if len(learned) == len(class_groups):
                raise InputError("class groups: at least one needs ImageNet ids")
            if learned:
                self.learned = nn.Linear(feature_channels, len(learned))
                # [L, K]: learned head output l -> its class; [K]: which classes are learned.
                place = torch.zeros(len(learned), len(class_groups))
                place[range(len(learned)), learned] = 1.0
                self.register_buffer("learned_place", place, persistent=False)
                self.register_buffer("is_learned", place.sum(0).bool(), persistent=False)

    @property
    def frozen(self) -> bool:
        """A head with learned classes trains only them: the backbone and the ImageNet
        head keep their pretrained weights (and the backbone's batch-norm statistics)."""
        return self.learned is not None

    def freeze(self) -> CAMClassifier:
        """Stop gradients to the backbone and the ImageNet head (``frozen``)."""
        for module in (self.features, self.fc):
            module.requires_grad_(False)
        return self

    def train(self, mode: bool = True) -> CAMClassifier:
        super().train(mode)
        if self.frozen:  # frozen batch norm: its running statistics stay ImageNet's
            self.features.eval()
        return self

    @property
    def num_classes(self) -> int:
        return self.group_mask.shape[0] if self.grouped else self.fc.out_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels [B, 3, H, W] -> the last feature map [B, C, h, w]."""
        return self.features(self.normalize(x))

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        """The head's own logits [B, outputs] (the task's classes, or 1000 ImageNet ones,
        then the learned classes' logits)."""
        pooled = feats.mean(dim=(2, 3))
        if self.learned is None:
            return self.fc(pooled)
        return torch.cat([self.fc(pooled), self.learned(pooled)], dim=1)

    def _split(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The ImageNet logits [B, 1000] and the learned classes' [B, L] (None: none)."""
        if self.learned is None:
            return logits, None
        n = self.fc.out_features
        return logits[:, :n], logits[:, n:]

    def _place(self, grouped: torch.Tensor, learned: torch.Tensor | None) -> torch.Tensor:
        """[B, K, ...]: the learned classes' values where they belong, the groups' elsewhere."""
        if learned is None:
            return grouped
        if learned.dim() == 2:  # [B, L] -> [B, K]
            placed = learned @ self.learned_place
        else:  # [B, L, C] -> [B, K, C]
            placed = torch.matmul(self.learned_place.T, learned)
        keep = self.is_learned.view(1, -1, *([1] * (grouped.dim() - 2)))
        return torch.where(keep, placed, grouped)

    def class_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """[B, K]: the head's logits, or each group's logsumexp over its members (a learned
        class: its own head's logit)."""
        if not self.grouped:
            return logits
        imagenet, learned = self._split(logits)
        grouped = torch.logsumexp(imagenet[:, None, :] + self.group_mask, dim=-1)
        return self._place(grouped, learned)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.class_logits(self.forward_head(self.forward_features(x)))

    def class_scores(self, logits: torch.Tensor, multi_label: bool) -> torch.Tensor:
        """[B, K] probabilities: sigmoid (multi-label) or softmax; a group's softmax mass."""
        if self.grouped:
            imagenet, learned = self._split(logits)
            mass = torch.softmax(imagenet, dim=1) @ (self.group_mask == 0).float().T
            return self._place(mass, None if learned is None else torch.sigmoid(learned))
        return torch.sigmoid(logits) if multi_label else torch.softmax(logits, dim=1)

    def presence(self, x: torch.Tensor, logits: torch.Tensor, multi_label: bool) -> torch.Tensor:
        """[B, K] the scores that say which classes the [0, 1] pixels ``x`` hold.

        ``class_scores`` of the image's ``logits``; with ``tiles``, each ImageNet class's
        score is the mean of the image's and of its best corner tile's (the four corners,
        ``tiles`` of the side each, enlarged to the image's size: a small object fills more
        of a tile, at the scale ImageNet's photos show it). A learned class keeps the
        image's: its head learned from whole images.
        """
        scores = self.class_scores(logits, multi_label)
        if not self.tiles:
            return scores
        b, _, h, w = x.shape
        th, tw = max(1, int(h * self.tiles)), max(1, int(w * self.tiles))
        corners = [x[..., :th, :tw], x[..., :th, w - tw :], x[..., h - th :, :tw]]
        corners.append(x[..., h - th :, w - tw :])
        tiles = F.interpolate(torch.cat(corners), size=(h, w), mode="bilinear", align_corners=False)
        tile_logits = self.forward_head(self.forward_features(tiles))
        best = self.class_scores(tile_logits, multi_label).view(4, b, scores.shape[1]).amax(0)
        mixed = (scores + best) / 2
        return mixed if self.learned is None else torch.where(self.is_learned, scores, mixed)

    def class_weights(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image, the weights [B, K, C] and bias [B, K] of each class's logit as a linear
        function of the pooled features: its gradient, as the CAM methods read it."""
        weight, bias = self.fc.weight, self.fc.bias
        if not self.grouped:
            b = logits.shape[0]
            return weight.expand(b, -1, -1), bias.expand(b, -1)
        imagenet, learned = self._split(logits)
        within = torch.softmax(imagenet[:, None, :] + self.group_mask, dim=-1)  # [B, K, 1000]
        weights, biases = within @ weight, within @ bias
        if learned is None:
            return weights, biases
        b = logits.shape[0]
        own = self.learned.weight.expand(b, -1, -1)  # [B, L, C]
        return self._place(weights, own), self._place(biases, self.learned.bias.expand(b, -1))

    def cams(
        self,
        feats: torch.Tensor,
        logits: torch.Tensor,
        size: Sequence[int],
        method: str | None = None,
    ) -> torch.Tensor:
        """[B, K, *size] class activation maps, each scaled to [0, 1]."""
        weights, _ = self.class_weights(logits)
        return CAM_METHODS[method or self.cam_method](feats, weights, tuple(size))

    def pixel_logits(self, feats: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """[B, K, h, w]: each class's logit per feature position, the CAM before its ReLU."""
        weights, bias = self.class_weights(logits)
        return torch.einsum("bkc,bchw->bkhw", weights, feats) + bias[:, :, None, None]

    def logits_and_cams(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class logits [B, K] and CAMs [B, K, H, W] at the input size."""
        feats = self.forward_features(x)
        logits = self.forward_head(feats)
        return self.class_logits(logits), self.cams(feats, logits, x.shape[-2:])
