"""Tensors in flight with bounded memory: the engine under the streaming merge.

A job reads one tensor of a file and turns it into the bytes to write; worker threads run the
jobs a few ahead of the writer (:func:`lookahead`), each in the file opened for it
(:func:`in_file`). A tensor's bytes are read through a read-only map of just its range
(:class:`MappedRegion`: the page cache's pages are used in place, nothing is copied) or copied
into a reusable buffer (:func:`pread`); output buffers come from a :class:`BufferPool` and can
be placed at a page offset, so that :class:`~.direct_io.DirectAppender` writes them from where
they lie. Only the tensors in flight are in memory, whatever the file size.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import deque
from collections.abc import Callable, Generator, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .direct_io import ALIGN

if TYPE_CHECKING:
    import numpy as np


class ShortReadError(EOFError):
    """A file ended before the byte ``offset`` a read needed: it shrank, or its header lies."""

    def __init__(self, offset: int) -> None:
        super().__init__(f"unexpected end of file at byte {offset}")
        self.offset = offset


class BufferPool:
    """Reusable uint8 buffers, by size, shared by the worker threads.

    The same shapes repeat in every layer of a model; reusing their buffers saves the kernel from
    mapping and zeroing fresh pages for every tensor (about a third of the system time otherwise).
    At most ``max_bytes`` are kept idle. A buffer can be placed at a given offset from a page
    boundary (``phase``): one whose address is congruent to its place in the output file is
    written from where it lies, with no copy (:class:`~.direct_io.DirectAppender`).
    """

    def __init__(self, max_bytes: int = 1 << 30) -> None:
        self._free: dict[int, list[Any]] = {}
        self._idle = 0
        self._max = max_bytes
        self._lock = threading.Lock()

    def get(self, nbytes: int, phase: int = 0) -> "np.ndarray":
        """A buffer of ``nbytes`` whose address is ``phase`` bytes past a multiple of ``ALIGN``."""
        import numpy as np

        size = nbytes + 2 * ALIGN
        with self._lock:
            free = self._free.get(size)
            raw = free.pop() if free else None
            if raw is not None:
                self._idle -= size
        if raw is None:
            raw = np.empty(size, dtype=np.uint8)
        start = -raw.ctypes.data % ALIGN + phase % ALIGN
        return raw[start : start + nbytes]  # type: ignore[no-any-return]

    def put(self, bufs: Iterable["np.ndarray"]) -> None:
        """Give back buffers from :meth:`get` (views of them are fine)."""
        with self._lock:
            for buf in bufs:
                raw = buf
                while raw.base is not None:  # the pooled allocation behind a view
                    raw = raw.base
                n = raw.size
                if n and self._idle + n <= self._max:
                    self._free.setdefault(n, []).append(raw)
                    self._idle += n


def pread(fd: int, nbytes: int, offset: int, buffers: BufferPool) -> "np.ndarray":
    """``nbytes`` from ``fd`` at ``offset`` into a uint8 array from ``buffers`` (short reads retried).

    Raises:
        ShortReadError: the file ends first.
    """
    buf = buffers.get(nbytes)
    view = buf.data if nbytes else memoryview(b"")
    done = 0
    while done < nbytes:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise ShortReadError(offset + done)
        done += n
    return buf


class MappedRegion:
    """One tensor's bytes mapped read-only from its file (pages read in at once), until :meth:`close`.

    Reading through these maps rather than ``pread`` lets a kernel read the page cache's pages in
    place, and an untouched tensor go from the map straight to the writer: no copy of the data is
    made on the way in. Only the tensors in flight are mapped, so memory stays bounded whatever
    the file size.

    Raises:
        ShortReadError: the range lies past the end of the file (it shrank since it was checked).
    """

    def __init__(self, fd: int, nbytes: int, offset: int) -> None:
        import mmap

        self._mm: Any = None
        if nbytes == 0:
            self.view = memoryview(b"")
            return
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        try:
            self._mm = mmap.mmap(
                fd, offset + nbytes - start, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0), prot=mmap.PROT_READ, offset=start
            )
        except ValueError as e:
            raise ShortReadError(offset + nbytes) from e
        self.view = memoryview(self._mm)[offset - start : offset - start + nbytes]

    def array(self, dtype: Any, shape: tuple[int, ...]) -> "np.ndarray":
        """The bytes as a read-only array (drop it before :meth:`close`)."""
        import numpy as np

        return np.frombuffer(self.view, dtype=dtype).reshape(shape)

    def close(self) -> None:
        """Unmap; where a view of the bytes is still alive, the map goes when that view does."""
        with contextlib.suppress(BufferError):
            self.view.release()
        if self._mm is not None:
            with contextlib.suppress(BufferError):
                self._mm.close()


def release(items: Iterable[Any], buffers: BufferPool) -> None:
    """Free what a job returned along with its result: maps closed, pooled buffers given back."""
    items = list(items)
    for item in items:
        if isinstance(item, MappedRegion):
            item.close()
    buffers.put(b for b in items if not isinstance(b, MappedRegion))


def in_file(path: str | os.PathLike[str], job: Callable[[int], Any]) -> Any:
    """Run ``job(fd)`` on the file opened read-only (a map it makes outlives the descriptor)."""
    fd = os.open(Path(path), os.O_RDONLY)
    try:
        return job(fd)
    finally:
        os.close(fd)


def lookahead(pool: ThreadPoolExecutor, jobs: Iterable[Callable[[], Any]], depth: int) -> Generator[Any, None, None]:
    """Run ``jobs`` on ``pool`` at most ``depth`` ahead of the consumer; yield results in order.

    When the consumer stops early (an error while writing), queued jobs are cancelled and the
    running ones are waited for, so no job outlives the consumer (or the maps it reads).
    """
    pending: deque[Future[Any]] = deque()
    try:
        for job in jobs:
            pending.append(pool.submit(job))
            if len(pending) > depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for fut in pending:
            fut.cancel()
        for fut in pending:
            if not fut.cancelled():
                fut.exception()  # wait; its error (if any) is superseded by the one being raised


__all__ = ["BufferPool", "MappedRegion", "ShortReadError", "in_file", "lookahead", "pread", "release"]
