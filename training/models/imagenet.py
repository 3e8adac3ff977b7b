"""ImageNet-1k class names and class groups: a task's classes as sets of ImageNet ids.

The names ship inside torchvision (offline). Groups are written in configs as lists of ids
and ``"first-last"`` ranges, e.g. ``dog: ["151-268"]``. The tables below are the documented
groups for Oxford-IIIT Pet's two species and for the PASCAL VOC classes that ImageNet-1k
covers; ``person`` is the one VOC class it does not (it has no person category).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache

from wsss.errors import InputError

IMAGENET_CLASSES = 1000

PETS_GROUPS: dict[str, list[int | str]] = {
    "cat": ["281-285"],  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    "dog": ["151-268"],  # Chihuahua ... Mexican hairless: every dog breed
}

VOC_GROUPS: dict[str, list[int | str]] = {
    "aeroplane": [404, 895],  # airliner, warplane
    "bicycle": [444, 671],  # bicycle-built-for-two, mountain bike
    "bird": ["7-24", "80-100", "127-146"],  # cock ... great grey owl, grouse ... swan, stork ...
    "boat": [472, 484, 510, 554, 576, 625, 628, 724, 780, 814, 833, 871, 914],
    "bottle": [440, 720, 737, 898, 907],  # beer, pill, pop, water, wine bottle
    "bus": [654, 779, 874],  # minibus, school bus, trolleybus
    "car": [436, 468, 511, 609, 627, 656, 661, 717, 751, 817],
    "cat": ["281-285"],
    "chair": [423, 559, 765, 857],  # barber, folding, rocking chair, throne
    "cow": [345, 346, 347],  # ox, water buffalo, bison
    "diningtable": [532],
    "dog": ["151-268"],
    "horse": [339],  # sorrel
    "motorbike": [665, 670],  # moped, motor scooter
    "pottedplant": [738],  # pot
    "sheep": [348, 349],  # ram, bighorn
    "sofa": [831],  # studio couch
    "train": [466, 547, 565, 705, 820, 829],
    "tvmonitor": [664, 782, 851],  # monitor, screen, television
}


@lru_cache(maxsize=1)
def imagenet_class_names() -> tuple[str, ...]:
    """The 1000 ImageNet-1k category names in id order, from torchvision (offline)."""
    import torchvision

    return tuple(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def expand_ids(spec: Sequence[int | str], where: str = "class group") -> list[int]:
    """``[281, "151-268"]`` -> sorted unique ids, each checked to be an ImageNet-1k id."""
    ids: set[int] = set()
    for item in spec:
        if isinstance(item, int) and not isinstance(item, bool):
            ids.add(item)
            continue
        first, sep, last = str(item).partition("-")
        if not (sep and first.strip().isdigit() and last.strip().isdigit()):
            raise InputError(f"{where}: {item!r} is neither an id nor a 'first-last' range")
        lo, hi = int(first), int(last)
        if lo > hi:
            raise InputError(f"{where}: empty range {item!r}")
        ids.update(range(lo, hi + 1))
    bad = sorted(i for i in ids if not 0 <= i < IMAGENET_CLASSES)
    if bad or not ids:
        raise InputError(f"{where}: needs ImageNet ids in 0..{IMAGENET_CLASSES - 1}, got {spec}")
    return sorted(ids)


def parse_class_groups(
    groups: Mapping[str, Sequence[int | str]],
) -> tuple[list[str], list[list[int]]]:
    """Class names (in order) and each one's ImageNet ids; names must be unique. An empty
    list is a class ImageNet has no category for (VOC's person): a learned class, ``[]``
    here, which ``CAMClassifier`` scores with a head trained on the image labels."""
    names = list(groups)
    if names and all(not groups[n] for n in names):
        raise InputError("class groups: at least one needs ImageNet ids")
    return names, [expand_ids(groups[n], f"class group {n!r}") if groups[n] else [] for n in names]
