"""Small, exact safetensors I/O: read headers without loading data, stream tensors to disk.

:class:`SafetensorsWriter` writes the header first and then each tensor as it is produced, so
a file larger than memory can be written one tensor at a time, in a chosen tensor order. A
file's layout is a list of :class:`TensorSpec` (name, dtype name, shape), in file order.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import os
import struct
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from ..errors import InvalidAdapterError
from .files import check_regular_file
from .jsonio import JsonFault, loads
from ..validate import is_int

if TYPE_CHECKING:
    import torch

#: safetensors dtype names and their sizes in bytes.
DTYPE_SIZES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}


def _torch_dtype_names() -> dict[Any, str]:
    import torch

    names = {
        torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
        torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
        torch.uint8: "U8", torch.bool: "BOOL",
    }
    for attr, name in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
        if hasattr(torch, attr):
            names[getattr(torch, attr)] = name
    return names


def dtype_name(dtype: "torch.dtype") -> str:
    """The safetensors name (``"F32"``, ``"BF16"``…) of a torch dtype."""
    try:
        return _torch_dtype_names()[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot be stored in safetensors") from None


def torch_dtype(name: str) -> "torch.dtype":
    """The torch dtype of a safetensors dtype name."""
    for dt, n in _torch_dtype_names().items():
        if n == name:
            return dt
    raise ValueError(f"safetensors dtype {name!r} has no torch equivalent here")


class TensorSpec(NamedTuple):
    """One tensor of a file to write: its name, safetensors dtype name (``"F32"``…) and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """The tensor's size in bytes."""
        n = DTYPE_SIZES[self.dtype]
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class TensorInfo:
    """One entry of a safetensors header: name, dtype name, shape and byte range in the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class SafetensorsHeader:
    """The parsed header of a safetensors file: tensors in file order, metadata, data offset."""

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] | None
    data_start: int


#: Size in bits of every dtype the safetensors format defines (sub-byte formats included), to
#: check headers against; :data:`DTYPE_SIZES` lists those this package reads and writes.
DTYPE_BITS: dict[str, int] = {
    **{name: 8 * size for name, size in DTYPE_SIZES.items()},
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "C64": 64,
}

#: The largest header the safetensors library accepts.
MAX_HEADER_BYTES = 100 * 2**20


def _nonneg_int(value: Any) -> bool:
    return is_int(value) and value >= 0


def parse_header(raw: bytes, data_len: int, source: str = "safetensors file") -> SafetensorsHeader:
    """Validate the JSON header ``raw`` of a safetensors file whose data section has
    ``data_len`` bytes, as strictly as the safetensors library does (and refusing duplicate
    names, which it lets pass): a JSON object; ``__metadata__``, if present, a string → string
    object; each tensor a known dtype, a list of non-negative integer dimensions and two integer
    ``data_offsets`` whose span is exactly ``dtype × shape``; the tensors, in offset order, tile
    the data section from 0 to its end with no gap or overlap.

    Raises:
        InvalidAdapterError: naming ``source`` and the first fault.
    """
    def bad(what: str) -> InvalidAdapterError:
        return InvalidAdapterError(f"{source}: corrupt safetensors header ({what}); re-download or re-save it")

    try:
        header = loads(raw)
    except JsonFault as e:
        if e.kind == "duplicate":
            raise bad(f"the name {str(e.key)[:80]!r} appears twice") from None
        raise bad(e.detail[:200] if e.kind in ("syntax", "encoding") else e.detail[:120]) from None
    if not isinstance(header, dict):
        raise bad(f"a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise bad("__metadata__ must be an object of strings")
    infos: list[TensorInfo] = []
    for name, entry in header.items():
        label = repr(name[:80])
        if not isinstance(entry, dict):
            raise bad(f"the entry of tensor {label} is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
            raise bad(f"tensor {label} has unknown dtype {str(dtype)[:20]!r}")
        if not isinstance(shape, list) or not all(_nonneg_int(d) for d in shape):
            raise bad(f"tensor {label} needs a shape of non-negative integers, found {str(shape)[:60]}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_nonneg_int(o) for o in offsets)):
            raise bad(f"tensor {label} needs data_offsets [begin, end] of two non-negative integers, found {str(offsets)[:60]}")
        begin, end = offsets
        if begin > end:
            raise bad(f"tensor {label} has data_offsets {offsets}: begin after end")
        if end > data_len:
            raise InvalidAdapterError(
                f"{source}: tensor {name!r} lies past the end of the file (file truncated?); re-download or re-save it"
            )
        bits = DTYPE_BITS[dtype]
        for d in shape:
            bits *= d
        if bits % 8 or bits // 8 != end - begin:
            raise InvalidAdapterError(f"{source}: tensor {name!r} declares {dtype} shape {shape} but {end - begin} bytes")
        infos.append(TensorInfo(name, dtype, tuple(shape), begin, end))
    infos.sort(key=lambda i: (i.begin, i.end))
    at = 0
    for info in infos:
        if info.begin != at:
            what = "overlaps the one before it" if info.begin < at else f"leaves a gap of {info.begin - at} bytes before it"
            raise bad(f"tensor {info.name[:80]!r} at offset {info.begin} {what}")
        at = info.end
    if at != data_len:
        raise bad(f"the tensors cover {at} of the {data_len} data bytes")
    return SafetensorsHeader({i.name: i for i in infos}, metadata, 8 + len(raw))


def read_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Parse the header of a safetensors file without reading tensor data (see :func:`parse_header`).

    Tensors are returned in the order of their data offsets (the order they were written in).

    Raises:
        InvalidAdapterError: the path is not a regular file, the file is too short, the header
            is not valid JSON or breaks the format, or the declared offsets do not fit the file
            (a truncated download, say).
    """
    p = Path(path)
    size = check_regular_file(p, InvalidAdapterError, what="safetensors file").st_size
    with open(p, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise InvalidAdapterError(f"{p}: not a safetensors file ({size} bytes, header missing); re-download or re-save it", path=p)
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > MAX_HEADER_BYTES:
            raise InvalidAdapterError(f"{p}: corrupt safetensors header (declares {n} header bytes in a {size}-byte file); re-download or re-save it", path=p)
        raw = f.read(n)
    return parse_header(raw, size - 8 - n, str(p))


#: For each float dtype: the unsigned type of its bit pattern and its exponent mask. A value is
#: NaN or infinite exactly when every exponent bit is set, so one integer test covers every format
#: (bfloat16 included, which numpy has no float type for) without converting anything.
_EXPONENT_MASKS: dict[str, tuple[type[np.unsignedinteger[Any]], int]] = {
    "F64": (np.uint64, 0x7FF0000000000000), "F32": (np.uint32, 0x7F800000),
    "F16": (np.uint16, 0x7C00), "BF16": (np.uint16, 0x7F80),
}


#: Float dtypes numpy can sum, with the accumulator used (float16 sums overflow too early).
_SUMMABLE: dict[str, tuple[type[np.floating[Any]], type[np.floating[Any]]]] = {
    "F64": (np.float64, np.float64), "F32": (np.float32, np.float32), "F16": (np.float16, np.float32),
}


def find_non_finite(
    buffer: Any, header: SafetensorsHeader, chunk_elements: int = 1 << 22, names: Iterable[str] | None = None
) -> str | None:
    """The name of the first float tensor in ``buffer`` (a whole safetensors file, e.g. an
    ``mmap``) holding a NaN or an infinity, or ``None``; ``names`` limits the search to those
    tensors (in that order), so several threads can share the work.

    A NaN or infinity anywhere makes a tensor's sum non-finite, so a finite sum (one fast,
    allocation-free pass) proves every element finite; only a non-finite sum (which a finite
    tensor reaches only by overflow) and bfloat16 tensors take the exact test of the exponent
    bits, in chunks of ``chunk_elements``. Non-float tensors are skipped.
    """
    infos = header.tensors.values() if names is None else (header.tensors[n] for n in names)
    for info in infos:
        spec = _EXPONENT_MASKS.get(info.dtype)
        if spec is None or info.nbytes == 0:
            continue
        offset = header.data_start + info.begin
        if info.dtype in _SUMMABLE:
            ftype, acc = _SUMMABLE[info.dtype]
            values = np.frombuffer(buffer, dtype=ftype, count=info.nbytes // np.dtype(ftype).itemsize, offset=offset)
            with np.errstate(over="ignore", invalid="ignore"):  # overflow is handled below
                finite = bool(np.isfinite(values.sum(dtype=acc)))
            del values  # release the export of ``buffer`` so an mmap can be closed
            if finite:
                continue
        utype, mask_value = spec
        mask = utype(mask_value)
        count = info.nbytes // np.dtype(utype).itemsize
        bits = np.frombuffer(buffer, dtype=utype, count=count, offset=offset)
        try:
            scratch = np.empty(min(count, chunk_elements), dtype=utype)
            for start in range(0, count, chunk_elements):
                out = scratch[: min(chunk_elements, count - start)]
                np.bitwise_and(bits[start:start + chunk_elements], mask, out=out)
                if (out == mask).any():
                    return info.name
        finally:
            del bits
    return None


def _header_bytes(specs: Iterable[TensorSpec], metadata: Mapping[str, str] | None) -> tuple[bytes, list[int]]:
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    sizes: list[int] = []
    for name, dtype, shape in specs:
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * DTYPE_SIZES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        sizes.append(nbytes)
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, sizes


def tensor_bytes(t: "torch.Tensor") -> memoryview:
    """The raw little-endian bytes of a CPU tensor, without a copy when it is contiguous."""
    import torch

    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    return t.view(torch.uint8).numpy().data


@functools.cache
def _fallocate() -> Callable[[int, int, int, int], int] | None:
    """Linux's ``fallocate(2)`` through the C library, or ``None`` elsewhere. Not
    ``os.posix_fallocate``: where the file system cannot preallocate, glibc emulates it by
    writing every block, which would double the writing."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = getattr(libc, "fallocate64", None) or libc.fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


#: ``fallocate`` mode: reserve blocks, leave the file's size alone.
_FALLOC_FL_KEEP_SIZE = 1


def _preallocate(fd: int, size: int, path: Path) -> None:
    """Reserve the disk blocks of a new file of ``size`` bytes in one call, where the file system
    can: the writes that follow skip delayed allocation (about a third faster on ext4), and a
    full disk fails here, before any data is written. The file's size still grows only as data is
    written, so a file whose writing was cut short reads as truncated, not as zeros. Elsewhere the
    writes proceed as usual.

    Raises:
        OSError: ``ENOSPC`` or ``EDQUOT``, the disk or the quota is full.
    """
    fallocate = _fallocate()
    if fallocate is None or size <= 0:
        return
    if fallocate(fd, _FALLOC_FL_KEEP_SIZE, 0, size) != 0:
        err = ctypes.get_errno()
        if err in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(err, os.strerror(err), str(path))
        # EOPNOTSUPP, ENOSYS, EINVAL...: this file system does not preallocate; nothing to do


def _pwrite_all(fd: int, buffers: list[memoryview], offset: int, lock: threading.Lock) -> None:
    """Write ``buffers`` back to back at ``offset`` of ``fd``, whatever the file position, until
    every byte is written (one call may write only part: a signal, over 2 GiB)."""
    buffers = [b for b in buffers if b.nbytes]
    if not hasattr(os, "pwritev"):  # platforms without positional writes: seek and write, one thread at a time
        with lock:
            os.lseek(fd, offset, os.SEEK_SET)
            for b in buffers:
                while b.nbytes:
                    b = b[os.write(fd, b):]
        return
    while buffers:
        n = os.pwritev(fd, buffers[:1024], offset)  # at most IOV_MAX buffers per call
        offset += n
        while buffers and n >= buffers[0].nbytes:
            n -= buffers[0].nbytes
            buffers.pop(0)
        if n:
            buffers[0] = buffers[0][n:]


def data_offsets(specs: list[TensorSpec], metadata: Mapping[str, str] | None = None) -> list[int]:
    """File offset of each tensor's first byte in the file :func:`write_safetensors` writes from
    ``specs`` and ``metadata`` (for buffers placed to be written without a copy)."""
    head, sizes = _header_bytes(specs, metadata)
    offsets, at = [], len(head)
    for size in sizes:
        offsets.append(at)
        at += size
    return offsets


def _item_bytes(path: Path, spec: TensorSpec, size: int, item: Any) -> memoryview:
    """The bytes of one tensor to write (a torch tensor, or its raw bytes as any contiguous buffer), checked against its spec."""
    name, dtype, shape = spec
    if isinstance(item, (bytes, bytearray, memoryview, np.ndarray)):
        data = (item.data if isinstance(item, np.ndarray) else memoryview(item)).cast("B")
    else:
        if tuple(item.shape) != tuple(shape) or dtype_name(item.dtype) != dtype:
            raise ValueError(f"{path}: tensor {name!r} is {dtype_name(item.dtype)}{list(item.shape)}, spec says {dtype}{list(shape)}")
        data = tensor_bytes(item)
    if data.nbytes != size:
        raise ValueError(f"{path}: tensor {name!r} has {data.nbytes} bytes, expected {size}")
    return data


class SafetensorsWriter:
    """Writes one safetensors file tensor by tensor, in the layout of ``specs``.

    ``specs`` lists ``(name, dtype name, shape)`` in the order the data is laid out. The header
    is written at once (and the file's disk space reserved), so each tensor's place in the file
    is known: :meth:`write` appends the next tensors, :meth:`write_at` writes tensors at their
    place in any order, from several threads at once. Only the tensors being written need to be
    in memory. Use it as a context manager: leaving the block normally :meth:`close`\\ s it, which
    checks that every tensor was written; leaving it by an exception just closes the incomplete
    file, for the caller to remove.

    Raises:
        ValueError: a tensor does not match its spec, is written twice, or is missing; or
            there are more tensors than specs.
    """

    def __init__(
        self, path: str | os.PathLike[str], specs: list[TensorSpec], metadata: Mapping[str, str] | None = None
    ) -> None:
        head, self._sizes = _header_bytes(specs, metadata)
        self._specs = specs
        self._offsets = [len(head)]
        for size in self._sizes:
            self._offsets.append(self._offsets[-1] + size)
        self._written = [False] * len(specs)
        self._next = 0
        self._lock = threading.Lock()
        self.path = Path(path)
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _preallocate(self._fd, self._offsets[-1], self.path)
            _pwrite_all(self._fd, [memoryview(head)], 0, self._lock)
        except BaseException:
            self._release()
            raise

    @property
    def bytes_written(self) -> int:
        """Bytes written so far, header included."""
        return self._offsets[0] + sum(size for size, done in zip(self._sizes, self._written, strict=True) if done)

    def write(self, *tensors: "torch.Tensor | bytes | memoryview | np.ndarray") -> None:
        """Append the next ``len(tensors)`` tensors, in one system call."""
        with self._lock:
            index = self._next
            self._next += len(tensors)
        self.write_at(index, *tensors)

    def write_at(self, index: int, *tensors: "torch.Tensor | bytes | memoryview | np.ndarray") -> None:
        """Write ``tensors`` as the specs ``index``, ``index + 1``… (consecutive in the file), in one
        system call. Each is a torch tensor, or its raw little-endian bytes as any contiguous
        buffer (a numpy array, say)."""
        if self._fd is None:
            raise ValueError(f"{self.path}: the writer is closed")
        if index < 0:
            raise ValueError(f"{self.path}: tensor index {index} is negative")
        buffers = []
        for i, item in enumerate(tensors, start=index):
            if i >= len(self._specs):
                raise ValueError(f"{self.path}: more tensors than specs")
            buffers.append(_item_bytes(self.path, self._specs[i], self._sizes[i], item))
        with self._lock:
            if self._fd is None:
                raise ValueError(f"{self.path}: the writer is closed")
            twice = [self._specs[i][0] for i in range(index, index + len(buffers)) if self._written[i]]
            if twice:
                raise ValueError(f"{self.path}: tensor {twice[0]!r} is written twice")
            for i in range(index, index + len(buffers)):
                self._written[i] = True
            fd = self._fd
        _pwrite_all(fd, buffers, self._offsets[index], self._lock)

    def close(self) -> int:
        """Close the file after checking that every tensor was written; return the bytes written."""
        if self._fd is not None:
            self._release()
            missing = [name for (name, _, _), done in zip(self._specs, self._written, strict=True) if not done]
            if missing:
                raise ValueError(f"{self.path}: no data for tensor {missing[0]!r}")
        return self.bytes_written

    def _release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self._release()


def write_safetensors(
    path: str | os.PathLike[str],
    specs: list[TensorSpec],
    tensors: Iterable["torch.Tensor | bytes | memoryview | np.ndarray"],
    metadata: Mapping[str, str] | None = None,
    *,
    direct: bool = False,
) -> int:
    """Write a safetensors file whose tensors are produced one at a time, in the order of
    ``specs``, holding only one in memory (see :class:`SafetensorsWriter`).

    With ``direct`` the file is written past the page cache where the file system allows it
    (:class:`~mlora_export.direct_io.DirectAppender`): for large outputs written once, such as a
    merged model, it saves the writer most of its system CPU.

    Returns the bytes written.

    Raises:
        ValueError: a produced tensor does not match its spec, or counts differ.
    """
    if direct:
        return _write_direct(Path(path), specs, tensors, metadata)
    with SafetensorsWriter(path, specs, metadata) as writer:
        for item in tensors:
            writer.write(item)
    return writer.bytes_written


def save_tensors(
    path: str | os.PathLike[str], tensors: Mapping[str, "torch.Tensor"], metadata: Mapping[str, str] | None = None
) -> int:
    """Write an in-memory mapping of tensors, in the mapping's order (see :func:`write_safetensors`)."""
    specs = [TensorSpec(k, dtype_name(t.dtype), tuple(t.shape)) for k, t in tensors.items()]
    return write_safetensors(path, specs, tensors.values(), metadata)


def _write_direct(
    path: Path,
    specs: list[TensorSpec],
    tensors: Iterable["torch.Tensor | bytes | memoryview | np.ndarray"],
    metadata: Mapping[str, str] | None,
) -> int:
    """:func:`write_safetensors` through a :class:`~mlora_export.direct_io.DirectAppender`."""
    from .direct_io import DirectAppender

    head, sizes = _header_bytes(specs, metadata)
    total = len(head) + sum(sizes)
    lock = threading.Lock()
    out = DirectAppender(path, pwrite=lambda fd, buffers, offset: _pwrite_all(fd, buffers, offset, lock))
    try:
        _preallocate(out.fd, total, path)
        out.write(memoryview(head))
        count = 0
        for item in tensors:
            if count >= len(specs):
                raise ValueError(f"{path}: more tensors than specs")
            out.write(_item_bytes(path, specs[count], sizes[count], item))
            count += 1
        if count != len(specs):
            raise ValueError(f"{path}: no data for tensor {specs[count][0]!r}")
        out.close()
    except BaseException:
        out.abort()
        raise
    return total


__all__ = [
    "DTYPE_BITS", "DTYPE_SIZES", "MAX_HEADER_BYTES", "SafetensorsHeader", "SafetensorsWriter", "TensorInfo", "TensorSpec",
    "data_offsets", "dtype_name", "find_non_finite", "parse_header", "read_header", "save_tensors", "tensor_bytes", "torch_dtype",
    "write_safetensors",
]
