"""Threads: scoped torch and BLAS thread settings (set for a block of work, restored after, no
lasting global change), the size of the library's worker pools, and the one module-parallel
helper (:func:`map_modules`) that the converters share."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TypeVar

from .progress import Progress

T = TypeVar("T")
R = TypeVar("R")


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


def map_modules(work: Callable[[int, T], R], items: Sequence[T], workers: int, progress: Progress | None = None, *,
                weight: Callable[[T], int] | None = None) -> list[R]:
    """``[work(i, items[i]) for i …]``, computed by ``workers`` threads that take the items in turn,
    in order (the modules of an adapter, in file order); returns the results in item order.

    ``progress(done, total)`` is told the ``weight`` of each finished item (bytes, say; by default
    one per item), from the thread that finished it, one call at a time. When ``work`` raises, or
    the caller is interrupted (Ctrl-C), no thread starts another item; the threads finish the
    items in hand, and the error of the *first* failed item in order is raised: items are handed
    out in order, so every item before it was done, and the error is the one a single thread
    would have met first.

    Raises:
        Exception: the error ``work`` raised for the first failed item.
    """
    if not items:
        return []
    results: list[R | None] = [None] * len(items)
    failures: list[tuple[int, BaseException]] = []
    todo: "queue.SimpleQueue[int]" = queue.SimpleQueue()
    for i in range(len(items)):
        todo.put(i)
    stop, lock = threading.Event(), threading.Lock()
    total = sum(weight(item) for item in items) if weight is not None else len(items)
    done = 0

    def take() -> None:
        nonlocal done
        while not stop.is_set():
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            try:
                results[i] = work(i, items[i])
            except BaseException as e:  # noqa: BLE001 - handed to the caller below, in item order
                with lock:
                    failures.append((i, e))
                stop.set()
                return
            with lock:
                done += weight(items[i]) if weight is not None else 1
                if progress is not None:
                    progress(done, total)

    threads = max(1, min(workers, len(items)))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        futures = [pool.submit(take) for _ in range(threads)]
        try:
            wait(futures)
        finally:
            stop.set()  # on Ctrl-C the threads stop at their next item
    if failures:
        raise min(failures, key=lambda failure: failure[0])[1]
    return results  # type: ignore[return-value]
