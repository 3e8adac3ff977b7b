"""Models behind one registry: classifiers that return CAMs, and segmenters."""

from training.models.registry import CLASSIFIERS, SEGMENTERS, build_classifier, build_segmenter

__all__ = ["CLASSIFIERS", "SEGMENTERS", "build_classifier", "build_segmenter"]
