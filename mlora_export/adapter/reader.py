"""Reading rank-``k`` prefixes of the LoRA factors straight from the memory-mapped weights file.

Orientation (PEFT): ``lora_A`` is ``[r, in]``, ``lora_B`` is ``[out, r]``; for a ``Conv1D``
target (``fan_in_fan_out``) the delta is transposed to the base weight's ``[in, out]`` in
:func:`orient_delta`, the one place that knows about it.
"""

from __future__ import annotations

import mmap
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np

from ..io.safetensors import DTYPE_SIZES, SafetensorsHeader
from .files import check_finite
from .rounding import NUMPY_TYPES, scaled_copy

if TYPE_CHECKING:
    import torch


class ReadableAdapter(Protocol):
    """What a reader reads (a :class:`~.folder.NestedAdapter`, which opens readers with its
    ``reader()``): the weights file, its header, the modules' tensor names, the scale."""

    @property
    def weights_path(self) -> Path: ...
    @property
    def header(self) -> SafetensorsHeader: ...
    @property
    def modules(self) -> Mapping[str, Any]: ...
    @property
    def dtype(self) -> str: ...
    @property
    def fan_in_fan_out(self) -> bool: ...
    def scale(self, k: int) -> float: ...


class _Matrix(Protocol):
    """A torch tensor or a numpy array: what has a transpose ``.T``."""

    @property
    def T(self) -> Any: ...  # the name torch and numpy give it


M = TypeVar("M", bound=_Matrix)


def orient_delta(delta: M, fan_in_fan_out: bool) -> M:
    """Return ``delta`` (``[out, in]``, a tensor or an array) in the layout of the base weight:
    transposed for ``Conv1D``."""
    return delta.T if fan_in_fan_out else delta  # type: ignore[no-any-return]


class AdapterReader:
    """Reads rank-``k`` prefixes of LoRA factors from the memory-mapped weights file.

    Tensors are zero-copy views of the file's pages until sliced: ``A[:k]`` reads only its
    first ``k`` rows, ``B[:, :k]`` gathers ``k`` columns into a new contiguous tensor.
    """

    def __init__(self, adapter: ReadableAdapter, mm: "mmap.mmap") -> None:
        self.adapter = adapter
        self._mm = mm

    def _view(self, key: str) -> "torch.Tensor":
        import torch

        from ..io.safetensors import torch_dtype

        info = self.adapter.header.tensors[key]
        dtype = torch_dtype(info.dtype)
        numel = info.nbytes // DTYPE_SIZES[info.dtype]
        with warnings.catch_warnings():  # the map is read-only; we never write through it
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(self._mm, dtype=dtype, count=numel, offset=self.adapter.header.data_start + info.begin)
        return flat.view(info.shape)

    def check_finite(self, modules: Iterable[str] | None = None) -> None:
        """Raise :class:`InvalidAdapterError` if a tensor (of ``modules``, if given) holds a NaN
        or an infinity: the check :meth:`NestedAdapter.load` makes, over this reader's map, so
        that callers can share it out among threads."""
        keys = None
        if modules is not None:
            keys = [key for name in modules for key in (self.adapter.modules[name].key_a, self.adapter.modules[name].key_b)]
        check_finite(self.adapter.weights_path, self.adapter.header, self._mm, keys)

    def lora_A_data(self, module: str, k: int) -> np.ndarray:
        """``A[:k, :]`` as a zero-copy, contiguous view of the map (its rows are consecutive in
        the file; bfloat16 as uint16 bit patterns). Delete it before the reader closes."""
        return self._array(self.adapter.modules[module].key_a)[:k]

    def lora_A(self, module: str, k: int) -> "torch.Tensor":
        """``A[:k, :]`` of ``module`` (``[k, in]``, source dtype), a copy of those rows only."""
        return self._view(self.adapter.modules[module].key_a)[:k].clone()

    def lora_B(self, module: str, k: int) -> "torch.Tensor":
        """``B[:, :k]`` of ``module`` (``[out, k]``, source dtype, contiguous copy)."""
        return self._view(self.adapter.modules[module].key_b)[:, :k].contiguous()

    def _array(self, key: str) -> np.ndarray:
        """A zero-copy numpy view of tensor ``key`` in the map (bfloat16 as uint16 bit patterns)."""
        info = self.adapter.header.tensors[key]
        count = info.nbytes // DTYPE_SIZES[info.dtype]
        flat = np.frombuffer(self._mm, dtype=NUMPY_TYPES[info.dtype], count=count, offset=self.adapter.header.data_start + info.begin)
        return flat.reshape(info.shape)

    def lora_B_data(self, module: str, k: int, factor: float | None = None, scratch: "np.ndarray | None" = None) -> np.ndarray:
        """``B[:, :k]`` (or ``factor · B[:, :k]``) as the raw bytes of a slice file, without torch.

        Scaling is computed in float32 (float64 for a float64 adapter) and rounded once to the
        source dtype, round-to-nearest-even as torch does; the result is contiguous. The unscaled
        full-rank ``B`` is returned as a zero-copy view of the map.

        Raises:
            NonFiniteOutputError: ``factor · B[:, :k]`` overflows the source dtype (or is NaN).

        ``scratch`` (a uint8 array of at least :func:`~.rounding.scratch_bytes` bytes) is where the result is
        computed: a caller writing many tensors from one thread passes the same one each time, so
        no memory is allocated (and page-faulted) per tensor. The result is then a view of it,
        valid until the next call with that scratch.
        """
        key = self.adapter.modules[module].key_b
        info = self.adapter.header.tensors[key]
        if factor is None and k == info.shape[1]:
            return self._array(key)
        b = self._array(key)[:, :k]
        try:
            return scaled_copy(b, info.dtype, factor, scratch, name=key, path=self.adapter.weights_path)
        finally:
            del b  # release the view of the map

    def delta(self, module: str, k: int, dtype: "torch.dtype | None" = None) -> "torch.Tensor":
        """``ΔW_k = s(k) · B[:, :k] · A[:k, :]``, ``[out, in]``, computed in float32 (docs/design.md §1).

        Returns float32 unless ``dtype`` is given (then rounded once to it).
        """
        import torch

        a = self.lora_A(module, k).to(torch.float32)
        b = self.lora_B(module, k).to(torch.float32)
        d = (b * self.adapter.scale(k)) @ a
        return d if dtype is None else d.to(dtype)

    def delta_weight(self, module: str, k: int, dtype: "torch.dtype | None" = None) -> "torch.Tensor":
        """:meth:`delta` oriented like the base weight (transposed for ``Conv1D`` targets)."""
        return orient_delta(self.delta(module, k, dtype), self.adapter.fan_in_fan_out)

