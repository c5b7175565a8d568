"""CPU-only speed settings of `trl-mig train`."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

logger = logging.getLogger(__name__)

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """
    Ask glibc's malloc to keep freed memory for reuse instead of returning it to the operating system.

    PyTorch's CPU allocator is malloc. By default glibc serves every block above 32 MB with its own `mmap` and unmaps
    it on free, so each forward and backward pass of a large batch (attention scores and activations of hundreds of
    sequences) maps fresh pages and pays a page fault per 4 KB page: measured on 2 cores, a third of a GRPO step was
    spent in the kernel. With mmap off and a high trim threshold, freed blocks stay in the heap and are reused. The
    cost is that the process's resident memory stays at its peak. Returns whether the setting took effect (glibc on
    Linux only; elsewhere nothing changes).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries without mallopt
        return False
    done = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    if done:
        logger.info("malloc keeps freed memory for reuse (cpu_keep_freed_memory)")
    return done
