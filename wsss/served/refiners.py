"""The refiners: one batched interface, ``masks = refiner(images, scores, cams, features)``,
over the algorithms of ``classical`` (thresholds, GrabCut, Chan-Vese, ViT attention,
saliency), and the one builder of them from a RefineConfig's fields (``build_classical``).

Each class is registered against its entry of the refiner table (``registry``); training
builds them through ``training.torch_refiners`` (which adds the graphs, the level set and
the dense CRF), the served refiner model from the settings the exporter writes into its
config.pbtxt. Both run this file, so a pseudo-mask is
made one way; like every module of this package it needs numpy and OpenCV only.
"""

from __future__ import annotations

import numpy as np

from .classical import (
    DOUBTS,
    attention_pseudo_mask,
    chan_vese,
    combine,
    grabcut,
    grey,
    otsu_foreground,
    present_classes,
    saliency_pseudo_mask,
    walk_cams,
)
from .errors import InputError
from .registry import RefinerSpec, builder, register


class Refiner:
    """(images, scores, cams, features, maps) -> uint8 masks [B, H, W]; see
    ``training.torch_refiners``. ``features``: the classifier's feature map (the level set reads
    it); ``maps``: the ViT's [B, 224, 224] maps (saliency or attention) where the served
    ensemble's ViT model made them, else the refiner runs its own ViT.

    ``served_as`` says how the repository serves it: ``python`` (this module, copied into the
    refiner's version folder) or ``network`` (an exported graph, its ``module``).
    """

    name = "base"
    needs_features = False
    served_as = "python"

    def __init__(
        self,
        multi_label: bool,
        binary: bool | None = None,
        score_threshold: float = 0.5,
        min_score: float = 0.0,
    ):
        self.multi_label = multi_label
        self.binary = not multi_label if binary is None else binary
        self.score_threshold, self.min_score = score_threshold, min_score

    def present(self, scores: np.ndarray) -> list[int]:
        return present_classes(scores, self.multi_label, self.score_threshold, self.min_score)

    def __call__(self, images, scores, cams, features=None, maps=None) -> np.ndarray:
        raise NotImplementedError


class ClassicalRefiner(Refiner):
    """Per class and image: ``foreground`` of its CAM, then ``combine`` (the strongest CAM
    wins a pixel claimed by several present classes)."""

    def foreground(self, cam: np.ndarray, image: np.ndarray) -> np.ndarray:
        """Boolean HxW foreground of one class from its [0, 1] CAM and the RGB image."""
        raise NotImplementedError

    def __call__(self, images, scores, cams, features=None, maps=None):
        return np.stack(
            [self.refine_one(img, s, c) for img, s, c in zip(images, scores, cams, strict=True)]
        )

    def refine_one(self, image: np.ndarray, scores: np.ndarray, cams: np.ndarray) -> np.ndarray:
        present = {c: self.foreground(cams[c], image) for c in self.present(scores)}
        return combine(present, cams, self.binary)


class FixedThreshold(ClassicalRefiner):
    name = "fixed"

    def __init__(self, multi_label: bool, threshold: float = 0.5, **presence):
        super().__init__(multi_label, **presence)
        if not 0.0 < threshold < 1.0:
            raise InputError(f"threshold must be in (0, 1), not {threshold}")
        self.threshold = threshold

    def foreground(self, cam, image):
        return cam >= self.threshold


class OtsuThreshold(ClassicalRefiner):
    """Otsu's threshold of the CAM histogram, per class and image."""

    name = "otsu"

    def foreground(self, cam, image):
        return otsu_foreground(cam)


class SeededRefiner(ClassicalRefiner):
    """A refinement that starts from a threshold refiner's mask (its ``seed``)."""

    def __init__(self, seed: ClassicalRefiner):
        super().__init__(seed.multi_label, seed.binary, seed.score_threshold, seed.min_score)
        self.seed = seed


# The follow-ups: one class per algorithm, each a step ``step(image, guide, init) -> bool``
# that refines a mask. ``guide`` is what the mask came from (a class's CAM after a threshold,
# the saliency map after saliency), whose confident bands a step may read. ``Followed``
# puts one after a threshold; the saliency refiner calls it on its own mask. Training brings
# a third, the dense CRF (training.crf), which is not served.


class GrabCut:
    """OpenCV GrabCut from the mask, the guide's confident bands fixed (``grabcut``)."""

    def __init__(self, iterations: int = 5, sure_fg: float = 0.8, sure_bg: float = 0.05):
        if iterations < 1:
            raise InputError("grabcut_iterations must be >= 1")
        if not 0.0 <= sure_bg < sure_fg <= 1.0:
            raise InputError("need 0 <= sure_background < sure_foreground <= 1")
        self.iterations, self.sure_fg, self.sure_bg = iterations, sure_fg, sure_bg

    def __call__(self, image, guide, init):
        return grabcut(image, guide, init, self.iterations, self.sure_fg, self.sure_bg)


class ChanVese:
    """Classical iterative Chan-Vese on the grey image, from the mask.

    The baseline of paper 003's efficiency table: exactly ``iterations`` steps, so its cost
    can be compared step for step with the FNO evolution.
    """

    def __init__(self, iterations: int = 15, mu: float = 0.25):
        if iterations < 1:
            raise InputError("chanvese_iterations must be >= 1")
        self.iterations, self.mu = iterations, mu

    def __call__(self, image, guide, init):
        if init.all() or not init.any():  # no contour to evolve
            return init
        return chan_vese(grey(image), init, self.iterations, self.mu)


class Followed(SeededRefiner):
    """A seed's mask refined by a step (``GrabCut``, ``ChanVese``, training's dense CRF),
    guided by the class's CAM."""

    def __init__(self, seed: ClassicalRefiner, step):
        super().__init__(seed)
        self.step = step

    def foreground(self, cam, image):
        init = self.seed.foreground(cam, image)
        if init.all() or not init.any():  # no boundary to move
            return init
        return self.step(image, cam, init)


class AttentionRefiner(Refiner):
    """Paper 000's open question: the foreground of a pretrained ViT's attention, with no CAM.

    ``attention(images) -> [B, 224, 224]`` fused maps (``OnnxAttention``, or a timm ViT in
    ``training.attention``; None where the served ViT model gives them as ``maps``). Binary
    tasks mark the foreground 1; multi-class ones give each of its pixels to the present class
    whose CAM is strongest there.
    """

    def __init__(self, multi_label: bool, attention, sigma=8.0, kernel=15, **presence):
        super().__init__(multi_label, **presence)
        if sigma < 0 or kernel < 0:
            raise InputError("refine.vit_sigma and refine.vit_kernel: >= 0")
        self.attention, self.sigma, self.kernel = attention, sigma, kernel

    def __call__(self, images, scores, cams, features=None, maps=None):
        fused = _vit_maps(self.attention, images, maps, "vit", "the ViT attention")
        return np.stack(
            [
                attention_pseudo_mask(
                    f, s, c, self.present(s), self.binary, self.sigma, self.kernel
                )
                for f, s, c in zip(fused, scores, cams, strict=True)
            ]
        )


class SaliencyRefiner(Refiner):
    """Saliency-guided pseudo-masks (the EPS family of WSSS methods): the extent from a
    class-agnostic saliency model, the class and the doubts from the CAMs
    (``saliency_pseudo_mask``), optionally refined by GrabCut or Chan-Vese from there.

    ``saliency(images) -> [B, 224, 224]`` (``OnnxSaliency``; None where the served ViT
    model gives them as ``maps``). Uses more than image labels:
    an off-the-shelf saliency model, labelled as such in every table.
    """

    name = "saliency"

    def __init__(
        self,
        multi_label: bool,
        saliency,
        doubt: str = "keep",
        cam_threshold: float = 0.5,
        sure_fg: float = 0.8,
        follow=None,
        **presence,
    ):
        super().__init__(multi_label, **presence)
        if doubt not in DOUBTS:
            raise InputError(f"refine.saliency_doubt {doubt!r}: one of {', '.join(DOUBTS)}")
        self.saliency, self.doubt, self.follow = saliency, doubt, follow
        self.cam_threshold, self.sure_fg = cam_threshold, sure_fg

    def __call__(self, images, scores, cams, features=None, maps=None):
        saliency = _vit_maps(self.saliency, images, maps, "saliency", "the saliency model")
        return np.stack(
            [
                saliency_pseudo_mask(
                    img,
                    sal,
                    c,
                    self.present(s),
                    self.binary,
                    self.doubt,
                    self.cam_threshold,
                    self.sure_fg,
                    self.follow,
                )  # fmt: skip
                for img, sal, s, c in zip(images, saliency, scores, cams, strict=True)
            ]
        )


class WalkRefiner(Refiner):
    """``refine.method: walk``: each image's CAMs spread by a random walk over its ViT's
    patch-token affinity (``walk_cams``; AffinityNet's propagation, the affinity untrained),
    then ``inner`` (the fixed cut, and the follow-up the spelling names) on them.

    ``tokens(images) -> [B, N, C]`` patch tokens (``training.walk.ViTTokens``; None where the
    served ViT model gives them as ``maps``). Uses more than image labels: a pretrained ViT.
    """

    name = "walk"

    def __init__(self, inner: ClassicalRefiner, tokens, beta: float = 8.0, steps: int = 8):
        super().__init__(inner.multi_label, inner.binary, inner.score_threshold, inner.min_score)
        if beta <= 0 or steps < 1:
            raise InputError("refine.walk_beta > 0 and refine.walk_steps >= 1")
        self.inner, self.tokens, self.beta, self.steps = inner, tokens, beta, steps

    def walk(self, images, scores, cams, maps=None) -> np.ndarray:
        """[B, K, H, W] CAMs -> the present classes' walked (all the cut reads), at the same
        size."""
        tokens = _vit_maps(self.tokens, images, maps, "walk", "the ViT's patch tokens")
        return np.stack(
            [
                walk_cams(c, t, self.beta, self.steps, self.present(s))
                for c, t, s in zip(cams, tokens, scores, strict=True)
            ]
        )

    def __call__(self, images, scores, cams, features=None, maps=None):
        return self.inner(images, scores, self.walk(images, scores, np.asarray(cams), maps))


def _vit_maps(runner, images, maps, method: str, what: str) -> np.ndarray:
    """The ViT's maps: given (the served ViT model's), or run here."""
    if maps is not None:
        if len(maps) != len(images):
            raise InputError(f"{len(maps)} ViT maps for {len(images)} images")
        return maps
    if runner is None:
        raise InputError(f"refine.method {method} needs {what} or its maps")
    return runner(images)


# The builders of the table's entries this module holds (``wsss.served.registry``): a seed's
# from the settings, the presence settings, the ViT runners and its follow-up step; a
# follow-up's step from the settings.


@register("fixed", "served")
def _fixed(settings, multi_label, presence, runners, step):
    seed = FixedThreshold(multi_label, settings["threshold"], **presence)
    return Followed(seed, step) if step else seed


@register("otsu", "served")
def _otsu(settings, multi_label, presence, runners, step):
    seed = OtsuThreshold(multi_label, **presence)
    return Followed(seed, step) if step else seed


@register("saliency", "served")
def _saliency(settings, multi_label, presence, runners, step):
    return SaliencyRefiner(
        multi_label,
        runners.get("saliency"),
        settings["saliency_doubt"],
        settings["threshold"],
        settings["sure_foreground"],
        step,
        **presence,
    )


@register("vit", "served")
def _attention(settings, multi_label, presence, runners, step):
    return AttentionRefiner(
        multi_label,
        runners.get("attention"),
        settings["vit_sigma"],
        settings["vit_kernel"],
        **presence,
    )


@register("walk", "served")
def _walk(settings, multi_label, presence, runners, step):
    cut = _fixed(settings, multi_label, presence, runners, step)
    return WalkRefiner(cut, runners.get("tokens"), settings["walk_beta"], settings["walk_steps"])


@register("grabcut", "served")
def _grabcut(settings):
    bands = settings["sure_foreground"], settings["sure_background"]
    return GrabCut(settings["grabcut_iterations"], *bands)


@register("chanvese", "served")
def _chanvese(settings):
    return ChanVese(settings["chanvese_iterations"])


def build_classical(
    settings: dict,
    multi_label: bool,
    binary: bool | None = None,
    attention=None,
    saliency=None,
    side: str = "served",
    tokens=None,
) -> Refiner:
    """The threshold, GrabCut, Chan-Vese, attention, saliency or walk refiner that ``settings``
    (the fields of ``wsss.config.RefineConfig``, as a dict) describe, from the builders the
    table holds for its parts: the one builder of them, for training (``side="training"``,
    which adds its own steps such as the dense CRF) and for the served refiner model.
    ``attention``, ``saliency`` and ``tokens`` are the ONNX (or timm) runners the ViT,
    saliency and walk refiners read (none for the served refiner: its ViT is a model of its
    own, whose maps it is given). The refiner's ``name`` is its spelling."""
    spec = RefinerSpec.of(settings)
    build = builder(spec.seed, "served")  # training's seed builders wrap these
    if build is None or spec.entry.part != "seed":
        raise InputError(f"refine.method {spec.seed!r} is not built from numpy alone")
    step = None
    if spec.follow is not None:
        make = builder(spec.follow, side)
        if make is None:
            raise InputError(
                f"refine.{spec.follow} runs in training only (its library is not in the "
                "serving images): serve another refiner with export.refine"
            )
        step = make(settings)
    presence = {
        "binary": binary,
        "score_threshold": settings["score_threshold"],
        "min_score": settings["min_score"],
    }
    runners = {"attention": attention, "saliency": saliency, "tokens": tokens}
    runners = {k: v for k, v in runners.items() if v is not None}
    refiner = build(settings, multi_label, presence, runners, step)
    refiner.name = str(spec)
    return refiner
