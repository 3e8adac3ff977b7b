"""Data: the bundled synthetic benchmark and readers for the Oxford-IIIT Pet / VOC layouts."""

from training.data.layouts import (
    IGNORE,
    DataLayoutError,
    Sample,
    list_samples,
    read_class_names,
    read_image,
    read_mask,
    segmentation_classes,
)

__all__ = [
    "IGNORE",
    "DataLayoutError",
    "Sample",
    "list_samples",
    "read_class_names",
    "read_image",
    "read_mask",
    "segmentation_classes",
]
