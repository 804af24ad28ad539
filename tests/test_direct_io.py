"""The O_DIRECT appender: exact bytes at any size, and the page-cache fallback where direct I/O is refused."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest

from mlora_export.io import direct_io
from mlora_export.io.direct_io import STAGE_BYTES, DirectAppender
from mlora_export.io.safetensors import read_header, write_safetensors


def _chunks(seed: int, sizes: list[int]) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in sizes]


@pytest.mark.parametrize("sizes", [[0], [1], [4095, 1, 4097], [STAGE_BYTES - 3, 5, 123], [STAGE_BYTES, STAGE_BYTES * 2 + 7]])
def test_appender_writes_exact_bytes(tmp_path: Path, sizes: list[int]) -> None:
    parts = _chunks(sum(sizes), sizes)
    path = tmp_path / "f.bin"
    out = DirectAppender(path)
    for p in parts:
        out.write(memoryview(p))
    out.close()
    assert path.read_bytes() == b"".join(parts)


def test_appender_falls_back_when_open_refuses_direct(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.open
    direct = getattr(os, "O_DIRECT", 0)
    if not direct:
        pytest.skip("no O_DIRECT on this platform")

    def refuse(path: object, flags: int, *args: object) -> int:
        if flags & direct:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(path, flags, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(direct_io.os, "open", refuse)
    parts = _chunks(1, [10, STAGE_BYTES + 3])
    path = tmp_path / "f.bin"
    out = DirectAppender(path)
    assert not out.direct
    for p in parts:
        out.write(memoryview(p))
    out.close()
    assert path.read_bytes() == b"".join(parts)


def test_direct_safetensors_equal_buffered(tmp_path: Path) -> None:
    """``write_safetensors(direct=True)`` writes the very bytes of the buffered writer, and checks the same."""
    rng = np.random.default_rng(2)
    arrays = [rng.standard_normal(n, dtype=np.float32) for n in (3, 1000, 70_001)]
    specs = [(f"t{i}", "F32", (a.size,)) for i, a in enumerate(arrays)]
    write_safetensors(tmp_path / "a.safetensors", specs, arrays, {"format": "pt"})
    write_safetensors(tmp_path / "b.safetensors", specs, arrays, {"format": "pt"}, direct=True)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert list(read_header(tmp_path / "b.safetensors").tensors) == ["t0", "t1", "t2"]
    with pytest.raises(ValueError, match="no data for tensor 't2'"):
        write_safetensors(tmp_path / "c.safetensors", specs, arrays[:2], direct=True)
    with pytest.raises(ValueError, match="has 8 bytes, expected 12"):
        write_safetensors(tmp_path / "d.safetensors", specs, [arrays[0][:2], *arrays[1:]], direct=True)


def _placed(data: bytes, phase: int) -> memoryview:
    """``data`` in a buffer whose address is ``phase`` past a page boundary."""
    raw = np.empty(len(data) + 2 * direct_io.ALIGN, np.uint8)
    start = -raw.ctypes.data % direct_io.ALIGN + phase
    raw[start : start + len(data)] = np.frombuffer(data, np.uint8)
    return memoryview(raw[start : start + len(data)])


@pytest.mark.parametrize("fallback", [False, True])
def test_appender_writes_placed_buffers_in_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fallback: bool) -> None:
    """Large buffers congruent to their file offset are written from where they lie (no copy
    into the staging buffer), others are staged; the file holds the same bytes either way, also
    when the file system refuses those direct writes (the page-cache fallback)."""
    if not getattr(os, "O_DIRECT", 0):
        pytest.skip("no O_DIRECT on this platform")
    sizes = [37, direct_io.ZERO_COPY_BYTES + 4099, 5, 3 * direct_io.ZERO_COPY_BYTES, direct_io.ZERO_COPY_BYTES - 1, 2 * direct_io.ZERO_COPY_BYTES + 1]
    parts = _chunks(7, sizes)
    direct_writes: list[int] = []
    real = direct_io._pwrite_fully

    def spy(fd: int, buffers: list[memoryview], offset: int) -> None:
        for b in buffers:
            placed = direct_io._address(b) % direct_io.ALIGN == 0 and b.nbytes % direct_io.ALIGN == 0 and offset % direct_io.ALIGN == 0
            assert placed or not out.direct, "a direct write that is not aligned"
            if fallback and out.direct:
                raise OSError(errno.EINVAL, "Invalid argument")
            direct_writes.append(b.nbytes)
        real(fd, buffers, offset)

    staged = [0]
    copy_in = DirectAppender._copy_in

    def count(self: DirectAppender, data: memoryview) -> None:
        staged[0] += data.nbytes
        copy_in(self, data)

    monkeypatch.setattr(DirectAppender, "_copy_in", count)
    path = tmp_path / "f.bin"
    out = DirectAppender(path, pwrite=spy)
    assert out.direct
    offset = 0
    for p in parts:
        out.write(_placed(p, offset % direct_io.ALIGN))  # placed as it will lie in the file
        offset += len(p)
    out.close()
    assert path.read_bytes() == b"".join(parts)
    if not fallback:
        # only the small parts and the unaligned ends of the three large ones went through the stage
        small = sum(n for n in sizes if n < direct_io.ZERO_COPY_BYTES)
        assert staged[0] <= small + 3 * 2 * direct_io.ALIGN, staged[0]
        assert len(direct_writes) >= 4


def test_appender_stages_buffers_that_are_not_placed(tmp_path: Path) -> None:
    """A large buffer whose address does not match its file offset is copied through the stage."""
    parts = _chunks(8, [100, 2 * direct_io.ZERO_COPY_BYTES])
    path = tmp_path / "f.bin"
    out = DirectAppender(path)
    out.write(memoryview(parts[0]))
    out.write(_placed(parts[1], 1))  # file offset 100, address 1 past a page: not congruent
    out.close()
    assert path.read_bytes() == b"".join(parts)


def test_placed_write_from_a_read_only_file_map_stays_direct(tmp_path: Path) -> None:
    """The merge writes untouched tensors straight from the base's read-only map: such a buffer
    goes to the disk with ``O_DIRECT`` (no fallback to the page cache), and the bytes are exact."""
    import mmap

    if not getattr(os, "O_DIRECT", 0):
        pytest.skip("no O_DIRECT on this platform")
    src = tmp_path / "src.bin"
    data = _chunks(9, [3 * direct_io.ZERO_COPY_BYTES])[0]
    src.write_bytes(data)
    fd = os.open(src, os.O_RDONLY)
    try:
        mm = mmap.mmap(fd, len(data), prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    view = memoryview(mm)[direct_io.ALIGN + 5 :]  # 5 bytes past a page boundary
    path = tmp_path / "f.bin"
    out = DirectAppender(path)
    direct_at_start = out.direct
    out.write(memoryview(b"h" * (direct_io.ALIGN + 5)))  # the file offset 5 past a block too: congruent
    out.write(view)
    assert out.direct == direct_at_start
    out.close()
    assert path.read_bytes() == b"h" * (direct_io.ALIGN + 5) + data[direct_io.ALIGN + 5 :]
    view.release()
    mm.close()
