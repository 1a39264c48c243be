"""Handing freed large buffers back to the operating system (glibc's malloc).

glibc serves an allocation above its mmap threshold (128 KiB at first) with a mapping of
its own, unmapped when freed; but each such free raises the threshold (up to 32 MiB), so
later large buffers come from the heap and stay resident after they are freed. A block
server allocates and frees a KV cache per session (megabytes each), so after a few
sessions their freed caches stay resident for good. A threshold set once with mallopt()
no longer moves.
"""

from __future__ import annotations

import ctypes
import sys

M_MMAP_THRESHOLD = -3
"""mallopt's parameter number (malloc.h)."""
LARGE_BUFFER_BYTES = 1 << 20
"""Buffers this big or bigger get a mapping of their own: weights and KV caches. Not the
activations of a decode step or a short prefill: a fresh mapping (and its page faults)
for every operation there would cost time."""


def return_large_frees_to_the_os() -> bool:
    """Fixes glibc's mmap threshold at LARGE_BUFFER_BYTES for this process.

    Returns False, changing nothing, where the C library is not glibc (macOS, musl,
    Windows): call it at a daemon's start, before the weights load.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, LARGE_BUFFER_BYTES))
