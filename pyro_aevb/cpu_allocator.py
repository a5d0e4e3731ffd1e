"""Keep freed memory in the process on the CPU, so that a training step does not page-fault.

A step of the paper's network at M = 100 creates and frees dozens of
temporaries of 0.1–3 MB (the (M, 784) log-densities and their gradients, the
optimizer's ``sqrt`` of its accumulators, ...). With glibc's defaults, blocks
above the mmap threshold (128 kB at first) are returned to the kernel when
freed and the top of the heap is trimmed, so the next step maps them again
and touches every page anew: page faults that cost as much as a fifth of a
step. PyTorch's CPU performance tuning guide recommends an allocator that
reuses memory (jemalloc or tcmalloc, through ``LD_PRELOAD``) for this reason
(https://pytorch.org/tutorials/recipes/recipes/tuning_guide.html, "Switch
Memory allocator"); :func:`tune_cpu_allocator` gets the same reuse from glibc
itself with ``mallopt``, at run time and without a preload:

* ``M_MMAP_THRESHOLD`` = 32 MiB: blocks of a step's size come from the heap;
* ``M_TRIM_THRESHOLD`` = 512 MiB and ``M_TOP_PAD`` = 64 MiB: freed heap
  memory stays mapped for the next step.

The process keeps up to about half a gigabyte of freed memory mapped instead of
returning it. ``pyro-aevb bench`` applies it to every path it times, the
hand-written reference included; measurements are in BENCHMARKS.md.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's malloc.h
SETTINGS = {M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 512 << 20, M_TOP_PAD: 64 << 20}

_applied: str | None = None


def tune_cpu_allocator() -> str:
    """Apply the settings above once per process; returns what was done, or why not.

    ``PYRO_AEVB_MALLOC_TUNING=0`` leaves the allocator alone.
    """
    global _applied
    if _applied is not None:
        return _applied
    if os.environ.get("PYRO_AEVB_MALLOC_TUNING", "1") == "0":
        _applied = "untouched (PYRO_AEVB_MALLOC_TUNING=0)"
    elif platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        _applied = "untouched (not glibc)"
    else:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            ok = all(libc.mallopt(key, value) == 1 for key, value in SETTINGS.items())
        except (OSError, AttributeError) as e:
            ok, _applied = False, f"untouched ({type(e).__name__}: {e})"
        if ok:
            _applied = "glibc mallopt: mmap threshold 32 MiB, trim threshold 512 MiB, top pad 64 MiB"
        elif _applied is None:
            _applied = "untouched (mallopt refused a setting)"
    return _applied
