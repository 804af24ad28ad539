"""Thread counts: scoped torch thread settings (set for a block of work, restored after, no
lasting global change) and the size of the library's worker pools."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import threading
from collections.abc import Callable, Iterator


def worker_threads(limit: int = 4) -> int:
    """Threads for a pool of memory-bound work: one per CPU this process may run on (its affinity,
    not the machine's count), at most ``limit``."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(limit, cpus))


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads, then restore the previous count.

    Used where parallelism comes from elsewhere (a thread pool) or the matrices are too small for
    OpenMP to pay: on a busy machine its spinning threads make small ops many times slower.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


#: OpenBLAS's thread-count functions under the names its builds export: plain, numpy's and SciPy's
#: ``scipy_`` prefix, and the ``64_`` suffixes of its 64-bit-integer builds.
_OPENBLAS_NAMES = [
    (f"{prefix}openblas_get_num_threads{suffix}", f"{prefix}openblas_set_num_threads{suffix}")
    for prefix in ("", "scipy_") for suffix in ("", "64_", "_64")
]
_blas_lock = threading.Lock()


@functools.cache
def _openblas_controls() -> tuple[tuple[Callable[[], int], Callable[[int], None]], ...]:
    """``(get, set)`` thread-count functions of every OpenBLAS loaded in this process (numpy's,
    SciPy's…), found in ``/proc/self/maps``; empty elsewhere (another BLAS, another platform)."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as f:
            paths = sorted({line.split()[-1] for line in f if "openblas" in line.lower() and line.split()[-1].startswith("/")})
    except OSError:
        return ()
    controls = []
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for get_name, set_name in _OPENBLAS_NAMES:
            get, put = getattr(lib, get_name, None), getattr(lib, set_name, None)
            if get is not None and put is not None:
                get.restype, get.argtypes = ctypes.c_int, []
                put.restype, put.argtypes = None, [ctypes.c_int]
                controls.append((get, put))
                break
    return tuple(controls)


@contextlib.contextmanager
def blas_threads(n: int) -> Iterator[None]:
    """Run the block with numpy's BLAS (OpenBLAS) limited to ``n`` threads, then restore the count.

    For a pool of threads each calling numpy's linear algebra on small matrices: OpenBLAS's own
    threads would multiply with the pool's and, on small problems, cost far more than they give
    (a QR of a 5632×64 matrix is several times slower with two OpenBLAS threads than with one).
    A no-op where numpy's BLAS is not OpenBLAS. The setting is process-wide while the block runs.
    """
    import numpy  # noqa: F401 - loads numpy's OpenBLAS, so that it is found

    controls = _openblas_controls()
    with _blas_lock:
        before = [get() for get, _ in controls]
        for _, put in controls:
            put(n)
    try:
        yield
    finally:
        with _blas_lock:
            for (_, put), count in zip(controls, before):
                put(count)


__all__ = ["blas_threads", "torch_threads", "worker_threads"]
