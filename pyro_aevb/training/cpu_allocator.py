"""Keep freed memory in the process on the CPU, so that a training step does not page-fault.

A step of the paper's network at M = 100 creates and frees dozens of
temporaries of 0.1-3 MB (the (M, 784) log-densities and their gradients, the
optimizer's ``sqrt`` of its accumulators, ...). With glibc's defaults such
blocks get mappings of their own or are trimmed off the top of the heap when
freed, i.e. returned to the kernel, so the next step maps that memory again and
touches every page anew: hundreds of page faults per step. PyTorch's CPU performance tuning guide recommends an
allocator that reuses memory (jemalloc or tcmalloc, through ``LD_PRELOAD``) for
this reason (https://pytorch.org/tutorials/recipes/recipes/tuning_guide.html,
"Switch Memory allocator"). :func:`tune_cpu_allocator` gets that reuse from
glibc itself, at run time and without a preload, with two ``mallopt`` settings:

* ``M_MMAP_THRESHOLD`` = 32 MiB: blocks of a step's size come from the heap
  rather than from mappings of their own, unmapped again when freed;
* ``M_TOP_PAD`` = 64 MiB: the heap grows, and is trimmed back to, 64 MiB beyond
  what is in use, so that freed memory stays mapped for the next step.

That brings the faults near zero (``tests/test_cpu_allocator.py``), at the
price of at most 64 MiB of mapped but unused memory. The trim threshold is left
alone: raising it lets a large evaluation keep gigabytes it no longer uses.
``pyro-aevb bench`` runs with the settings for every path it times, the
hand-written reference included; measurements are in BENCHMARKS.md.

Only the commands (``train``, ``evaluate``, ``bench``, ...) call it: a library
call leaves the process's allocator as it found it. :func:`allocator_status`
says what is in force, for ``run.json``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's malloc.h
SETTINGS = {M_MMAP_THRESHOLD: 32 << 20, M_TOP_PAD: 64 << 20}

_applied: str | None = None


def allocator_status() -> str:
    """What this process's allocator runs with: the settings, if :func:`tune_cpu_allocator` applied them."""
    return _applied or "glibc's defaults (pyro_aevb.training.cpu_allocator.tune_cpu_allocator not called)"


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
            _applied = "glibc mallopt: mmap threshold 32 MiB, top pad 64 MiB"
        elif _applied is None:
            _applied = "untouched (mallopt refused a setting)"
    return _applied
