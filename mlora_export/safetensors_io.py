"""Small, exact safetensors I/O: read headers without loading data, stream tensors to disk.

:func:`write_safetensors` writes the header first and then each tensor as it is produced, so a
file larger than memory can be written one tensor at a time, in a chosen tensor order.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import InvalidAdapterError

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


def read_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Parse the header of a safetensors file without reading tensor data.

    Tensors are returned in the order of their data offsets (the order they were written in).

    Raises:
        InvalidAdapterError: the file is too short, the header is not valid JSON, or the
            declared offsets do not fit the file (a truncated download, say).
    """
    p = Path(path)
    size = p.stat().st_size
    with open(p, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise InvalidAdapterError(f"{p}: not a safetensors file ({size} bytes, header missing); re-download or re-save it")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100 * 2**20:
            raise InvalidAdapterError(f"{p}: corrupt safetensors header (declares {n} header bytes in a {size}-byte file); re-download or re-save it")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InvalidAdapterError(f"{p}: corrupt safetensors header ({e}); re-download or re-save it") from e
    if not isinstance(header, dict):
        raise InvalidAdapterError(f"{p}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None)
    infos: list[TensorInfo] = []
    data_len = size - 8 - n
    for name, entry in header.items():
        try:
            begin, end = (int(x) for x in entry["data_offsets"])
            info = TensorInfo(name, str(entry["dtype"]), tuple(int(s) for s in entry["shape"]), begin, end)
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidAdapterError(f"{p}: corrupt safetensors entry for tensor {name!r}") from e
        expected = DTYPE_SIZES.get(info.dtype)
        numel = 1
        for s in info.shape:
            numel *= s
        if expected is not None and numel * expected != info.nbytes:
            raise InvalidAdapterError(f"{p}: tensor {name!r} declares shape {list(info.shape)} but {info.nbytes} bytes")
        if not 0 <= begin <= end <= data_len:
            raise InvalidAdapterError(
                f"{p}: tensor {name!r} lies past the end of the file (file truncated?); re-download or re-save it"
            )
        infos.append(info)
    infos.sort(key=lambda i: (i.begin, i.end))
    return SafetensorsHeader({i.name: i for i in infos}, metadata, 8 + n)


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


def find_non_finite(buffer: Any, header: SafetensorsHeader, chunk_elements: int = 1 << 22) -> str | None:
    """The name of the first float tensor in ``buffer`` (a whole safetensors file, e.g. an
    ``mmap``) holding a NaN or an infinity, or ``None``.

    A NaN or infinity anywhere makes a tensor's sum non-finite, so a finite sum (one fast,
    allocation-free pass) proves every element finite; only a non-finite sum (which a finite
    tensor reaches only by overflow) and bfloat16 tensors take the exact test of the exponent
    bits, in chunks of ``chunk_elements``. Non-float tensors are skipped.
    """
    for info in header.tensors.values():
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


def _header_bytes(specs: Iterable[tuple[str, str, tuple[int, ...]]], metadata: Mapping[str, str] | None) -> tuple[bytes, list[int]]:
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
    return memoryview(t.view(torch.uint8).numpy())


@dataclass(frozen=True)
class FileRange:
    """Bytes ``[offset, offset + length)`` of an open file, copied in the kernel (``copy_file_range``)."""

    fd: int
    offset: int
    length: int


def _write_all(fd: int, data: memoryview) -> None:
    while data.nbytes:
        n = os.write(fd, data)
        data = data[n:]


def _copy_range(src: FileRange, dst_fd: int) -> None:
    offset, left = src.offset, src.length
    if hasattr(os, "copy_file_range"):
        try:
            while left:
                n = os.copy_file_range(src.fd, dst_fd, left, offset)
                if n == 0:
                    raise ValueError(f"source file ended {left} bytes early")
                offset, left = offset + n, left - n
            return
        except OSError:  # cross-device on old kernels, unsupported file systems: fall back
            pass
    while left:
        chunk = os.pread(src.fd, min(left, 64 * 2**20), offset)
        if not chunk:
            raise ValueError(f"source file ended {left} bytes early")
        _write_all(dst_fd, memoryview(chunk))
        offset, left = offset + len(chunk), left - len(chunk)


def write_safetensors(
    path: str | os.PathLike[str],
    specs: list[tuple[str, str, tuple[int, ...]]],
    tensors: Iterable["torch.Tensor | bytes | memoryview | np.ndarray | FileRange"],
    metadata: Mapping[str, str] | None = None,
) -> int:
    """Write a safetensors file whose tensors are produced one at a time.

    ``specs`` lists ``(name, dtype name, shape)`` in the order the data is laid out; ``tensors``
    yields each tensor, its raw bytes (any contiguous buffer, e.g. a numpy array), or a
    :class:`FileRange` to copy from another file (in the kernel, without passing through Python),
    in that same order. Only one tensor is held at a time.
    Returns the number of bytes written.

    Raises:
        ValueError: a produced tensor does not match its spec, or counts differ.
    """
    head, sizes = _header_bytes(specs, metadata)
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, memoryview(head))
        written += len(head)
        it = iter(tensors)
        for (name, dtype, shape), nbytes in zip(specs, sizes):
            try:
                item = next(it)
            except StopIteration:
                raise ValueError(f"write_safetensors: no data for tensor {name!r}") from None
            if isinstance(item, FileRange):
                if item.length != nbytes:
                    raise ValueError(f"write_safetensors: tensor {name!r} has {item.length} bytes, expected {nbytes}")
                _copy_range(item, fd)
                written += nbytes
                continue
            if isinstance(item, (bytes, bytearray, memoryview, np.ndarray)):
                data = memoryview(item).cast("B")
            else:
                if tuple(item.shape) != tuple(shape) or dtype_name(item.dtype) != dtype:
                    raise ValueError(
                        f"write_safetensors: tensor {name!r} is {dtype_name(item.dtype)}{list(item.shape)}, spec says {dtype}{list(shape)}"
                    )
                data = tensor_bytes(item)
            if data.nbytes != nbytes:
                raise ValueError(f"write_safetensors: tensor {name!r} has {data.nbytes} bytes, expected {nbytes}")
            _write_all(fd, data)
            written += nbytes
        if next(it, None) is not None:
            raise ValueError("write_safetensors: more tensors than specs")
    finally:
        os.close(fd)
    return written


def save_tensors(
    path: str | os.PathLike[str], tensors: Mapping[str, "torch.Tensor"], metadata: Mapping[str, str] | None = None
) -> int:
    """Write an in-memory mapping of tensors, in the mapping's order (see :func:`write_safetensors`)."""
    specs = [(k, dtype_name(t.dtype), tuple(t.shape)) for k, t in tensors.items()]
    return write_safetensors(path, specs, tensors.values(), metadata)
