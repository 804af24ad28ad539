"""The streaming safetensors writer: exact files (read back by the real ``safetensors``), partial
system-call writes handled, and every way to misuse it refused with a clear error."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import mlora_export.io.safetensors as sio
from mlora_export.io.safetensors import SafetensorsWriter, dtype_name, write_safetensors


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(3, 5, generator=gen),
        "b": torch.randn(7, generator=gen).to(torch.bfloat16),
        "c": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "d": torch.tensor([True, False, True]),
        "e": torch.randn(4, 2, generator=gen).to(torch.float16),
    }


def _specs(tensors: dict[str, torch.Tensor]) -> list[tuple[str, str, tuple[int, ...]]]:
    return [(k, dtype_name(t.dtype), tuple(t.shape)) for k, t in tensors.items()]


def test_writer_round_trip_mixed_inputs(tmp_path: Path) -> None:
    """Torch tensors, numpy arrays and raw bytes, several per call: the file reads back exactly,
    with the metadata, and ``bytes_written`` is the file size."""
    tensors = _tensors()
    path = tmp_path / "w.safetensors"
    with SafetensorsWriter(path, _specs(tensors), {"format": "pt"}) as w:
        w.write(tensors["a"], tensors["b"].view(torch.uint16).numpy())  # bfloat16 as its bit patterns
        w.write(tensors["c"].numpy().tobytes())
        w.write(tensors["d"], memoryview(tensors["e"].view(torch.uint8).numpy()))
    assert w.bytes_written == path.stat().st_size
    back = load_file(str(path))
    assert set(back) == set(tensors)
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t), k
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    # write_safetensors is the same writer over an iterable
    assert write_safetensors(tmp_path / "v.safetensors", _specs(tensors), tensors.values(), {"format": "pt"}) == w.bytes_written
    assert (tmp_path / "v.safetensors").read_bytes() == path.read_bytes()


def test_partial_system_call_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``pwritev`` may write fewer bytes than asked (a signal, a file over 2 GiB): the writer goes
    on from the exact byte where it stopped, across buffer boundaries."""
    real = os.pwritev
    calls = {"n": 0}

    def short_pwritev(fd: int, buffers: list[memoryview], offset: int) -> int:
        calls["n"] += 1
        budget, out = 5, []
        for b in buffers:  # at most 5 bytes per call, often ending inside a buffer
            take = memoryview(b)[:budget]
            out.append(take)
            budget -= take.nbytes
            if not budget:
                break
        return real(fd, out, offset)

    monkeypatch.setattr(sio.os, "pwritev", short_pwritev)
    tensors = _tensors()
    path = tmp_path / "w.safetensors"
    with SafetensorsWriter(path, _specs(tensors)) as w:
        w.write(*tensors.values())
    assert calls["n"] > len(tensors)
    back = load_file(str(path))
    assert all(torch.equal(back[k], t) for k, t in tensors.items())


def test_positional_writes_from_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``write_at`` puts each tensor at its place whatever the order and thread, also where the
    platform has no ``pwritev`` (seek and write under a lock)."""
    import threading

    tensors = _tensors()
    names = list(tensors)
    want = None
    for positional in (True, False):
        if not positional:
            monkeypatch.delattr(sio.os, "pwritev")
        path = tmp_path / f"p{positional}.safetensors"
        with SafetensorsWriter(path, _specs(tensors)) as w:
            threads = [threading.Thread(target=w.write_at, args=(i, tensors[n])) for i, n in reversed(list(enumerate(names)))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            w.write_at(0)  # nothing: harmless
        assert w.bytes_written == path.stat().st_size
        back = load_file(str(path))
        assert all(torch.equal(back[k], t) for k, t in tensors.items())
        want = want or path.read_bytes()
        assert path.read_bytes() == want


def test_writer_refuses_misuse(tmp_path: Path) -> None:
    tensors = _tensors()
    specs = _specs(tensors)
    with pytest.raises(ValueError, match=r"tensor 'a' is F16\[3, 5\], spec says F32\[3, 5\]"):
        with SafetensorsWriter(tmp_path / "1", specs) as w:
            w.write(tensors["a"].half())
    with pytest.raises(ValueError, match="tensor 'a' has 8 bytes, expected 60"):
        with SafetensorsWriter(tmp_path / "2", specs) as w:
            w.write(np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="no data for tensor 'c'"):
        with SafetensorsWriter(tmp_path / "3", specs) as w:
            w.write(tensors["a"], tensors["b"])
    with pytest.raises(ValueError, match="more tensors than specs"):
        with SafetensorsWriter(tmp_path / "4", specs[:1]) as w:
            w.write(tensors["a"], tensors["b"])
    w = SafetensorsWriter(tmp_path / "5", specs[:1])
    w.write(tensors["a"])
    assert w.close() == w.close()  # closing twice is harmless
    with pytest.raises(ValueError, match="closed"):
        w.write(tensors["a"])
    with pytest.raises(ValueError, match="more tensors than specs"):
        write_safetensors(tmp_path / "6", specs[:1], [tensors["a"], tensors["b"]])
    with pytest.raises(ValueError, match="index -1 is negative"):
        with SafetensorsWriter(tmp_path / "8", specs) as w:
            w.write_at(-1, tensors["a"])
    with pytest.raises(ValueError, match="tensor 'b' is written twice"):
        with SafetensorsWriter(tmp_path / "7", specs) as w:
            w.write_at(1, tensors["b"])
            w.write_at(0, tensors["a"], tensors["b"])


def test_writer_closes_its_file_on_error(tmp_path: Path) -> None:
    """An exception inside the block closes the (incomplete) file without masking the error."""
    before = len(os.listdir("/proc/self/fd")) if Path("/proc/self/fd").exists() else None
    with pytest.raises(RuntimeError, match="boom"):
        with SafetensorsWriter(tmp_path / "x", _specs(_tensors())) as w:
            w.write(_tensors()["a"])
            raise RuntimeError("boom")
    if before is not None:
        assert len(os.listdir("/proc/self/fd")) == before


def test_disk_space_is_reserved_up_front(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the file system can, the whole file's blocks are reserved when the writer opens it,
    but its size grows only with the data (a cut-short file reads as truncated); a full disk fails
    there, naming the file; a file system that cannot preallocate just writes as usual."""
    import ctypes
    import errno

    tensors = {"big": torch.zeros(1 << 18)}  # 1 MiB
    fallocate = sio._fallocate()
    probe = tmp_path / "probe"
    with open(probe, "wb") as f:  # can this file system preallocate (ext4, xfs, btrfs, tmpfs: yes)?
        can_reserve = fallocate is not None and fallocate(f.fileno(), 1, 0, 4096) == 0
    path = tmp_path / "w.safetensors"
    with SafetensorsWriter(path, _specs(tensors)) as w:
        assert path.stat().st_size < 1 << 10  # just the header so far
        if can_reserve:
            assert path.stat().st_blocks * 512 >= 1 << 20  # but the blocks of the whole file are reserved
        w.write(tensors["big"])
    assert path.stat().st_size == w.bytes_written and torch.equal(load_file(str(path))["big"], tensors["big"])

    def failing(code: int):  # type: ignore[no-untyped-def]
        def fallocate(fd: int, mode: int, offset: int, size: int) -> int:
            assert mode == 1 and offset == 0 and size == w.bytes_written  # FALLOC_FL_KEEP_SIZE, the whole file
            ctypes.set_errno(code)
            return -1
        return lambda: fallocate

    monkeypatch.setattr(sio, "_fallocate", failing(errno.ENOSPC))
    with pytest.raises(OSError, match="No space left on device") as info:
        SafetensorsWriter(tmp_path / "full.safetensors", _specs(tensors))
    assert info.value.filename == str(tmp_path / "full.safetensors")
    monkeypatch.setattr(sio, "_fallocate", failing(errno.EOPNOTSUPP))
    with SafetensorsWriter(tmp_path / "plain.safetensors", _specs(tensors)) as w2:
        w2.write(tensors["big"])
    assert (tmp_path / "plain.safetensors").read_bytes() == path.read_bytes()
