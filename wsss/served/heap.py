"""glibc's heap settings for a Python model's stub process.

tritonserver runs with ``MALLOC_MMAP_THRESHOLD_=131072`` (``serving.server.server_env``):
each block over 128 KiB gets its own mapping, returned when freed, which keeps tritonserver's
resident set flat through a soak (reports/soak/fixes.md). Its stubs inherit the setting, and
there it costs: every decoded photo, resized image and full-size mask (0.1-1 MB each, several
a request) is a fresh mapping whose pages fault in, zeroed, on first touch. make serve's bytes
ensemble spent 7.3 and 3.7 ms of CPU a photo in its preprocess and refiner stubs with it,
5.0 and 1.7 ms with their blocks kept on the heap (4 MiB; with the postprocess stub's too,
28.1 photos/s instead of 25.5: one host, by hand, reports/soak/fixes.md). Through a
20,000-request soak those two stubs stayed flat (+0.2%, +0.0%), as they did under glibc's own
dynamic threshold. The postprocess stub keeps the server's setting: on the heap it saved
0.9 ms a photo, but its private memory grew 1.4 MiB through the same soak (its full-size
masks come in one size per photo), none without; it makes fewer of them (postprocess.py).
"""

import ctypes

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
# Blocks up to 4 MiB from the heap (an RGB photo of 1.4 MP); larger ones keep their own
# mapping, whose page faults cost little beside decoding that many pixels. The heap keeps up
# to twice that free at its top before giving it back, as glibc's dynamic threshold does.
HEAP_BLOCKS = 4 << 20


def keep_blocks_on_heap(limit: int = HEAP_BLOCKS) -> bool:
    """Serve blocks up to ``limit`` bytes from this process's heap. False where the C library
    has no ``mallopt`` (macOS, Windows: nothing is set) or refuses a value (musl, whose
    ``mallopt`` does nothing; a 32-bit glibc past its largest threshold)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # TypeError: Windows has no CDLL(None)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, limit) == 1 and mallopt(M_TRIM_THRESHOLD, 2 * limit) == 1
