"""Write a new version of every model into the Triton model repository, atomically.

Each export gets the next version number (one number for all models, so ``classifier/7`` and
``segmenter/7`` came from the same export). Everything is built in a staging folder beside
the repository, parity-checked against PyTorch, and validated as a repository; only then is
each version folder moved in with a rename and each config.pbtxt replaced with a rename. A
polling Triton never sees a half-written version. An export that fails or is killed before
its commit (the renames) leaves the repository exactly as it was; once the commit has begun,
the repository ends with every model new, even if the export is interrupted or killed
(``export.lock.commit_renames``). Exports into one repository take turns (``export.lock``).
``version_policy`` serves the latest ``export.keep_versions``; the commit then removes the
version folders past the newest ``export.keep_on_disk`` that no config serves, new or still
served until the server reloads.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from google.protobuf.text_format import ParseError
from torch import nn

from export.check import check_repository, python_model_problems, served_versions, versions
from export.configs import (
    FORMATS,
    PYTHON_MODELS,
    build_configs,
    data_type,
    io_names,
    labelled,
    model_format,
    parse,
    render,
    warmup_files,
)
from export.lock import commit_renames, locked_staging
from export.onnx_export import check_parity, export_onnx
from export.quantize import (
    map_agreement,
    network_agreement,
    quantize_graph,
    quantize_static_graph,
)
from export.torchscript_export import check_torchscript_parity, export_torchscript
from export.vit import served_vit
from training.pipeline import (
    PassThroughSegmenter,
    SegmenterGraph,
    as_trained,
    load_model,
    refine_step,
    resolved_refine,
    stale_segmenter,
)
from training.torch_refiners import saliency_graph, served_settings, walk_graph
from training.walk import ViTTokens
from wsss import served
from wsss.config import (
    Config,
    load_saved_config,
    save_config,
    served_config,
    with_overrides,
)
from wsss.errors import InputError, WsssError
from wsss.palette import VOC_PALETTE
from wsss.served import HELPERS
from wsss.served.classical import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    VIT_SIZE,
    OnnxAttention,
    OnnxMaps,
    OnnxSaliency,
    random_walk,
    vit_input,
)
from wsss.served.registry import RefinerSpec
from wsss.tensors import (
    CLASS_NAMES,
    CLASSIFIER,
    ENSEMBLES,
    EXPORT_ID,
    IMAGE,
    LABELS_FILE,
    PIPELINE,
    PIPELINE_BYTES,
    POSTPROCESS,
    PREPROCESS,
    PSEUDO_MASK,
    REFINER,
    SALIENCY,
    SEGMENTATION,
    SEGMENTER,
    TOKENS,
    VIT,
    VIT_OUTPUT,
    ModelSpec,
    label_parameters,
    labels_text,
    served_models,
)

_PYTHON_SOURCES = Path(served.__file__).parent


class ExportError(WsssError, RuntimeError):
    """The staged export failed validation; nothing was written to the repository."""


@dataclass
class ExportResult:
    repository: Path
    version: int
    parity: dict[str, dict[str, float]]
    export_id: str = ""  # the name the export gave itself: the ensembles' EXPORT_ID parameter
    # Per quantized model: what was done and, on the photos at hand, how far its masks moved.
    quantized: dict[str, dict] = field(default_factory=dict)

    def summary(self) -> str:
        """What `wsss export` and `make serve`'s first build print: the version, each
        model's parity with what it was exported from, and each int8 model's check."""
        lines = [
            f"exported version {self.version} to {self.repository} (export id {self.export_id})"
        ]
        for model, errors in self.parity.items():
            worst = ", ".join(f"{k} {v:.2g}" for k, v in errors.items())
            against = "the in-process fp32 ViT" if model == VIT else "PyTorch"
            if model != VIT and "model" in self.quantized.get(model, {}):
                against += " (its fp32 graph, before int8: the int8 graph's check is below)"
            lines.append(
                f"  {model}: parity with {against} (max abs error / mismatch fraction): {worst}"
            )
        for model, done in self.quantized.items():
            agreement = (
                f"int8 masks vs fp32: IoU {done['mask_iou']:.4f}, pixels agreeing "
                f"{done['pixel_agreement']:.4f} on {done['photos']}"
                if "mask_iou" in done
                else _network_agreement(done)
            )
            if "int8_truth_iou" in done:
                agreement += (
                    f"; against the truth of {done['truth_photos']}: IoU fp32 "
                    f"{done['fp32_truth_iou']:.4f}, int8 {done['int8_truth_iou']:.4f}"
                )
            lines.append(f"  {model}: quantize {done['quantize']}; {agreement}".rstrip("; "))
        return "\n".join(lines)


def _network_agreement(done: dict) -> str:
    """What ``wsss export`` says of an int8 classifier or segmenter against its fp32 graph
    (``export.repository._quantize_network``)."""
    said = []
    if "top_class_agreement" in done:
        said.append(
            f"top class kept on {done['top_class_agreement']:.1%} of {done['photos']}, scores "
            f"moved by {done['max_abs_score']:.3f} at most"
        )
    if "present_class_agreement" in done:
        said.append(
            f"present classes kept on {done['present_class_agreement']:.1%} (served thresholds)"
        )
    if "top1_fp32" in done:
        said.append(
            f"accuracy fp32 {done['top1_fp32']:.3f}, int8 {done['top1_int8']:.3f} "
            f"({done['labelled_photos']} photos of one class)"
        )
    if "map_fp32" in done:
        said.append(f"mAP fp32 {done['map_fp32']:.3f}, int8 {done['map_int8']:.3f}")
    if "truth_iou_fp32" in done:
        per_image = (
            f" ({done['truth_image_iou_fp32']:.4f} / {done['truth_image_iou_int8']:.4f} per image)"
            if "truth_image_iou_int8" in done
            else ""
        )
        said.append(
            f"against the true masks: {done['truth_scored']} fp32 "
            f"{done['truth_iou_fp32']:.4f}, int8 {done['truth_iou_int8']:.4f}{per_image}"
        )
    for key, value in done.items():
        if key.endswith("_miou"):
            mask = key.removesuffix("_miou").upper()
            said.append(f"{mask} mIoU with fp32's {value:.4f} on {done['photos']}")
    return "; ".join(said)


def export_repository(cfg: Config) -> ExportResult:
    """Export into ``cfg.export.repository``, one export at a time (see ``export.lock``).

    The lock is taken first and held to the last rename: the version number, the versions
    to keep and the staging folder are this export's alone.
    """
    repo = Path(cfg.export.repository)
    if repo.exists() and not repo.is_dir():
        raise InputError(f"export.repository {repo}: a file, not a repository folder")
    repo.resolve().parent.mkdir(parents=True, exist_ok=True)  # the lock and staging's home
    with locked_staging(repo, cfg.export.lock_wait_seconds) as staging:
        made = not repo.exists()  # under the lock: no other export makes or removes it now
        repo.mkdir(exist_ok=True)
        try:
            return _export(cfg, repo, staging)
        except BaseException:
            if made:  # a failed first export leaves no empty repository behind it
                with contextlib.suppress(OSError):
                    repo.rmdir()
            raise


def _export(cfg: Config, repo: Path, staging: Path) -> ExportResult:
    runs = Path(cfg.runs)
    saved, cfg = cfg, served_config(cfg)  # export.refine, when set, is the served refiner
    spec = RefinerSpec.of(cfg.refine)
    if spec.served_as == "training":  # before building it (a ViT, a session)
        part = next(e for e in spec.parts if e.served_as == "training")
        raise ExportError(
            f"refine.method {spec} is not served: {part.name} makes training pseudo-masks "
            f"only ({part.summary}); set export.refine.method, e.g. {spec.seed}"
        )
    side, limit = cfg.data.image_size, cfg.export.max_image_pixels
    if limit < side**2:  # before building anything: no image the models read would decode
        raise InputError(
            f"export.max_image_pixels {limit:,} is below one image at the model's own size "
            f"({side}x{side} = {side**2:,})"
        )
    classifier, refiner, cmeta = refine_step(cfg)
    names = cmeta["class_names"]
    segmenter, smeta = load_model(runs / "segmenter" / "best.pt")
    _warn_other_size(runs, size=cfg.data.image_size)
    multi_label = classifier.multi_label
    size = cfg.data.image_size
    kwargs = cmeta["kwargs"]
    if kwargs.get("head") == "imagenet" and not kwargs.get("class_groups"):
        mb = len(names) * size * size * 4 / 1e6
        raise ExportError(
            f"the ImageNet head without classifier.class_groups has {len(names)} classes: "
            f"CAMS would be {mb:.0f} MB per image; give class_groups to serve it"
        )
    seg_names = smeta.get("class_names")
    if multi_label and seg_names is not None and seg_names != names:
        raise ExportError(
            "PSEUDO_MASK would number the classifier's classes and SEGMENTATION the data's, "
            f"which differ ({', '.join(names)} vs {', '.join(seg_names)}); give "
            "classifier.class_groups one group per data class, in the data's order"
        )
    network_refiner = refiner.served_as == "network"  # an exported graph, not a Python model
    # The ViT a saliency or attention refiner reads: its own model, beside the classifier.
    kind = None if network_refiner else RefinerSpec.of(cfg.refine).entry.vit
    vit_map = VIT_OUTPUT.get(kind)
    passthrough = isinstance(segmenter, PassThroughSegmenter)  # serves PSEUDO_MASK as it is
    _refuse_quantize(cfg, vit_map, passthrough)
    vit = _vit(cfg, refiner, vit_map) if vit_map else None
    features = None
    if refiner.needs_features:
        with torch.no_grad():
            probe = classifier(torch.zeros(1, size, size, 3, dtype=torch.uint8))
        features = tuple(probe[2].shape[1:])
    seg_input = PSEUDO_MASK if passthrough else IMAGE
    specs = served_models(
        size,
        len(names),
        smeta["kwargs"]["num_classes"],
        features,
        seg_input,
        vit_map,
        vit.tokens if vit else None,
    )
    networks: dict[str, nn.Module] = {
        CLASSIFIER: classifier,
        SEGMENTER: segmenter if passthrough else SegmenterGraph(segmenter),
    }
    # The pixels an image may have: decoded (preprocess), and asked for by ORIGINAL_SIZE
    # (postprocess, which a client may call directly).
    limit = {"max_pixels": str(cfg.export.max_image_pixels)}
    params = {PREPROCESS: limit, POSTPROCESS: limit}
    if network_refiner:
        networks[REFINER] = refiner.module
    else:
        # The refiner model rebuilds itself from these (config.pbtxt parameters).
        params[REFINER] = {
            "refine": json.dumps(served_settings(resolved_refine(cfg, cmeta)), sort_keys=True),
            "multi_label": str(multi_label).lower(),
        }
    version = next_version(repo)
    changed = _changed_tensors(repo, specs, cfg.export, network_refiner, names)
    keep = {
        n: servable_versions(
            repo,
            n,
            model_format(n, cfg.export, network_refiner),
            version,
            cfg.export.keep_versions,
            n in changed,
        )
        for n in specs
    }
    palette = smeta.get("palette") or VOC_PALETTE  # older checkpoints: VOC's colours
    refine = resolved_refine(cfg, cmeta)  # the served refiner's thresholds
    presence = {
        "multi_label": multi_label,
        "threshold": refine.score_threshold,
        "min_score": refine.min_score,
    }
    labels = label_parameters(names, palette, presence)  # served: clients read them
    configs = build_configs(specs, cfg.export, params, keep, network_refiner, labels)
    export_id = uuid.uuid4().hex[:16]  # which export answered: clients read it (wsss infer)
    for name in (PIPELINE, PIPELINE_BYTES):
        configs[name].parameters[EXPORT_ID].string_value = export_id
    parity, quantized = {}, {}
    for name, spec in specs.items():
        folder = staging / name
        (folder / str(version)).mkdir(parents=True)
        (folder / "config.pbtxt").write_text(render(configs[name]))
        if labelled(spec):  # Triton's classification extension reads it
            (folder / LABELS_FILE).write_text(labels_text(names))
        samples = warmup_files(spec, cfg.data.image_size, cfg.export.max_image_pixels)
        for sample in samples if name not in ENSEMBLES else []:
            (folder / "warmup").mkdir(exist_ok=True)
            (folder / "warmup" / sample.name).write_bytes(sample.data)
        if name in networks:
            settings = getattr(cfg.export, name)
            parity[name] = _write_network(
                name, networks, spec, settings, folder / str(version), cfg
            )
            if settings.quantize != "none":
                path = folder / str(version) / FORMATS[settings.format][1]
                # what the served refiner reads of the classes: its presence thresholds
                cut = refine.score_threshold if multi_label else None
                done = _quantize_network(name, spec, settings, path, cfg, names, cut)
                quantized |= {name: done} if done else {}
        elif name == VIT:
            (folder / str(version) / FORMATS["onnx"][1]).write_bytes(vit.graph)
            parity[name] = vit.parity
        elif name in PYTHON_MODELS:
            _write_python_model(name, folder / str(version))
    recorded, differs = as_trained(saved, cmeta, smeta)
    stale = stale_segmenter(runs, smeta)  # the checkpoint's meta, read above
    differs += [stale] if stale else []
    for note in differs:
        print(f"export: {note}", file=sys.stderr, flush=True)
    _write_metadata(staging / CLASSIFIER / str(version), recorded, names, palette, parity)
    (staging / CLASSIFIER / str(version) / "export_id.txt").write_text(export_id + "\n")
    quantized |= {VIT: vit.quantized} if vit and vit.quantized else {}
    if quantized:
        path = staging / CLASSIFIER / str(version) / "quantized.json"
        path.write_text(json.dumps(quantized, indent=2))
    report = check_repository(staging, versions_in=repo)
    if not report.ok:
        raise ExportError(f"the staged export is invalid, nothing was changed:\n{report}")
    order = [n for n in specs if n not in ENSEMBLES] + list(ENSEMBLES)
    pruned = unserved_versions(repo, keep, version, cfg.export.keep_on_disk)
    commit(staging, repo, version, order, retire=_retired(repo, specs) + pruned)
    if pruned:
        print(
            f"export: removed {len(pruned)} old version folder(s) no config serves, now or "
            f"until the server reloads (export.keep_on_disk: {cfg.export.keep_on_disk})",
            file=sys.stderr,
            flush=True,
        )
    _warn_changed_tensors(changed)
    return ExportResult(repo, version, parity, export_id, quantized)


# Models an export writes only for some refiners: once no ensemble steps through one, Triton
# would still load it (a polling server keeps every model folder it finds).
OPTIONAL_MODELS = (VIT,)


def _retired(repo: Path, specs: dict[str, ModelSpec]) -> list[str]:
    """The optional models this export leaves out (the ViT, after a refiner that reads none):
    the commit removes them after the ensembles that no longer step through them."""
    return [n for n in OPTIONAL_MODELS if n not in specs and (repo / n).is_dir()]


def unserved_versions(repo: Path, keep: dict[str, list[int]], new: int, on_disk: int) -> list[str]:
    """The version folders (``model/version``) past the newest ``on_disk`` (``new``, the
    version being exported, counted) that neither the new configs serve (``keep``) nor the
    configs on disk now, which a running server serves until its reload of the new ones
    lands: the commit removes them after the configs (``export.keep_on_disk``; 0: none). A
    config that does not parse keeps every version of its model."""
    if on_disk == 0:
        return []
    unserved = []
    for name, kept in keep.items():
        folder = repo / name
        if not (folder / "config.pbtxt").is_file():
            continue
        found = versions(folder)
        now = _served_now(folder, found, unreadable=found)
        newest = sorted({*found, new})[-on_disk:]
        unserved += [f"{name}/{v}" for v in found if v not in {*kept, *now, *newest}]
    return unserved


def _write_python_model(name: str, version_dir: Path) -> None:
    """``wsss/served/<name>.py`` as model.py and the package's helpers beside it: the version
    folder holds all the code it runs (see ``wsss.served``)."""
    shutil.copy(_PYTHON_SOURCES / f"{name}.py", version_dir / "model.py")
    for helper in HELPERS:
        shutil.copy(_PYTHON_SOURCES / helper, version_dir / helper)
    # The python backend stub ignores PYTHONDONTWRITEBYTECODE and would create __pycache__
    # in this folder on load; a polling Triton sees the folder change and reloads the model
    # mid-traffic. A file of that name makes Python skip writing bytecode (silently, even as
    # root).
    (version_dir / "__pycache__").write_bytes(b"")


@dataclass
class ExportedViT:
    """The ViT model's graph, its agreement with the in-process ViT, and what was quantized."""

    graph: bytes
    parity: dict[str, float]
    quantized: dict = field(default_factory=dict)
    tokens: tuple[int, int] | None = None  # TOKENS' (patches, channels)


# The served ViT's foreground (Otsu of its map) against the in-process fp32 ViT's, pooled
# IoU on the photos at hand, below which export refuses it: fp32 differs only by the resize's
# rounding (1e-3 at most on 320 px photos), int8 by its weights (tests/export/test_quantize.py
# holds >= 0.95 on 16 Pet test photos).
MIN_VIT_AGREEMENT = 0.99
MIN_QUANTIZED_AGREEMENT = 0.9
# Training photos the agreement is measured on: export.vit.calibration's, else data.root's.
QUANTIZE_PHOTOS = 16


def _refuse_quantize(cfg: Config, vit_map: str | None, passthrough: bool = False) -> None:
    """Refuse an int8 switch that would quantize nothing, or a graph int8 does not cover."""
    if cfg.export.refiner.quantize != "none":
        raise ExportError(
            "export.refiner.quantize: the level set's network refiner stays fp32 (its "
            "spectral layers are what its masks are made of); the ViT is quantized by "
            "export.vit.quantize, the networks by export.classifier / export.segmenter.quantize"
        )
    for name in (CLASSIFIER, SEGMENTER):
        settings = getattr(cfg.export, name)
        if settings.quantize == "none":
            continue
        if settings.format != "onnx":
            raise ExportError(
                f"export.{name}.quantize {settings.quantize}: int8 graphs are ONNX Runtime's; "
                f"export.{name}.format is {settings.format}"
            )
        if name == SEGMENTER and passthrough:
            raise ExportError(
                "export.segmenter.quantize: the pass-through segmenter has no weights to "
                "quantize (segmenter.arch: passthrough)"
            )
    if cfg.export.vit.quantize != "none" and vit_map is None:
        raise ExportError(
            f"export.vit.quantize: the refiner {RefinerSpec.of(cfg.refine)} reads no ViT "
            "to quantize"
        )


def _vit(cfg: Config, refiner, role: str) -> ExportedViT:
    """The ViT model that gives ``role`` (SALIENCY, ATTENTION or TOKENS): the refiner's ViT with its
    pre- and post-processing in the graph (``export.vit``), int8 where
    ``export.vit.quantize`` asks (CPU instances), checked against the in-process fp32 ViT on
    the configured training photos (random images where there are none)."""
    settings = cfg.export.vit
    if settings.format != "onnx":
        raise ExportError(f"export.vit.format {settings.format}: the ViT is an ONNX graph")
    side, tokens = VIT_SIZE, None
    if role == SALIENCY:
        side = cfg.refine.saliency_size
        fp32 = saliency_graph(cfg.refine)
        reference = OnnxSaliency(fp32, threads=0, size=side)
    elif role == TOKENS:
        side = cfg.refine.walk_side
        fp32 = walk_graph(cfg.refine)
        reference = ViTTokens(fp32, side, threads=0)
        tokens = reference(np.zeros((1, side, side, 3), np.uint8)).shape[1:]
    else:
        fp32 = _vit_model(refiner.attention)
        reference = OnnxAttention(fp32)
    core, quantized = vit_core(cfg, fp32, side)
    graph = served_vit(core, role, cfg.data.image_size, vit_size=side, tokens=tokens)
    served = OnnxMaps(graph, threads=0)
    if role == TOKENS:  # compared where the walk goes: its transition, one map per image
        reference, served = (_transitions(r, cfg.refine) for r in (reference, served))
    # The calibration photos' dataset where one is set (make serve's data is synthetic), not
    # the photos a static graph was calibrated on.
    images, _, source = _check_photos(cfg, QUANTIZE_PHOTOS, settings)
    agreement = map_agreement(reference, served, images)
    least = MIN_QUANTIZED_AGREEMENT if core is not fp32 else MIN_VIT_AGREEMENT
    if agreement["mask_iou"] < least:
        what = "int8 " if core is not fp32 else ""
        # What was compared: the maps' Otsu foregrounds, or those of the walk's transitions.
        masks = (
            "walks (the Otsu foregrounds of its tokens' transitions)" if role == TOKENS else "masks"
        )
        raise ExportError(
            f"export.vit: the served {what}ViT's {masks} agree with the in-process fp32 "
            f"ViT's at IoU {agreement['mask_iou']:.3f} on {source} (< {least}): nothing was "
            "changed" + ("; export it with export.vit.quantize: none" if what else "")
        )
    # For TOKENS, both are of the walk's transitions (the tokens' affinity walked).
    parity = {"max_abs_error": agreement["max_abs_map"], "mask_mismatch": 1 - agreement["mask_iou"]}
    if core is not fp32:
        quantized |= {"model": VIT, "photos": source} | agreement
        if role == SALIENCY:  # what matters: each form's masks against the truth
            quantized |= _truth(cfg, reference, served, settings.calibration or None)
    return ExportedViT(graph, parity, quantized, tokens)


# Test photos an int8 ViT's masks are scored on against their truth, fp32's beside them.
TRUTH_PHOTOS = 32


def _truth(cfg: Config, fp32, int8, root: str | None) -> dict:
    """The fp32 and int8 saliency ViTs' masks (each map's Otsu foreground, as the binary
    saliency refiner makes them) against the true foreground of up to ``TRUTH_PHOTOS`` test
    photos of ``root`` (the calibration's, else the configured data's), pooled IoU with the
    ignored pixels left out: the quality the choice was made for, reported on photos it
    was not made on. Empty where those photos have no masks to score (or none are at hand);
    a multi-class dataset is scored by the profile's own study, not here."""
    import cv2

    from training.data import list_samples
    from training.data.dataset import WSSSDataset
    from wsss.palette import IGNORE
    from wsss.served.classical import otsu_foreground
    from wsss.task import get_task

    if not get_task(cfg.data.task).binary_masks:
        return {}
    root = root or cfg.data.root
    try:
        samples = _spread(list_samples(root, cfg.data.task, "test", cfg.data.layout), TRUTH_PHOTOS)
        data = WSSSDataset(
            root, cfg.data.task, "test", cfg.data.image_size, samples=samples,
            layout=cfg.data.layout,
        )  # fmt: skip
    except (WsssError, OSError):
        return {}
    if not data.has_masks:
        return {}
    size = cfg.data.image_size
    scored = {}
    for form, vit in (("fp32", fp32), ("int8", int8)):
        inter = union = 0
        for image, mask in zip(data.images, data.masks, strict=True):
            saliency = cv2.resize(vit(image[None])[0], (size, size), interpolation=cv2.INTER_LINEAR)
            fg, truth, kept = otsu_foreground(saliency), mask == 1, mask != IGNORE
            inter += int((fg & truth & kept).sum())
            union += int(((fg | truth) & kept).sum())
        scored[f"{form}_truth_iou"] = inter / union if union else 1.0
    photos = f"{len(data.images)} test images of {root} (at {size} px, the model's size)"
    return {"truth_photos": photos, **scored}


def _transitions(tokens, refine) -> Callable[[np.ndarray], np.ndarray]:
    """Images -> each one's random-walk transition [N, N] after refine.walk_steps steps over
    the patch tokens ``tokens`` gives (row n: where position n's CAM value goes): what the
    walk makes of the tokens, to compare two ViTs by."""

    def transition(patches: np.ndarray) -> np.ndarray:
        n = len(patches)
        grid = int(round(np.sqrt(n)))
        eye = np.eye(n, dtype=np.float32).reshape(n, grid, grid)  # one CAM per position
        return random_walk(eye, patches, refine.walk_beta, refine.walk_steps).reshape(n, n)

    def maps(images: np.ndarray) -> np.ndarray:
        return np.stack([transition(patches) for patches in tokens(images)])

    return maps


def fp32_vit(cfg: Config) -> bytes | None:
    """The ViT model ``cfg`` serves (its served refiner's: SALIENCY or TOKENS), as export
    writes it with ``export.vit.quantize: none``: the unoptimised form a benchmark times
    beside the shipped one. None where the served refiner reads no such ViT (an attention
    ViT is never quantized)."""
    cfg = with_overrides(served_config(cfg), ["export.vit.quantize=none"])
    role = VIT_OUTPUT.get(RefinerSpec.of(cfg.refine).entry.vit)
    if role not in (SALIENCY, TOKENS):
        return None
    return _vit(cfg, None, role).graph


def vit_core(cfg: Config, fp32: bytes, side: int) -> tuple[bytes, dict]:
    """The ViT graph ``fp32`` (reading ``side`` px) as ``export.vit.quantize`` asks for it
    on its instances, and what was done (``quantized_core``): its calibration photos go in
    as the ViT reads them."""

    def prepare(image: np.ndarray) -> np.ndarray:
        return vit_input(image, IMAGENET_MEAN, IMAGENET_STD, side)

    return quantized_core(cfg, cfg.export.vit, fp32, prepare)


def quantized_core(
    cfg: Config,
    settings,
    fp32: bytes,
    prepare: Callable[[np.ndarray], np.ndarray] = lambda image: image,
) -> tuple[bytes, dict]:
    """The graph ``fp32`` as ``settings.quantize`` asks for it on ``settings``' instances,
    and what was done: fp32 on KIND_GPU instances (their kernels are fp32's); dynamic int8;
    static int8 calibrated on ``settings.calibration``'s training photos (each one
    ``prepare``d into the graph's input, a uint8 image [1, H, W, 3] as the networks take
    it by default), or dynamic, saying why, where there are none to read."""
    if settings.quantize == "none":
        return fp32, {}
    if settings.kind == "KIND_GPU":
        return fp32, {"quantize": "none: KIND_GPU instances keep fp32"}
    gpu = "served on CPU instances (a GPU server keeps fp32 with quantize: none)"
    dynamic = f"dynamic: int8 weights (ONNX Runtime quantize_dynamic), {gpu}"
    if settings.quantize == "dynamic":
        return quantize_graph(fp32), {"quantize": dynamic}
    root = settings.calibration or cfg.data.root
    images, source = _photos(cfg, settings.calibration_photos, root)
    if images is None:
        said = f"{dynamic}; static asked for, but {source}"
        print(f"export: quantize {said}", file=sys.stderr, flush=True)
        return quantize_graph(fp32), {"quantize": said}
    inputs = [prepare(image[None]) for image in images]
    return quantize_static_graph(fp32, inputs), {
        "quantize": f"static: int8 weights and activations (ONNX Runtime quantize_static, "
        f"per channel, min-max ranges of {source}), {gpu}"
    }


def _spread(items, count: int) -> list:
    """Up to ``count`` of ``items``, evenly spaced from the first."""
    return list(items[:: max(1, len(items) // count)][:count])


def _photos(
    cfg: Config, count: int, root: str | None = None, besides: int = 0
) -> tuple[np.ndarray | None, str]:
    """Up to ``count`` training images of ``root`` (the configured data's), spread over the
    list, and what they are; None and why where there are none to read. ``besides``: leave
    out the photos a call for that many would give (a calibration's, where photos remain)."""
    data, source = _photo_data(cfg, count, root, besides)
    return (None if data is None else data.images), source


def _check_photos(cfg: Config, count: int, settings) -> tuple[np.ndarray, object, str]:
    """The photos an int8 (or served) graph is checked on: up to ``count`` training photos
    of ``settings.calibration`` (else the configured data's) besides those a static graph
    was calibrated on, their dataset and what they are; where there are none, 4 random
    images, no dataset, and why."""
    calibrated = settings.calibration_photos if settings.quantize == "static" else 0
    data, source = _photo_data(cfg, count, settings.calibration or None, calibrated)
    if data is not None:
        return data.images, data, source
    size = cfg.data.image_size
    images = np.random.default_rng(0).integers(0, 256, (4, size, size, 3), dtype=np.uint8)
    return images, None, f"4 random images ({source})"


def _photo_data(cfg: Config, count: int, root: str | None = None, besides: int = 0):
    """``_photos``' dataset (its labels too), or None, and what it is or why there is none."""
    from training.data import list_samples
    from training.data.dataset import WSSSDataset

    root = root or cfg.data.root
    try:
        samples = list_samples(root, cfg.data.task, "train", cfg.data.layout)
        if besides:
            taken = set(_spread(range(len(samples)), besides))
            samples = [s for k, s in enumerate(samples) if k not in taken] or samples
        samples = _spread(samples, count)
        data = WSSSDataset(
            root,
            cfg.data.task,
            "train",
            cfg.data.image_size,
            samples=samples,
            layout=cfg.data.layout,
        )
    except (WsssError, OSError) as exc:
        return None, f"no photos at hand ({exc})"
    return data, f"{len(data.images)} training images of {root}"


def _vit_model(vit) -> bytes:
    """The ViT the served refiner runs: its ONNX with the chosen layers' attention as
    outputs. A timm checkpoint works in training but is not served (no torch in Triton)."""
    from training.attention import onnx_with_attention

    if vit.path.suffix != ".onnx":
        raise ExportError(
            f"refine.vit_weights {vit.path} is a timm checkpoint: the served refiner runs "
            "ONNX Runtime only; serve the bundled ONNX ViT or export yours to ONNX"
        )
    return onnx_with_attention(vit.path, vit.layers)


def _write_network(
    name: str, networks: dict[str, nn.Module], spec, settings, version_dir: Path, cfg: Config
) -> dict:
    size = cfg.data.image_size
    rng = np.random.default_rng(0)
    # Parity on another batch size than the one traced: proves the batch axis is free.
    trace, probe = (
        _sample(name, networks, rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8))
        for n in (2, 3)
    )
    module = networks[name]
    path = version_dir / FORMATS[settings.format][1]
    if settings.format == "onnx":
        export_onnx(module, spec, trace, path, cfg.export.opset)
        return check_parity(module, path, spec, probe, cfg.export.atol)
    export_torchscript(module, trace, path)
    return check_torchscript_parity(module, path, spec, probe, cfg.export.atol)


# Training photos an int8 network is checked on, besides its calibration's, and how much
# accuracy (top-1 of single-class photos, mAP) or mask quality against the true masks it
# may lose there against fp32: a guard against int8 gone wrong, not the choice of int8,
# which is the profile's (the serving issue's rule, on by default where it loses no more
# than 0.005 on the training photos, is made with the losses export prints).
QUANTIZE_CHECK_PHOTOS = 64
MAX_QUANTIZED_LOSS = 0.05
# What that loss is measured in (``network_agreement``, ``_mask_quality``).
QUALITY = {"top1": "accuracy", "map": "mAP", "truth_iou": "masks' (m)IoU against the truth"}


def _quantize_network(
    name: str,
    spec: ModelSpec,
    settings,
    path: Path,
    cfg: Config,
    class_names: list[str],
    presence: float | list[float] | None = None,
) -> dict:
    """The network's ONNX file at ``path`` (fp32, parity-checked) made int8 where
    ``settings.quantize`` asks (``quantized_core``), then checked against fp32 on training
    photos besides the calibration's (``network_agreement``: the classes it gives, at the
    served ``presence`` thresholds where several may be present, its CAMs' masks and its
    masks, with each form's accuracy where the photos' labels name its classes); refused
    where they part, else written over the fp32 file. What was done, or nothing."""
    from training.stages import data_labels

    fp32 = path.read_bytes()
    graph, done = quantized_core(cfg, settings, fp32)
    if graph is fp32:
        return done
    images, data, source = _check_photos(cfg, QUANTIZE_CHECK_PHOTOS, settings)
    labels = None
    if data is None:
        print(
            f"export.{name}.quantize: checked on {source} only: give "
            f"export.{name}.calibration a folder of training photos to check it on",
            file=sys.stderr,
            flush=True,
        )
    else:
        try:
            labels = data_labels(data, class_names)
        except InputError:  # photos of other classes: agreement only
            labels = None
    outputs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    try:
        agreement = network_agreement(
            spec, fp32, graph, images, labels, presence, cfg.refine.threshold, outputs
        )
    except Exception as e:  # ONNX Runtime's quantizer can write a graph that does not run
        why = str(e).strip().splitlines()[0][:300]
        raise ExportError(
            f"export.{name}.quantize {settings.quantize}: the int8 graph does not run ({why}): "
            f"nothing was changed; try the other quantization or export.{name}.quantize: none"
        ) from None
    # What the served masks are made of: the CAMs' masks, except where a saliency map gives
    # the extent (the CAMs then only name the class: make serve's static int8 classifier
    # moved its CAMs' masks to 0.70 mIoU on Pet training photos, its served masks by 0.002).
    extent_from_cams = RefinerSpec.of(cfg.refine).entry.vit != "saliency"
    kept = [
        (v, k)
        for k, v in agreement.items()
        if k.endswith(("class_agreement", "_miou")) and (k != "cams_miou" or extent_from_cams)
    ]
    if not kept:
        raise ExportError(f"export.{name}.quantize: {name} gives nothing int8 can be checked by")
    worst = min(kept)
    if worst[0] < MIN_QUANTIZED_AGREEMENT:
        raise ExportError(
            f"export.{name}: the int8 graph's {worst[1]} with fp32's is {worst[0]:.3f} on "
            f"{source} (< {MIN_QUANTIZED_AGREEMENT}): nothing was changed; export it with "
            f"export.{name}.quantize: none"
        )
    if data is not None and SEGMENTATION in outputs:
        fp32_masks, int8_masks = outputs[SEGMENTATION]
        agreement |= _mask_quality({"fp32": fp32_masks, "int8": int8_masks}, data, class_names)
    for metric, what in QUALITY.items():
        lost = agreement.get(f"{metric}_fp32", 0.0) - agreement.get(f"{metric}_int8", 0.0)
        if lost > MAX_QUANTIZED_LOSS:
            raise ExportError(
                f"export.{name}: the int8 graph's {what} is {lost:.3f} below fp32's on "
                f"{source} (> {MAX_QUANTIZED_LOSS}): nothing was changed; export it with "
                f"export.{name}.quantize: none"
            )
    path.write_bytes(graph)
    return done | {"model": name, "photos": source} | agreement


def _mask_quality(masks: dict[str, np.ndarray], data, class_names: list[str]) -> dict:
    """Each form's SEGMENTATION of ``data``'s photos (``masks``: [N, H, W] by form, as
    ``network_agreement`` ran them) against their true masks, scored as
    ``wsss evaluate`` scores a segmenter (at each photo's own resolution; foreground IoU for
    binary tasks, mIoU over the classes present otherwise): ``truth_iou_<form>``, and for
    binary tasks the mean over photos, ``truth_image_iou_<form>``; ``truth_scored`` says
    which. What matters beside the agreement with fp32: agreeing at 0.97 mIoU, the real Pet
    profile's int8 DeepLabV3 lost 0.006 IoU on its training photos and 0.020 on the test
    photos. Nothing where the photos have no masks, or none a form could be scored on
    (no foreground in truth or prediction: no IoU)."""
    from training.evaluate import Evaluation, score_masks
    from training.metrics import ConfusionMatrix
    from training.pipeline import mask_values

    if not data.has_masks:
        return {}
    binary = data.kind.binary_masks
    values = None if binary else mask_values(data.class_names, class_names)
    n_seg = data.kind.segmentation_classes(data.num_classes)
    out = {}
    for form, predicted in masks.items():
        if values is not None:
            predicted = values[predicted]
        scored = Evaluation(binary, segmentation=ConfusionMatrix(n_seg))
        score_masks(scored.segmentation, scored.seg_image_iou, predicted, data, 0, binary)
        summary = scored.segmentation.summary(binary)
        value = summary["iou" if binary else "miou"]
        if not np.isfinite(value):
            return {}
        out[f"truth_iou_{form}"] = value
        if binary and scored.seg_image_iou:
            out[f"truth_image_iou_{form}"] = float(np.mean(scored.seg_image_iou))
    return out | {"truth_scored": "foreground IoU" if binary else "mIoU"}


def _sample(name: str, networks: dict[str, nn.Module], images: np.ndarray) -> tuple:
    """Inputs for tracing and parity: images, for the refiner what the classifier gives, and
    for a pass-through segmenter masks of every class and 255 (ignored: passed through too)."""
    x = torch.from_numpy(images)
    module = networks[name]
    if isinstance(module, PassThroughSegmenter):
        masks = images[..., 0] % (module.num_classes + 1)
        return (
            torch.from_numpy(np.where(masks == module.num_classes, 255, masks).astype(np.uint8)),
        )
    if name != REFINER:
        return (x,)
    with torch.no_grad():  # not inference mode: these tensors get traced
        outputs = networks[CLASSIFIER](x)  # scores, cams (and features for the level set)
    return (x, *outputs)


# Beside the classifier of each export: the config it was exported with (as trained).
METADATA_CONFIG = "wsss_config.yaml"


def _write_metadata(
    folder: Path, cfg: Config, class_names: list[str], palette: list[int], parity: dict
) -> None:
    """Beside the classifier: the config, its class names (mask value n is the n-th) and
    the masks' palette (256 RGB triples, the data's own colours), and the parity check."""
    save_config(cfg, folder / METADATA_CONFIG)
    (folder / "class_names.json").write_text(json.dumps(class_names))
    (folder / "palette.json").write_text(json.dumps(palette))
    (folder / "parity.json").write_text(json.dumps(parity, indent=2))


def servable_versions(
    repo: Path, name: str, fmt: str, new: int, keep: int, tensors_change: bool = False
) -> list[int]:
    """The newest ``keep`` versions of ``name`` (``new`` included) holding its model file.

    A Python model's older version is kept only if it holds its helpers too: versions from
    before the served code was copied beside model.py import the installed project, which
    may no longer have what they call. Where the model's tensors change
    (``_changed_tensors``; the refiner that now reads the ViT model's map), no older
    version is kept: Triton serves every version under the one new config; nor, after
    such a change, a version from before it that the config on disk no longer serves.
    """
    if keep < 1:
        raise InputError("export.keep_versions must be >= 1")
    folder = repo / name
    found = versions(folder) if folder.is_dir() else []
    if tensors_change:
        return [new]
    if fmt == "ensemble":  # nothing to load; Triton serves its latest version
        return (found + [new])[-1:]
    filename = FORMATS[fmt][1]
    usable = [v for v in _served_now(folder, found) if (folder / str(v) / filename).exists()]
    if fmt == "python":
        usable = [v for v in usable if self_contained(folder / str(v))]
    return (usable + [new])[-keep:]


def _served_now(folder: Path, found: list[int], unreadable: Sequence[int] = ()) -> list[int]:
    """The versions the config on disk serves (those of the tensors and classes it names);
    with no config there, every version ``found``; with one that does not read,
    ``unreadable`` (none to serve again; every one to keep on disk)."""
    path = folder / "config.pbtxt"
    if not path.is_file():
        return found
    try:
        return served_versions(parse(path.read_text()), folder)
    except (ParseError, OSError, UnicodeDecodeError):
        return list(unreadable)


def _changed_tensors(
    repo: Path,
    specs: dict[str, ModelSpec],
    settings,
    network_refiner: bool,
    class_names: Sequence[str] | None = None,
) -> list[str]:
    """The served models whose tensors this export changes (another refiner kind, another
    format, another dtype) or whose classes it names otherwise (another profile's classes,
    as many): a polling server reloads each and the ensembles stepping through it one after
    the other, so requests in flight in between may be refused (INVALID_ARGUMENT); and the
    new config, which Triton serves every version under, would misname an older one."""
    return [
        n
        for n, spec in specs.items()
        if n not in ENSEMBLES
        and (repo / n / "config.pbtxt").is_file()
        and not _same_tensors(
            repo / n, spec, model_format(n, settings, network_refiner), class_names
        )
    ]


def _warn_other_size(runs: Path, size: int) -> None:
    """Say so where a network was trained at another image size than the one exported (a
    `--set data.image_size=...` at export): it exports and passes its parity checks, which
    compare graph with PyTorch at the new size, but serves at a size it never saw."""
    for stage in ("classifier", "segmenter"):
        saved = runs / stage / "config.yaml"
        if not saved.is_file():
            continue
        try:
            trained = load_saved_config(saved).data.image_size
        except Exception:  # a config of an older layout: nothing to compare
            continue
        if trained != size:
            print(
                f"wsss export: {runs / stage} was trained at {trained} px and is exported at "
                f"{size} px (data.image_size): its masks at that size are not what training "
                "measured; export with the size it was trained at unless that is meant",
                file=sys.stderr,
                flush=True,
            )


def _warn_changed_tensors(changed: list[str]) -> None:
    """Say so, once the export is committed, where it changed a served model's tensors."""
    if changed:
        print(
            f"wsss export: the tensors or classes of {', '.join(changed)} change (their "
            "older versions are no longer served): a running server reloads them and the "
            "ensembles apart, and may refuse requests in flight in between (INVALID_ARGUMENT, "
            "or another export's scores under the old version, for the seconds the swap "
            "takes: 3 s for the quick profile; `wsss infer` sends them again); a re-export "
            "that keeps the tensors and classes (a retrained model) swaps without failing a "
            "request",
            file=sys.stderr,
            flush=True,
        )


def _same_tensors(
    folder: Path, spec: ModelSpec, fmt: str, class_names: Sequence[str] | None = None
) -> bool:
    """Whether the config on disk in ``folder`` (if any) has ``spec``'s tensors (names,
    shapes, dtypes) and, where it names its classes, ``class_names``."""
    path = folder / "config.pbtxt"
    if not path.is_file():
        return True
    try:
        old = parse(path.read_text())
    except (ParseError, UnicodeDecodeError):  # replaced, as a config of other tensors
        return False
    names = io_names(spec, fmt)
    on_disk = sorted((t.name, tuple(t.dims), t.data_type) for t in [*old.input, *old.output])
    wanted = sorted((names[t.name], t.shape, data_type(t)) for t in spec.inputs + spec.outputs)
    if on_disk != wanted:
        return False
    named = old.parameters.get(CLASS_NAMES)
    return (
        named is None or class_names is None or json.loads(named.string_value) == list(class_names)
    )


def self_contained(version_dir: Path) -> bool:
    """A Python model's version folder loads on its own, importing nothing of the project
    (``python_model_problems``)."""
    problems, imports = python_model_problems(version_dir)
    return not problems and not imports


def next_version(repo: Path) -> int:
    found = [v for m in repo.iterdir() if m.is_dir() for v in versions(m)]
    return max(found, default=0) + 1


def commit(
    staging: Path, repo: Path, version: int, order: list[str], retire: Sequence[str] = ()
) -> None:
    """Move the staged models in, as ``commit_plan`` says, by rename. Once begun, it ends
    with every model new (``export.lock.commit_renames``: interrupted, it finishes first;
    killed, the next export finishes it)."""
    commit_renames(staging, repo, version, commit_plan(staging, version, order, retire))


def commit_plan(
    staging: Path, version: int, order: list[str], retire: Sequence[str] = ()
) -> list[tuple[str, str]]:
    """The commit's steps (``export.lock.COMMIT_STEPS``): per model of ``order``, its version
    folder, warm-up data, labels and config; then the ``retire`` models and version folders
    (``model/version``: ``unserved_versions``) removed.

    Models before ensembles, version folders before configs: at every instant each config
    on disk refers only to complete versions.
    """
    steps = []
    for name in order:
        steps.append(("move", f"{name}/{version}"))
        if (staging / name / "warmup").exists():
            steps.append(("files", f"{name}/warmup"))
        if (staging / name / LABELS_FILE).exists():  # before the config that names it
            steps.append(("move", f"{name}/{LABELS_FILE}"))
        steps.append(("move", f"{name}/config.pbtxt"))
    return steps + [("retire", name) for name in retire]


def exported_runs(repository: Path) -> str | None:
    """The ``runs`` folder the repository's newest export was trained in (the config written
    beside its classifier), or None where it names none."""
    folder = repository / CLASSIFIER
    found = versions(folder) if folder.is_dir() else []
    saved = folder / str(found[-1]) / METADATA_CONFIG if found else None
    if saved is None or not saved.is_file():
        return None
    try:
        runs = yaml.safe_load(saved.read_text()).get("runs")
    except (yaml.YAMLError, OSError, AttributeError):
        return None
    return runs if isinstance(runs, str) else None


def build_if_missing(cfg: Config) -> None:
    """What `make serve` does on a fresh clone: data, training and export, if missing. A
    repository that already holds another profile's export is served as it is, and said so:
    building over it would replace what may be served."""
    from training import stages
    from training.data.synth import SynthOptions, ensure_synth

    repository = Path(cfg.export.repository)
    if (repository / PIPELINE / "config.pbtxt").exists():
        runs = exported_runs(repository)
        if runs is not None and Path(runs).resolve() != Path(cfg.runs).resolve():
            print(
                f"wsss: {repository} holds an export of {runs}, not of this config's runs "
                f"({cfg.runs}): serving it as it is. `wsss export` with this config adds "
                "this profile as its next version; export.repository gives it a repository "
                "of its own",
                file=sys.stderr,
                flush=True,
            )
        return
    rewritten = ensure_synth(cfg.data.root, SynthOptions.of(cfg.data))
    if rewritten or not (Path(cfg.runs) / "segmenter" / "best.pt").exists():
        stages.run(cfg)
    print(export_repository(cfg).summary(), flush=True)
