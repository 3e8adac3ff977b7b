"""Training the level-set refiner from a trained classifier (paper 003, eqs 5-27).

``LevelSetModel`` is what the one training loop (``training.loop.fit``) optimises: the
classifier (frozen by default, or fine-tuned jointly as in the paper) and the level-set head.
``LevelSetLoss`` is eq 27: lambda1 * MSE(Phi^0, SDF of the CAM masks) + lambda2 * the Chan-Vese
energy of Phi^T on the CAM-weighted image and backbone features, plus the classification
loss when the backbone is fine-tuned (so it stays a classifier).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import distance_transform_edt
from torch import nn

from training.levelset.energy import (
    edge_stop,
    rgb_to_lab,
    seed_region_energy,
    signed_distance,
    weighted_chan_vese_energy,
)
from training.levelset.model import LevelSetHead
from training.loop import load_checkpoint
from training.models import build_classifier
from training.models.classifier import CAMClassifier
from training.models.common import Normalize
from wsss.config import LevelSetConfig
from wsss.errors import InputError
from wsss.palette import IGNORE


@dataclass
class LevelSetOutput:
    x: torch.Tensor  # the normalised image [B, 3, H, W]
    features: torch.Tensor  # backbone features [B, C, h, w]
    logits: torch.Tensor  # image-level logits [B, K]
    pixel_logits: torch.Tensor  # sum_k w_k F_k + b per pixel: the CAM before its ReLU [B, K, h, w]
    phi0: torch.Tensor  # initial level sets [B, K, H, W]
    phi: torch.Tensor  # evolved level sets [B, K, H, W]
    pixels: torch.Tensor | None = None  # the image in [0, 1] [B, 3, H, W]


class LevelSetModel(nn.Module):
    def __init__(
        self,
        classifier: CAMClassifier,
        head: LevelSetHead,
        finetune: bool = False,
        cam_method: str | None = None,
    ):
        super().__init__()
        self.classifier, self.head, self.finetune = classifier, head, finetune
        # The CAMs the head learns from: those the served classifier will give it.
        self.cam_method = cam_method or classifier.cam_method
        self.classifier.requires_grad_(finetune)
        self.normalize = Normalize()  # the level set's image convention: ImageNet statistics

    def train(self, mode: bool = True) -> LevelSetModel:
        super().train(mode)
        if not self.finetune:  # a frozen backbone keeps its batch-norm statistics too
            self.classifier.eval()
        return self

    def forward(self, pixels: torch.Tensor) -> LevelSetOutput:
        """[0, 1] pixels -> everything eq 27 reads."""
        net = self.classifier
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.finetune):
            features = net.forward_features(pixels)
        raw = net.forward_head(features)
        cams = net.cams(features, raw, pixels.shape[-2:], self.cam_method)
        x = self.normalize(pixels)
        phi0, phi = self.head(features, x, cams)
        return LevelSetOutput(
            x, features, net.class_logits(raw), net.pixel_logits(features, raw), phi0, phi, pixels
        )


def sdf_targets(masks: np.ndarray, num_classes: int, clip: float) -> np.ndarray:
    """float32 [B, K, H, W]: the SDF of each class's region of class-index masks (c + 1).

    Classes absent from a mask get +1 everywhere: entirely outside. Pixels in doubt (255)
    take the label of the nearest pixel that has one, so the distances around them are
    their region's (counted as outside, a doubt inside an object thinned it); the loss
    leaves them out.
    """
    out = np.ones((len(masks), num_classes) + masks.shape[1:], np.float32)
    for b, mask in enumerate(masks):
        doubt = mask == IGNORE
        if doubt.any() and not doubt.all():
            _, (rows, cols) = distance_transform_edt(doubt, return_indices=True)
            mask = mask[rows, cols]
        for value in np.unique(mask):
            if 1 <= value <= num_classes:
                out[b, value - 1] = signed_distance(mask == value, clip)
    return out


class LevelSetLoss:
    """Eq 27, on targets (seed masks [B, H, W] with class + 1 per pixel, image labels)."""

    def __init__(self, cfg: LevelSetConfig, num_classes: int, multi_label: bool, image_size: int):
        if cfg.lambda_mse < 0 or cfg.lambda_energy < 0 or cfg.lambda_mse + cfg.lambda_energy == 0:
            raise InputError("levelset.lambda_mse and lambda_energy: >= 0, not both 0")
        for name in ("feature_energy", "edge", "seed_energy"):
            if getattr(cfg, name) < 0:
                raise InputError(f"levelset.{name}: a weight >= 0")
        if cfg.colour not in ("rgb", "lab"):
            raise InputError(f"levelset.colour: rgb or lab, not {cfg.colour!r}")
        self.cfg, self.k, self.multi_label = cfg, num_classes, multi_label
        self.clip = cfg.sdf_clip * image_size
        self.last: dict[str, float] = {}

    def present(self, labels: torch.Tensor) -> torch.Tensor:
        if self.multi_label:
            return labels > 0.5
        return F.one_hot(labels, self.k).bool()

    def energy(
        self, out: LevelSetOutput, present: torch.Tensor, seeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Eq 24 per image and class, averaged over the classes each image holds.

        Absent classes have nothing to segment and the mask reading ignores them, so no
        term trains their level sets (neither this one nor the MSE's).
        The photo terms beside the paper's (each off at its default): the image term in
        Lab (``colour``), an edge-stopping length term (``edge``), and a region term
        towards the seed masks (``seed_energy``).
        """
        cfg = self.cfg
        weight = (1 - cfg.alpha) + cfg.alpha * torch.sigmoid(out.pixel_logits)
        full = F.interpolate(weight, size=out.phi.shape[-2:], mode="bilinear", align_corners=False)
        image = out.x
        if cfg.colour == "lab":
            image = rgb_to_lab(out.pixels)
        edges = edge_stop(image, cfg.edge) if cfg.edge else None
        e = weighted_chan_vese_energy(out.phi, image, full, cfg.gamma, cfg.eps, edges)
        if cfg.seed_energy and seeds is not None:
            e = e + cfg.seed_energy * seed_region_energy(out.phi, seeds.to(out.phi.device), cfg.eps)
        if cfg.feature_energy:
            # Unit-length feature vectors keep the feature term on the image term's scale.
            feats = F.normalize(out.features, dim=1)
            phi = F.adaptive_avg_pool2d(out.phi, feats.shape[-2:])
            e = e + cfg.feature_energy * weighted_chan_vese_energy(
                phi, feats, weight, cfg.gamma, cfg.eps
            )
        p = present.float()
        return (e * p).sum() / p.sum().clamp_min(1)

    def __call__(self, out: LevelSetOutput, targets) -> torch.Tensor:
        seeds, labels = targets
        cfg, loss = self.cfg, out.phi.new_zeros(())
        terms = {}
        present = self.present(labels)
        if cfg.lambda_mse:
            # Eq 25 over the classes each image holds: absent classes' level sets are never
            # read, and their all-outside targets would outnumber the real ones K to 1.
            sdf = torch.from_numpy(sdf_targets(seeds.cpu().numpy(), self.k, self.clip))
            # Over the pixels the seed decides: one in doubt (255, saliency_doubt: ignore,
            # or a photo with no mask at all) teaches nothing, as the seed term has it.
            known = (seeds != IGNORE).to(out.phi0.device, out.phi0.dtype)[:, None]
            err = ((out.phi0 - sdf.to(out.phi0.device)) ** 2 * known).sum((-2, -1))
            decided = known.sum((-2, -1))  # [B, 1]: a photo all in doubt has no error to count
            err = err / decided.clamp_min(1)
            p = present.float() * (decided > 0)
            terms["mse"] = (err * p).sum() / p.sum().clamp_min(1)
            loss = loss + cfg.lambda_mse * terms["mse"]
        if cfg.lambda_energy:
            terms["energy"] = self.energy(out, present, seeds)
            loss = loss + cfg.lambda_energy * terms["energy"]
        if cfg.finetune:
            cls = (
                F.binary_cross_entropy_with_logits(out.logits, labels)
                if self.multi_label
                else F.cross_entropy(out.logits, labels)
            )
            terms["classification"] = cls
            loss = loss + cfg.classification_weight * cls
        self.last = {k: float(v.detach()) for k, v in terms.items()}
        return loss


def head_kwargs(cfg: LevelSetConfig, feature_channels: int, num_classes: int, size: int) -> dict:
    return {
        "feature_channels": feature_channels,
        "num_classes": num_classes,
        "image_size": size,
        "hidden": cfg.hidden,
        "modes": cfg.modes,
        "layers": cfg.layers,
        # With no energy nothing trains the evolution (eq 27): masks come from Phi^0.
        "evolve": cfg.lambda_energy > 0,
        "cam_prior": cfg.cam_prior,
    }


def load_levelset(path: str | Path) -> tuple[CAMClassifier, LevelSetHead, dict]:
    """Classifier and head from a level-set checkpoint (weights only).

    The checkpoint holds the classifier too: with ``finetune`` it differs from the one the
    stage started from, and the served pipeline must use the backbone the head was trained on.
    """
    ckpt = load_checkpoint(path)
    meta = ckpt["meta"]
    cmeta = meta["classifier"]
    classifier = build_classifier(cmeta["arch"], **cmeta["kwargs"])
    model = LevelSetModel(classifier, LevelSetHead(**meta["kwargs"]), meta["finetune"])
    model.load_state_dict(ckpt["state_dict"])
    return model.classifier.eval(), model.head.eval(), meta
