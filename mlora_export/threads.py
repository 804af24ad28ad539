"""Thread counts: scoped torch thread settings (set for a block of work, restored after, no
lasting global change) and the size of the library's worker pools."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


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


__all__ = ["torch_threads", "worker_threads"]
