"""Figures a person would rather look at than read: CAM heatmaps, masks, overlays."""

from __future__ import annotations

from pathlib import Path

import cv2
import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from wsss.palette import IGNORE, VOC_PALETTE  # noqa: E402
from wsss.tensors import class_label  # noqa: E402

_PALETTE = np.array(VOC_PALETTE, np.uint8).reshape(256, 3)


def _palette(palette: list[int] | None) -> np.ndarray:
    """[256, 3] colours: a flat PNG palette (a served model's), or VOC's."""
    if not palette:
        return _PALETTE
    flat = np.zeros(768, np.uint8)
    flat[: len(palette)] = palette[:768]
    return flat.reshape(256, 3)


def colourise(mask: np.ndarray, palette: list[int] | None = None) -> np.ndarray:
    """Class index map -> RGB with the palette (VOC's by default; 255 = ignore shows as
    cream in VOC's)."""
    return _palette(palette)[mask]


def legend_entries(
    masks: list[np.ndarray],
    class_names: list[str],
    palette: list[int] | None = None,
    truth: list[np.ndarray] | None = None,
) -> list[tuple[str, tuple[float, float, float]]]:
    """(name, RGB in [0, 1]) of each class value the masks hold (0 background, c + 1 the
    class ``class_names[c]``), in class order: what a legend of the overlays says. With
    ``truth`` (masks drawn in their palette colours, not tinted over the photo), also the
    background and the ignored pixels (255) where they hold them."""
    colours = _palette(palette)
    values = sorted({int(v) for m in masks for v in np.unique(m)} - {0, IGNORE})
    entries = [(class_label(class_names, v - 1), colours[v]) for v in values]
    held = {int(v) for m in truth or [] for v in np.unique(m)}
    if 0 in held:
        entries.insert(0, ("background", colours[0]))
    if IGNORE in held:
        entries.append(("ignored (255)", colours[IGNORE]))
    return [(name, tuple(float(c) / 255 for c in rgb)) for name, rgb in entries]


def overlay(
    image: np.ndarray, mask: np.ndarray, alpha: float = 0.5, palette: list[int] | None = None
) -> np.ndarray:
    """The image with each class region tinted in its palette colour and outlined in white
    (VOC's dark colours alone vanish on dark photos)."""
    colour = colourise(mask, palette).astype(np.float32)
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
    legend: list[tuple[str, tuple[float, float, float]]] | None = None,
    panel_inches: float = 2.2,
) -> Path:
    """A grid: one row per image, one column per entry (RGB arrays or [0, 1] heatmaps);
    ``legend``: (class name, colour) pairs drawn below it (``legend_entries``); each panel
    ``panel_inches`` on a side, at 110 dpi (2.2: 242 px)."""
    n, m = len(rows), len(titles)
    side = panel_inches
    fig, axes = plt.subplots(n, m, figsize=(side * m, side * n), squeeze=False)
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
    if legend:
        from matplotlib.patches import Patch

        handles = [Patch(facecolor=c, edgecolor="black", label=n) for n, c in legend]
        lines = (len(handles) + 5) // 6
        fig.subplots_adjust(bottom=(0.15 + 0.2 * lines) / fig.get_figheight())
        fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
