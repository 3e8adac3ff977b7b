"""The preprocess and refiner stubs keep their blocks on the heap (``wsss.served.heap``),
not mapped one by one as tritonserver's ``MALLOC_MMAP_THRESHOLD_`` has them."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from wsss import served

# Run in a process of its own started as tritonserver starts its stubs: with a 128 KiB mmap
# threshold. glibc counts the blocks it has mapped (mallinfo's hblks).
_PROBE = """
import ctypes, sys
from wsss.served.heap import keep_blocks_on_heap

class Info(ctypes.Structure):  # mallinfo's: int fields (mallinfo2, glibc >= 2.33: size_t)
    names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
    _fields_ = [(n, ctypes.c_int) for n in names.split()]

libc = ctypes.CDLL(None)
libc.mallinfo.restype = Info
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)

def mapped_by(size):
    before = libc.mallinfo().hblks
    block = libc.malloc(size)
    during = libc.mallinfo().hblks
    libc.free(block)
    return during - before

print(mapped_by(600_000), keep_blocks_on_heap(), mapped_by(600_000), mapped_by(8 << 20))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_stub_keeps_a_photos_pixels_on_the_heap_under_the_servers_mmap_threshold():
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    # a decoded 500 x 400 photo (600 kB): mapped under the server's threshold; from the heap
    # once the stub has set its own; a block past HEAP_BLOCKS is still mapped
    assert out == ["1", "True", "0", "1"]


@pytest.mark.parametrize("model", ["preprocess", "refiner"])
def test_the_preprocess_and_refiner_models_set_their_heap_when_they_start(model):
    tree = ast.parse((Path(served.__file__).parent / f"{model}.py").read_text())
    init = next(
        f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == "initialize"
    )
    calls = [
        c.func.id
        for c in ast.walk(init)
        if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)
    ]
    assert "keep_blocks_on_heap" in calls
    assert "heap.py" in served.HELPERS  # copied beside model.py in the repository
