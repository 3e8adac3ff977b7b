"""OpenCV's thread pool, off in a Python model's stub process.

OpenCV runs a parallel call (a resize, a morphology, a connected-components pass) on a pool of
a thread per core, whose threads then wait for the next call in a ``sched_yield`` loop. A
stub is one thread of work (Triton scales a model by instances, as the ONNX Runtime sessions
run one intra-op thread each and ``serving.server`` gives numpy's OpenBLAS one thread): its
pool's threads spin on the cores the other stubs need. make serve's bytes ensemble at
concurrency 3 spent 1.3 and 2.1 ms of CPU a photo in its postprocess and refiner stubs with
the pool (its threads' ``sched_yield``: 52% and 37% of those stubs' perf samples), and 0.8
and 1.55 without it (by hand, perf; docs/performance.md).
"""

import cv2


def single_threaded() -> None:
    """Run OpenCV's functions on the calling thread alone (no pool), for this process."""
    cv2.setNumThreads(0)
