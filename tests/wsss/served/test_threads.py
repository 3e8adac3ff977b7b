"""The Python models' stubs run OpenCV on their own thread (``wsss.served.threads``): no
pool of OpenCV threads spinning beside the other stubs."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

from wsss import served

# In a process of its own: OpenCV's pool is per process and starts at its first parallel call.
_PROBE = """
import os, sys
import numpy as np
from wsss.served.threads import single_threaded
import cv2

if sys.argv[1] == "single":
    single_threaded()
before = len(os.listdir("/proc/self/task"))
mask = np.zeros((2000, 2000), np.uint8)
for _ in range(3):  # a full-size mask resized, as the postprocess does
    cv2.resize(mask, (1500, 1500), interpolation=cv2.INTER_NEAREST_EXACT)
print(len(os.listdir("/proc/self/task")) - before, cv2.getNumThreads())
"""


def _threads_started(mode: str) -> list[str]:
    return subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True
    ).stdout.split()


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
@pytest.mark.skipif(cv2.getNumberOfCPUs() < 2, reason="OpenCV starts no pool on one CPU")
def test_a_stub_starts_no_opencv_threads():
    started, pool = _threads_started("default")
    assert int(started) >= 1 and int(pool) >= 2  # OpenCV's own pool, as a stub had it
    assert _threads_started("single") == ["0", "1"]


@pytest.mark.parametrize("model", served.MODELS)
def test_every_python_model_runs_opencv_on_its_own_thread(model):
    tree = ast.parse((Path(served.__file__).parent / f"{model}.py").read_text())
    init = next(
        f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == "initialize"
    )
    calls = {
        c.func.id
        for c in ast.walk(init)
        if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)
    }
    assert "single_threaded" in calls
    assert "threads.py" in served.HELPERS  # copied beside model.py in the repository
