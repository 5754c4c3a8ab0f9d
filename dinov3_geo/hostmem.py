"""Host memory: keep the memory a run frees inside the process, so the next array does not pay the
kernel for fresh pages.

A run allocates and frees arrays of megabytes per chip row (chip batches, stitched rows, strips,
overview levels, compressed blocks). With glibc's defaults such arrays are mapped fresh from the
kernel and given back when freed (mmap, or the heap trimmed), and the kernel zeroes every page of
every new mapping: on the 2-core benchmark machine that zeroing was 15-18 % of the host CPU per
chip. Raising glibc's mmap threshold to its maximum and its trim threshold to 64 MB lets freed
memory be reused instead (`benchmarks/RESULTS.md`: ~10 % less CPU per chip, peak memory unchanged).

The thresholds are process-wide and stay set once set (glibc cannot go back to its adaptive
thresholds); a process keeps up to ``TRIM_THRESHOLD`` of freed memory per malloc arena. So they are
the program's choice, not the library's: the ``dinov3geo`` command sets them once at its start, and
a Python program may call :func:`keep_freed_memory` itself; library runs never do. The processes the
program starts afterwards (a local Dask cluster's workers) get the same thresholds through glibc's
``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_``, which it reads at their start.
``DINOV3GEO_KEEP_FREED_MEMORY=0`` in the environment leaves the allocator alone. Other C libraries
(musl, macOS) are left alone too.
"""
from __future__ import annotations

import ctypes
import logging
import os
from typing import Optional

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1           # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
#: Allocations below this come from the heap, where freed memory is reused (glibc's maximum, 32 MB).
MMAP_THRESHOLD = 32 << 20
#: Free memory at the top of a heap beyond this goes back to the kernel.
TRIM_THRESHOLD = 64 << 20
ENV = "DINOV3GEO_KEEP_FREED_MEMORY"

_kept: Optional[bool] = None        # what the first call of keep_freed_memory did in this process


def keep_freed_memory() -> bool:
    """Set glibc's thresholds once per process, and for the processes it starts (see the
    module); True when they are set. Does nothing when ``DINOV3GEO_KEEP_FREED_MEMORY`` is ``0`` or
    the C library is not glibc. (Two threads calling it at once may both set them: the same
    values, harmless.)"""
    global _kept
    if _kept is None:
        _kept = _set_thresholds()
    return _kept


def freed_memory_kept() -> bool:
    """Whether :func:`keep_freed_memory` set the thresholds in this process (a benchmark's record
    of the allocator it measured)."""
    return bool(_kept)


def _set_thresholds() -> bool:
    """glibc's mmap and trim thresholds raised (see the module); False when left alone."""
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if not _glibc():
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        kept = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and \
            libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    except (OSError, AttributeError):
        return False
    log.debug("glibc malloc thresholds: mmap %d, trim %d (%s)", MMAP_THRESHOLD, TRIM_THRESHOLD, kept)
    if kept:        # read by glibc when a child process starts; values the user set stay
        os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD))
        os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", str(TRIM_THRESHOLD))
    return kept


def _glibc() -> bool:
    """Whether this process runs on glibc (whose ``mallopt`` parameters are the ones set here)."""
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError, AttributeError):      # no such name on this system
        return False


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity: ``taskset``, a container's or a Dask
    worker's CPU set), where thread pools are sized; ``os.cpu_count()`` counts the whole machine."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):        # no affinity on this system (macOS, Windows)
        return max(1, os.cpu_count() or 1)
