"""Scale a factor and round it once to its own dtype, in numpy (no torch), into reusable scratch.

The slice writer scales ``B[:, :k]`` by ``s(k)`` for every module of a baked slice; doing that
in numpy over one preallocated scratch buffer keeps it allocation-free and torch-free. The
result equals torch's ``(b.float() * factor).to(dtype)``: float32 arithmetic (float64 for a
float64 tensor), one round-to-nearest-even.

bfloat16 is handled as its uint16 bit patterns: bits → float32 (shift left 16), scale, add the
rounding carry, shift back. That needs two uint32 work arrays (the value and its carry) and the
uint16 result; :data:`BF16_LAYOUT` names where each lives in the scratch, and
:func:`scratch_bytes` is computed from the same layout, so the two cannot disagree.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import NonFiniteOutputError

#: numpy type of each float dtype's elements; bfloat16 is handled as its uint16 bit patterns.
NUMPY_TYPES: dict[str, type[np.generic]] = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16}

#: The parts of the scratch buffer for a bfloat16 result, in order: (name, element type).
BF16_LAYOUT: tuple[tuple[str, type[np.generic]], ...] = (("value", np.uint32), ("carry", np.uint32), ("result", np.uint16))
#: The parts for a float16 result: the float32 product, then the rounded result.
F16_LAYOUT: tuple[tuple[str, type[np.generic]], ...] = (("value", np.float32), ("result", np.float16))


#: The smallest magnitude that rounds to infinity in each dtype, from float32 or float64 values
#: (round to nearest even: the largest finite value plus half its last place; a tie rounds up,
#: the largest finite value being odd). Every value below it in magnitude stays finite.
ROUNDS_TO_INF: dict[str, float] = {"F64": math.inf, "F32": 2.0**128 - 2.0**103, "BF16": 2.0**128 - 2.0**119, "F16": 65520.0}
#: Readable names of the safetensors float dtypes, for messages.
DTYPE_NAMES: dict[str, str] = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def finite_in(values: np.ndarray, dtype: str) -> bool:
    """Whether every element of ``values`` (float32 or float64, before rounding) stays finite once
    rounded to ``dtype``: no NaN, no infinity, none beyond the dtype's range. Two reductions
    (NaN propagates through both), no copy: cheap next to the arithmetic that made ``values``."""
    if values.size == 0:
        return True
    limit = ROUNDS_TO_INF[dtype]
    return -limit < float(values.min()) and float(values.max()) < limit


def _layout_bytes(layout: tuple[tuple[str, type[np.generic]], ...], n: int) -> int:
    return sum(n * np.dtype(t).itemsize for _, t in layout)


def scratch_bytes(out_features: int, k: int) -> int:
    """Size of the scratch :func:`scaled_copy` needs for a ``[out_features, k]`` result of any dtype."""
    n = out_features * k
    return max(_layout_bytes(BF16_LAYOUT, n), _layout_bytes(F16_LAYOUT, n), n * 8)


def _parts(scratch: np.ndarray | None, layout: tuple[tuple[str, type[np.generic]], ...], shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """Arrays of ``shape`` for each part of ``layout``: consecutive views of ``scratch``, or new arrays."""
    n = shape[0] * shape[1]
    out: dict[str, np.ndarray] = {}
    at = 0
    for name, t in layout:
        size = n * np.dtype(t).itemsize
        out[name] = np.empty(shape, t) if scratch is None else scratch[at: at + size].view(t).reshape(shape)
        at += size
    return out


def scaled_copy(b: np.ndarray, dtype: str, factor: float | None, scratch: np.ndarray | None = None,
                name: str = "B", path: object = None) -> np.ndarray:
    """``factor · b`` (or a contiguous copy of ``b`` when ``factor`` is None), rounded once to ``dtype``.

    ``b`` holds elements of safetensors dtype ``dtype`` (bfloat16 as uint16 bits). With
    ``scratch`` (a uint8 array of at least :func:`scratch_bytes` bytes) the result is a view of
    it, valid until the scratch is used again; without, it is a new array. The product is
    checked (:func:`finite_in`) before it is rounded, in the same pass.

    Raises:
        NonFiniteOutputError: ``factor · b`` is infinite or NaN in ``dtype`` (naming tensor ``name`` of file ``path``).
    """
    shape = (b.shape[0], b.shape[1])
    if factor is None:
        out = _parts(scratch, (("result", b.dtype.type),), shape)["result"]
        np.copyto(out, b)
        return out
    if dtype == "BF16":  # bits → float32, scale, round to nearest even, back to bits
        p = _parts(scratch, BF16_LAYOUT, shape)
        u, carry = p["value"], p["carry"]
        np.left_shift(b, 16, out=u, dtype=np.uint32)
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused just below, not warned about
            np.multiply(u.view(np.float32), np.float32(factor), out=u.view(np.float32))
        _check_product(u.view(np.float32), dtype, factor, name, path)
        np.right_shift(u, 16, out=carry)
        np.bitwise_and(carry, 1, out=carry)
        np.add(carry, np.uint32(0x7FFF), out=carry)
        np.add(u, carry, out=u)
        np.right_shift(u, 16, out=u)
        np.copyto(p["result"], u, casting="unsafe")
        return p["result"]
    if dtype == "F16":
        p = _parts(scratch, F16_LAYOUT, shape)
        with np.errstate(over="ignore", invalid="ignore"):
            np.multiply(b, np.float32(factor), out=p["value"], dtype=np.float32)
        _check_product(p["value"], dtype, factor, name, path)
        np.copyto(p["result"], p["value"], casting="same_kind")
        return p["result"]
    out = _parts(scratch, (("result", b.dtype.type),), shape)["result"]  # F32, F64: in their own precision
    with np.errstate(over="ignore", invalid="ignore"):
        np.multiply(b, b.dtype.type(factor), out=out)
    _check_product(out, dtype, factor, name, path)
    return out


def _check_product(values: np.ndarray, dtype: str, factor: float, name: str, path: object) -> None:
    if not finite_in(values, dtype):
        where = f"{path}: " if path is not None else ""
        raise NonFiniteOutputError(
            f"{where}tensor {name!r} times its scale {factor:g} has infinite or NaN values in {DTYPE_NAMES.get(dtype, dtype)}: "
            "the scale or the weights are too large for it; nothing was written", path=path, tensor=name)  # type: ignore[arg-type]
