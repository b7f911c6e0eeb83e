"""Chapter 5: keep freed memory in the process, so a training step stops paying page faults.

Every step of the NumPy model allocates and frees the same few hundred arrays of up to a few
MB. glibc's malloc serves blocks above its mmap threshold (128 KiB, rising as blocks are
freed) with fresh pages from the kernel and gives them back on free, and it trims the heap's
top when more than 128 KiB is free there; either way the next step gets new pages and pays a
page fault on first touch of each 4 KiB page. Measured on the course machine (`small`, one
thread): ~18,000 minor faults and ~55 ms of kernel time in a ~270 ms step; with the settings
below ~500 faults and ~2 ms. PyTorch's CPU step gains too (it also uses malloc), so the
benchmark applies the same settings to both sides.

    keep_freed_memory()   # once per process, before the training loop

The memory is reused by the next step, not leaked: the process's peak is the step's peak.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt parameter numbers, from glibc's <malloc.h>
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit: blocks up to 32 MiB
TRIM_THRESHOLD = 1 << 30  # give free heap back to the kernel only beyond 1 GiB
TOP_PAD = 64 << 20  # grow the heap in 64 MiB steps


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep and reuse freed memory (see the module docstring).

    Process-wide and idempotent. Returns True if every setting was accepted, False where the
    C library is not glibc (macOS, musl): the model runs the same there, only slower."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    settings = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
                (M_TOP_PAD, TOP_PAD))
    return all(mallopt(param, value) == 1 for param, value in settings)
