"""``wsss infer``: send image files to the ensemble, write mask PNGs and an overlay figure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from serving.client import PipelineClient, load_image, resize
from wsss.figures import overlay, panel_figure
from wsss.palette import VOC_PALETTE
from wsss.tensors import CAMS, PSEUDO_MASK, SCORES, SEGMENTATION


def infer_files(paths: list[Path], url: str, protocol: str, out: Path) -> list[dict]:
    """One request per image; masks come back at the model size and are resized to the original.
    Class names and mask colours are the server's own (its ensemble's config)."""
    client = PipelineClient(url, protocol)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for path in paths:
            original = load_image(path)
            batch = resize(original, client.image_size)[None]
            outputs = client.infer(batch)
            results.append(
                write_outputs(
                    path, original, batch[0], outputs, out, client.class_names, client.palette
                )
            )
    finally:
        client.close()
    return results


def write_outputs(
    path: Path,
    original: np.ndarray,
    sent: np.ndarray,
    outputs: dict,
    out: Path,
    class_names: list[str] | None,
    palette: list[int] | None = None,
) -> dict:
    """Mask PNGs in the data's colours (``palette``, from the server; default VOC's); the top
    class by name, or ``class N`` where the server names none."""
    h, w = original.shape[:2]
    stem = Path(path).stem
    scores = outputs[SCORES][0]
    top = int(scores.argmax())
    label = class_names[top] if class_names and top < len(class_names) else f"class {top}"
    files = {}
    for key in (PSEUDO_MASK, SEGMENTATION):
        mask = resize(outputs[key][0], (h, w), nearest=True)
        png = Image.fromarray(mask, mode="P")
        png.putpalette(palette or VOC_PALETTE)
        files[key] = out / f"{stem}_{key.lower()}.png"
        png.save(files[key])
    cam = outputs[CAMS][0, top]
    files["figure"] = panel_figure(
        [
            {
                "image": sent,
                f"CAM: {label} ({scores[top]:.2f})": cam,
                "pseudo-mask": overlay(sent, outputs[PSEUDO_MASK][0]),
                "segmentation": overlay(sent, outputs[SEGMENTATION][0]),
            }
        ],
        ["image", f"CAM: {label} ({scores[top]:.2f})", "pseudo-mask", "segmentation"],
        out / f"{stem}_overlay.png",
    )
    return {
        "image": str(path),
        "top_class": label,
        "score": float(scores[top]),
        "files": {k: str(v) for k, v in files.items()},
    }
