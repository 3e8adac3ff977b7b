"""Data: the bundled synthetic benchmark and one registry of readers for the layouts users
have (Oxford-IIIT Pet, PASCAL VOC 2012 and its train_aug set, MS COCO, a plain folder)."""

from training.data.layouts import (
    IGNORE,
    LAYOUTS,
    DataLayoutError,
    Sample,
    describe,
    get_layout,
    list_samples,
    read_class_names,
    read_image,
    read_mask,
)

__all__ = [
    "IGNORE",
    "LAYOUTS",
    "DataLayoutError",
    "Sample",
    "describe",
    "get_layout",
    "list_samples",
    "read_class_names",
    "read_image",
    "read_mask",
]
