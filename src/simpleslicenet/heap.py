"""glibc heap settings for the two allocation patterns this package meets on the CPU.

glibc serves a large block with ``mmap`` and unmaps it when freed; the kernel then zero-fills every page
of the next one afresh (a minor page fault a page), and it trims free memory off the top of the heap.
The thresholds for both adapt at run time, but only up to 32 MiB. Two patterns need them set:

* **SimpleSliceNet's encoder on the CPU** (:func:`reuse_freed_heap`): each chunk of slices allocates and
  frees the same few-MB activations; once the flow's steps have run between two volumes, those blocks
  are trimmed and faulted in again (about 460,000 page faults and 1 s of system time a 1-mm volume, a
  third of the encoder's time). Keeping up to 512 MiB of freed heap removes that.
* **PatchCore's coreset search** (:func:`limit_heap_growth`): a distance buffer just below the adaptive
  threshold, freed and allocated again every step, grows the heap by ~12 MB a step until the process is
  killed. Serving blocks above 8 MiB by ``mmap`` returns them to the system.

Each is set where its model runs (building PatchCore; SimpleSliceNet's set-up on a CPU trainer), never at
import, and is a no-op without glibc. The last call wins in a process that runs both.
"""

from __future__ import annotations

import ctypes
import platform
import sys

__all__ = ["limit_heap_growth", "reuse_freed_heap"]

# mallopt parameter numbers in glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def _mallopt(*settings: tuple[int, int]) -> bool:
    """Apply ``(parameter, value)`` settings with glibc's ``mallopt``; ``False`` without glibc or on refusal."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return all(bool(libc.mallopt(parameter, value)) for parameter, value in settings)


def limit_heap_growth(threshold_bytes: int = 8 << 20) -> bool:
    """Serve allocations above ``threshold_bytes`` with mmap so they go back to the system when freed."""
    return _mallopt((_M_MMAP_THRESHOLD, threshold_bytes))


def reuse_freed_heap(mmap_threshold_bytes: int = 32 << 20, trim_threshold_bytes: int = 512 << 20) -> bool:
    """Serve allocations up to ``mmap_threshold_bytes`` from the heap and keep up to ``trim_threshold_bytes`` of it freed."""
    return _mallopt((_M_MMAP_THRESHOLD, mmap_threshold_bytes), (_M_TRIM_THRESHOLD, trim_threshold_bytes))
