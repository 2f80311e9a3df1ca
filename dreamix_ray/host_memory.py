"""Freed host memory stays in the process, so the next step's tensors reuse it instead of page-faulting.

glibc's malloc serves every block above its mmap threshold (at most 32 MiB) with a fresh mmap and returns
it to the kernel on free; below it, frees at the top of the heap are trimmed back past 128 KiB. A CPU
denoiser allocates and frees the same large activations every step (an SSR block at batch 4 is ~34 MB), so
each step pays the kernel to fault in and zero them again: `mul`, `gelu` and the convolutions of a batch of 4
ran 10-20x slower than at batch 1 (BENCHMARKS.md, "Freed memory kept for reuse"). With mmap off and the trim
threshold at its maximum, those blocks come back from the heap already mapped.

The cost: a process keeps its peak heap instead of returning it, which is what a long-lived editor, batch
actor or Serve replica does anyway. DREAMIX_KEEP_FREED_MEMORY=0 leaves malloc as it was.

Ray runs a step's calls on a thread of its own (Ray Data's map actors, Serve's replicas, Ray Train's training
loop), and glibc gives such threads arenas of their own: heaps mmap'd 64 MiB at a time, which these settings keep
less of. The same batch steps cost 1.1-1.2x the CPU-seconds on a pool thread as on the main thread, and 1.03x
once the process has one arena (research/probe_actor_cpu.py). The arena count is read when malloc starts, so
the actors that run networks get it from their environment (worker_env), not from mallopt.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform

# mallopt parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_INT_MAX = 2**31 - 1


@functools.cache
def keep_freed_memory() -> bool:
    """Tune this process's malloc once (glibc only; elsewhere a no-op). Returns whether it is tuned."""
    if _opted_out() or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        # mallopt returns 1 on success; both must hold, or big blocks still go back to the kernel.
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX))
    except (OSError, AttributeError):
        return False


def worker_env() -> dict[str, str]:
    """Environment variables for a Ray worker that runs networks (a runtime_env's env_vars): one malloc arena, so
    the thread Ray runs its calls on shares the main heap that keep_freed_memory tunes."""
    return {} if _opted_out() else {"MALLOC_ARENA_MAX": "1"}


def _opted_out() -> bool:
    return os.environ.get("DREAMIX_KEEP_FREED_MEMORY", "1") == "0"
