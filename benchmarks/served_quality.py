"""``wsss study served``: what a running server answers on the test split, scored.

Each test photo's own file goes to the bytes ensemble (``wsss_pipeline_bytes``), as a user's
would; its ``SCORES`` and masks at the photo's resolution (``PSEUDO_MASK_FULL``,
``SEGMENTATION_FULL``) are scored with the one harness's measures (``training.evaluate``)
against the ground truth: top-class accuracy where the server's classes name the image's
labels (a Pet breed's species for an ImageNet head's cat and dog groups), foreground IoU and
Dice pooled over the split's pixels and per image (mIoU for multi-class data). The class
names come from the server, never from a local repository.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tqdm import tqdm

from serving.client import PipelineClient, present_at
from training.data.dataset import WSSSDataset
from training.evaluate import Evaluation, markdown_table, score_masks
from training.metrics import ConfusionMatrix
from training.pipeline import mask_values, missing_labels, translate_labels
from wsss.tensors import (
    PIPELINE_BYTES,
    PSEUDO_MASK_FULL,
    SCORES,
    SEGMENTATION_FULL,
    class_label,
)

OUTPUTS = (SCORES, PSEUDO_MASK_FULL, SEGMENTATION_FULL)


def served_quality(
    data: WSSSDataset, url: str, protocol: str = "grpc", concurrency: int = 4
) -> tuple[Evaluation, dict]:
    """Score the server at ``url`` on ``data`` (its files, sent as they are)."""
    client = PipelineClient(url, protocol, PIPELINE_BYTES)
    names = [class_label(client.class_names, i) for i in range(client.specs.outputs[0].shape[0])]
    binary = data.kind.binary_masks
    raw = [s.labels for s in data.samples]
    labels = translate_labels(raw, data.class_names, names, data.aliases)
    missed = missing_labels(raw, labels)
    presence = None if binary else client.presence  # None: an export from before it
    values = None if binary else mask_values(data.class_names, names)
    n_seg = data.kind.segmentation_classes(data.num_classes)
    result = Evaluation(binary, ConfusionMatrix(n_seg), ConfusionMatrix(n_seg))
    forks = [client.fork() for _ in range(concurrency)]

    def one(i: int) -> dict[str, np.ndarray]:
        blob = data.samples[i].image_path.read_bytes()
        return forks[i % concurrency].infer_encoded([blob], OUTPUTS)

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        answers = pool.map(one, range(len(data)))
        for i, out in enumerate(tqdm(answers, total=len(data), desc="served", unit="img")):
            pseudo, seg = out[PSEUDO_MASK_FULL], out[SEGMENTATION_FULL]
            if values is not None:
                pseudo, seg = values[pseudo], values[seg]
            score_masks(result.pseudo, result.pseudo_image_iou, pseudo, data, i, binary)
            score_masks(result.segmentation, result.seg_image_iou, seg, data, i, binary)
            held = () if labels[i] is None and not binary else labels[i]  # as evaluate()
            if held is not None:
                result.scores.append(out[SCORES][0])
                result.labels.append(held)
                if presence is not None:  # the classes the server takes as present
                    result.predicted.append(tuple(present_at(out[SCORES][0], presence)))
                    result.missed.append(missed[i])
            result.images += 1
    seconds = time.perf_counter() - started
    for c in (client, *forks):
        c.close()
    meta = {
        "url": url,
        "protocol": protocol,
        "class_names": names,
        "images": len(data),
        "labelled_images": len(result.scores),
        "multi_label": not binary,
        "label_f1": presence is not None,
        "images_per_second": len(data) / seconds,
    }
    return result, meta


def scored(meta: dict) -> str:
    """Which photos the classification scores cover."""
    names = ", ".join(meta["class_names"])
    if meta.get("multi_label"):
        f1 = " and label F1 (at the server's own thresholds)" if meta.get("label_f1") else ""
        return (
            f"mAP{f1} on all {meta['images']} (a photo of none of the server's "
            f"classes, {names}, a negative of each)"
        )
    known = meta["labelled_images"]
    return f"accuracy on the {known} whose labels the server's classes ({names}) name"


def report(result: Evaluation, meta: dict, label: str) -> str:
    row = {"served": label} | result.row()
    row.pop("refine_ms", None)
    text = markdown_table([row], ["served"])
    return text + (
        f"\n{meta['images']} photos sent as their files to {PIPELINE_BYTES} at {meta['url']} "
        f"({meta['protocol']}); {scored(meta)}; "
        f"{meta['images_per_second']:.1f} images/s. Masks scored at each photo's resolution; "
        "pseudo-mask = PSEUDO_MASK_FULL, segmenter = SEGMENTATION_FULL.\n"
    )
