"""The code of the repository's Python models, which stands alone.

``preprocess.py``, ``postprocess.py`` and ``refiner.py`` are Triton python-backend models; the
exporter copies one into ``<model>/<version>/model.py`` and every other module of this package
beside it (``HELPERS``). Inside Triton the version folder is a package named after the version
(the stub imports ``<version>.model``), so the relative imports here resolve to those copies:
the served repository needs numpy, OpenCV, Pillow (image headers) and ONNX Runtime, and
nothing from this project. Clients and training import the same modules from here, so both
sides of the wire decode, resize and refine one way. A contract test holds every module here
to those imports.
"""

MODELS = ("preprocess", "postprocess", "refiner")  # copied as model.py
# Copied beside it:
HELPERS = (
    "classical.py",
    "configs.py",
    "errors.py",
    "heap.py",
    "images.py",
    "refiners.py",
    "registry.py",
    "respond.py",
    "threads.py",
)
