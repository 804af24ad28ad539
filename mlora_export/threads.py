"""Scoped torch thread settings: set for a block of work, restored after (no lasting global change)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


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


__all__ = ["torch_threads"]
