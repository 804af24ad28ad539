"""The O_DIRECT appender: exact bytes at any size, and the page-cache fallback where direct I/O is refused."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest

from mlora_export import direct_io
from mlora_export.direct_io import STAGE_BYTES, DirectAppender
from mlora_export.safetensors_io import read_header, write_safetensors


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
