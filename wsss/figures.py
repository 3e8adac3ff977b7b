"""Figures a person would rather look at than read: CAM heatmaps, masks, overlays."""

from __future__ import annotations

from pathlib import Path

import cv2
import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from wsss.palette import IGNORE, VOC_PALETTE  # noqa: E402

_PALETTE = np.array(VOC_PALETTE, np.uint8).reshape(256, 3)


def colourise(mask: np.ndarray) -> np.ndarray:
    """Class index map -> RGB with the VOC palette (255 = ignore shows as cream)."""
    return _PALETTE[mask]


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The image with each class region tinted in its palette colour and outlined in white
    (VOC's dark colours alone vanish on dark photos)."""
    colour = colourise(mask).astype(np.float32)
    keep = ((mask > 0) & (mask != IGNORE))[..., None]
    out = np.where(keep, (1 - alpha) * image + alpha * colour, image).astype(np.uint8)
    for value in np.unique(mask[(mask > 0) & (mask != IGNORE)]):
        region = (mask == value).astype(np.uint8)
        contours, _ = cv2.findContours(region, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, contours, -1, (255, 255, 255), 1)
    return out


def panel_figure(
    rows: list[dict[str, np.ndarray]],
    titles: list[str],
    path: Path,
    row_labels: list[str] | None = None,
) -> Path:
    """A grid: one row per image, one column per entry (RGB arrays or [0, 1] heatmaps)."""
    n, m = len(rows), len(titles)
    fig, axes = plt.subplots(n, m, figsize=(2.2 * m, 2.2 * n), squeeze=False)
    for r, row in enumerate(rows):
        for c, title in enumerate(titles):
            ax = axes[r][c]
            value = row[title]
            if value.ndim == 2:
                ax.imshow(value, cmap="jet", vmin=0, vmax=1)
            else:
                ax.imshow(value)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=9)
            if c == 0 and row_labels:
                ax.set_ylabel(row_labels[r], fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
