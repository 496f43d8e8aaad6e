"""Process-wide settings for the CPU-bound operators; the CLI applies them at start-up.

Two defaults of a plain Python process make the low-rank operators many times slower
than they need to be (measured on 2 cores, one 11008×16 LoRA factor):

- OpenBLAS's thread pool: each of the many small ``(r×in)·(in×r)`` products pays for
  waking the pool, 132 ms instead of 0.11 ms for a 16×4096 Gram matrix. One BLAS
  thread per worker, and workers over modules instead (``pem.ops.base``).
- glibc's malloc hands every freed block of 128 KiB or more back to the kernel, so
  every new factor-sized array page-faults afresh: 1.65 ms instead of 0.27 ms for
  ``c[:, None] * B``. Raising the mmap and trim thresholds keeps freed blocks for reuse.

:func:`configure_process` must run before numpy is imported for the BLAS setting to
apply; the malloc setting applies whenever it is called. Neither changes a result.
"""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["configure_process", "set_threads"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling on 64-bit systems
_TRIM_THRESHOLD = 256 << 20


def configure_process() -> None:
    """One BLAS thread (unless the user chose), and a malloc that keeps freed blocks."""
    # numpy's OpenBLAS only: torch (training, generation) keeps its own thread pool.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    _keep_freed_blocks()


def _keep_freed_blocks() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt  # glibc only; musl has no mallopt
    except (OSError, AttributeError):
        return
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
    mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)


def set_threads(n: int | None) -> None:
    """Use ``n`` CPU threads for torch's operators (None: torch's default, one per core).

    Two jobs that each take every core of a small machine run several times slower than
    with their share: give each ``--threads`` = cores / jobs.
    """
    if n is None:
        return
    if n < 1:
        from excise.errors import ConfigError

        raise ConfigError(f"--threads must be at least 1, got {n}")
    import torch

    torch.set_num_threads(n)
