"""Kernels of the streaming merge: ``W + L·R`` summed in float32, rounded once, without torch.

Two implementations of the same definition (docs/design.md §1):

- ``"c"``: the compiled kernel :mod:`mlora_export.converters._merge_ext` (built at install where
  a C compiler is found): each block of 4 × 16 outputs is summed over all ``k`` in registers
  (fused multiply-adds in order, as a BLAS micro-kernel sums them), ``W`` widened and added, and
  the result rounded and stored in the same pass, with the GIL released; AVX2 + FMA + F16C where
  the CPU has them, portable C elsewhere. bfloat16, float16 and float32 in and out; on AVX2 the
  result is bit-identical to torch's ``W.float().addmm(L, R)`` rounded to the output dtype.
- ``"numpy"``: where the extension was not built. The base weight is widened to float32
  (bfloat16 is the top half of a float32: a shift), the rank-``k`` product of a tile is one BLAS
  ``sgemm`` (numpy's OpenBLAS, float32 accumulation), added, and rounded once to the output dtype
  (bfloat16: round-to-nearest-even on the bit pattern, as torch rounds), in tiles of about
  :data:`TILE_ELEMENTS` elements that stay in the L2 cache. bfloat16 and float32 only (numpy's
  float16 casts are scalar code): :func:`supports` says which pairs, the merge uses torch for
  the rest.

Skipping the torch import (about 2 s of start-up, more than the merge's own arithmetic at small
ranks) is what lets a merge approach the speed of copying the files.

Both kernels test, in the same pass, that every value they write is finite in the output dtype
(:func:`merge_tensor` and :func:`cast` return it), so a merge whose scale or weights overflow is
refused without reading the output again.
"""

from __future__ import annotations

import numpy as np

from ..adapter.rounding import finite_in

#: The compiled kernel's interface this module needs: ``merge``/``cast`` return whether what they
#: wrote is finite (a build of an older source returns ``None``, and is not used).
_C_API = 2

try:
    from . import _merge_ext  # type: ignore[attr-defined]  # the compiled kernel (setup.py), no stubs
except ImportError:  # built without a C compiler: the numpy kernels
    _merge_ext = None  # type: ignore[assignment]
if _merge_ext is not None and getattr(_merge_ext, "API", 1) < _C_API:  # a stale build: rebuild it (pip install -e .)
    _merge_ext = None  # type: ignore[assignment]

#: Elements per tile (float32: 256 KiB), sized to leave the tile, its product and the rounding
#: scratch in a 1 MiB L2 cache.
TILE_ELEMENTS = 64 * 1024
#: Widest tile: a GEMM's packed right operand (``k × columns``) stays small next to the tile.
TILE_COLUMNS = 512

#: The kernels available here, best last: ``"numpy"``, and ``"c"`` where the extension was built.
KERNELS: tuple[str, ...] = ("numpy", "c") if _merge_ext is not None else ("numpy",)
#: Which build of the compiled kernel runs on this CPU (``"avx2"`` or ``"generic"``), or None.
C_BUILD: str | None = _merge_ext.builds()[-1] if _merge_ext is not None else None
#: Index of the compiled kernel's best build for this CPU (an argument of its functions).
_C_BUILD_INDEX = len(_merge_ext.builds()) - 1 if _merge_ext is not None else -1
#: The compiled kernel's dtype codes.
_C_CODES = {"F32": 0, "BF16": 1, "F16": 2}
#: The (base dtype, output dtype) pairs the numpy kernels merge.
_NUMPY_PAIRS = {("BF16", "BF16"), ("BF16", "F32"), ("F32", "F32"), ("F32", "BF16")}
#: numpy type of each handled dtype's raw elements (bfloat16 as its uint16 bit patterns).
NUMPY_TYPES: dict[str, type[np.generic]] = {"BF16": np.uint16, "F32": np.float32, "F16": np.float16}


def _kernel(kernel: str | None) -> str:
    """``kernel``, or the best here; an error for one that is not here."""
    if kernel is None:
        return KERNELS[-1]
    if kernel not in KERNELS:
        raise ValueError(f"merge kernel {kernel!r} is not available here (available: {', '.join(KERNELS)})")
    return kernel


def supports(base_dtype: str, out_dtype: str, kernel: str | None = None) -> bool:
    """Whether a ``base_dtype`` weight merges into ``out_dtype`` with ``kernel`` (default: the
    best here); else the caller uses torch."""
    if _kernel(kernel) == "c":
        return base_dtype in _C_CODES and out_dtype in _C_CODES
    return (base_dtype, out_dtype) in _NUMPY_PAIRS


class Scratch:
    """One thread's float32 work tiles (reused for every tile of every tensor)."""

    def __init__(self) -> None:
        self._tile = np.empty(TILE_ELEMENTS, np.float32)
        self._prod = np.empty(TILE_ELEMENTS, np.float32)
        self._bits = np.empty(TILE_ELEMENTS, np.uint32)

    def views(self, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(tile, product, rounding bits)`` of shape ``[rows, cols]``."""
        n = rows * cols
        return (self._tile[:n].reshape(rows, cols), self._prod[:n].reshape(rows, cols), self._bits[:n].reshape(rows, cols))

    def pair_views(self, rows: int, cols: int) -> tuple[np.ndarray, ...]:
        """``(even, odd, even product, odd product, bits)`` of shape ``[rows, cols]`` (``rows × cols`` at most half a tile)."""
        n = rows * cols
        tile, prod = self._tile.view(np.uint32), self._prod
        return tuple(a.reshape(rows, cols) for a in (tile[:n], tile[n : 2 * n], prod[:n], prod[n : 2 * n], self._bits[:n]))


def widen_bf16(bits: np.ndarray, out: np.ndarray) -> None:
    """bfloat16 bit patterns (uint16) → float32 ``out`` (exact: the bits become the top half)."""
    np.left_shift(bits, 16, out=out.view(np.uint32), dtype=np.uint32)


def round_bf16(values: np.ndarray, out: np.ndarray, scratch: np.ndarray) -> None:
    """float32 ``values`` → bfloat16 bit patterns in ``out`` (uint16), round to nearest even.

    The same rounding as torch's ``.to(torch.bfloat16)`` for every finite value and infinities
    (``bits + 0x7FFF + lsb``, then the top half). A NaN stays a NaN (its payload may differ from
    torch's canonical ``0x7FC0``). ``values`` is overwritten; ``scratch`` is uint32 of its shape.
    """
    u = values.view(np.uint32)
    np.right_shift(u, 16, out=scratch)
    np.bitwise_and(scratch, 1, out=scratch)
    np.add(scratch, 0x7FFF, out=scratch)
    np.add(u, scratch, out=u)
    np.right_shift(u, 16, out=out, casting="unsafe")


def as_float32(data: np.ndarray, dtype: str) -> np.ndarray:
    """An adapter factor (raw elements of safetensors ``dtype``) as a new float32 array."""
    if dtype == "BF16":
        out = np.empty(data.shape, np.float32)
        widen_bf16(data, out)
        return out
    return np.asarray(data, dtype=np.float32).copy()


def merge_tensor(
    w: np.ndarray,
    base_dtype: str,
    left: np.ndarray,
    right: np.ndarray,
    out: np.ndarray,
    out_dtype: str,
    scratch: Scratch | None = None,
    kernel: str | None = None,
) -> bool:
    """``out = round(float32(w) + left · right)`` (docs/design.md §1, one rounding); returns
    whether every element of ``out`` is finite (no infinity, no NaN).

    ``w`` is the base weight's raw elements (``[m, n]``, C-contiguous, :data:`NUMPY_TYPES`);
    ``left`` (``[m, k]``) and ``right`` (``[k, n]``) are float32 and C-contiguous; ``out`` is
    ``[m, n]`` of ``out_dtype``'s raw elements and may be ``w`` itself (each element is read
    before it is overwritten). ``kernel`` is one of :data:`KERNELS` (default: the best);
    ``scratch`` (made here when not given) serves the numpy one.

    Raises:
        ValueError: shapes, dtypes or layouts other than these, or an unavailable kernel.
    """
    _check_operands(w, base_dtype, left, right, out, out_dtype)
    m, n = w.shape
    if _kernel(kernel) == "c":
        k = left.shape[1]
        return bool(_merge_ext.merge(w, _C_CODES[base_dtype], left, right, out, _C_CODES[out_dtype], m, n, k, _C_BUILD_INDEX))
    scratch = scratch or Scratch()
    if base_dtype == out_dtype == "BF16" and n % 2 == 0 and _u32_aligned(w) and _u32_aligned(out):
        return _merge_bf16_pairs(w, left, right, out, scratch)
    finite = True
    cols = min(n, TILE_COLUMNS)
    rows = max(1, TILE_ELEMENTS // cols)
    for c0 in range(0, n, cols):
        c1 = min(n, c0 + cols)
        r_part = right[:, c0:c1]
        for r0 in range(0, m, rows):
            r1 = min(m, r0 + rows)
            tile, prod, bits = scratch.views(r1 - r0, c1 - c0)
            src = w[r0:r1, c0:c1]
            dst = out[r0:r1, c0:c1]
            with np.errstate(over="ignore", invalid="ignore"):  # an overflow is reported, not warned about
                np.matmul(left[r0:r1], r_part, out=prod)
                if base_dtype == "BF16":
                    widen_bf16(src, tile)
                    np.add(tile, prod, out=tile)
                else:  # float32: the sum straight from the read buffer
                    np.add(src, prod, out=tile if out_dtype == "BF16" else dst)
            finite = finite and finite_in(tile if out_dtype == "BF16" or base_dtype == "BF16" else dst, out_dtype)
            if out_dtype == "BF16":
                round_bf16(tile, dst, bits)
            elif base_dtype == "BF16":
                np.copyto(dst, tile)
    return finite


def _check_operands(w: np.ndarray, base_dtype: str, left: np.ndarray, right: np.ndarray, out: np.ndarray, out_dtype: str) -> None:
    """The layout :func:`merge_tensor` needs (the compiled kernel checks only byte counts)."""
    if w.ndim != 2 or left.ndim != 2 or right.ndim != 2:
        raise ValueError(f"merge operands must be 2-D: w {w.shape}, left {left.shape}, right {right.shape}")
    (m, n), k = w.shape, left.shape[1]
    if left.shape[0] != m or right.shape != (k, n) or out.shape != (m, n):
        raise ValueError(f"merge shapes do not agree: w {w.shape}, left {left.shape}, right {right.shape}, out {out.shape}")
    if left.dtype != np.float32 or right.dtype != np.float32:
        raise ValueError(f"left and right must be float32, not {left.dtype} and {right.dtype}")
    for name, a, dt in (("w", w, base_dtype), ("out", out, out_dtype)):
        if dt not in NUMPY_TYPES or a.dtype.itemsize != np.dtype(NUMPY_TYPES[dt]).itemsize:
            raise ValueError(f"{name} holds {a.dtype} elements, not {dt}")
    if not all(a.flags.c_contiguous for a in (w, left, right, out)):
        raise ValueError("merge operands must be C-contiguous")


def _u32_aligned(a: np.ndarray) -> bool:
    """Whether ``a``'s rows can be viewed as uint32 pairs: C-contiguous and 4-byte aligned."""
    return bool(a.flags.c_contiguous) and a.ctypes.data % 4 == 0


def _merge_bf16_pairs(w: np.ndarray, left: np.ndarray, right: np.ndarray, out: np.ndarray, scratch: Scratch) -> bool:
    """:func:`merge_tensor` for bfloat16 → bfloat16 with an even row length, without a dtype cast.

    numpy's uint16 ↔ uint32 casts are scalar loops (a third of the merge's CPU time when they
    widen and narrow every element). Here each pair of bfloat16 columns is read as one uint32
    (little-endian: the even column in the low half): ``pair << 16`` is the even column in
    float32 and ``pair & 0xFFFF0000`` the odd one, so the tile is handled as its even and odd
    columns (``right``'s columns split the same way, each product its own GEMM), each rounded
    to nearest even as :func:`round_bf16` does, and the two halves are or-ed back into pairs. The
    same values as the plain path, in SIMD integer ops only. Returns whether every value is finite.
    """
    finite = True
    m, n = w.shape
    half = n // 2
    pairs, out_pairs = w.view(np.uint32), out.view(np.uint32)
    r_even, r_odd = np.ascontiguousarray(right[:, 0::2]), np.ascontiguousarray(right[:, 1::2])
    cols = min(half, TILE_COLUMNS // 2)
    rows = max(1, TILE_ELEMENTS // 2 // cols)
    for c0 in range(0, half, cols):
        c1 = min(half, c0 + cols)
        re, ro = r_even[:, c0:c1], r_odd[:, c0:c1]
        for r0 in range(0, m, rows):
            r1 = min(m, r0 + rows)
            src = pairs[r0:r1, c0:c1]
            even, odd, p_even, p_odd, bits = scratch.pair_views(r1 - r0, c1 - c0)
            lhs = left[r0:r1]
            np.matmul(lhs, re, out=p_even)
            np.matmul(lhs, ro, out=p_odd)
            np.left_shift(src, 16, out=even)
            np.bitwise_and(src, 0xFFFF0000, out=odd)
            for half_bits, prod in ((even, p_even), (odd, p_odd)):
                values = half_bits.view(np.float32)
                with np.errstate(over="ignore", invalid="ignore"):
                    np.add(values, prod, out=values)
                finite = finite and finite_in(values, "BF16")
                np.right_shift(half_bits, 16, out=bits)
                np.bitwise_and(bits, 1, out=bits)
                np.add(bits, 0x7FFF, out=bits)
                np.add(half_bits, bits, out=half_bits)
            np.right_shift(even, 16, out=even)
            np.bitwise_and(odd, 0xFFFF0000, out=odd)
            np.bitwise_or(even, odd, out=out_pairs[r0:r1, c0:c1])
    return finite


def cast(data: np.ndarray, src_dtype: str, out: np.ndarray, out_dtype: str, scratch: Scratch | None = None, kernel: str | None = None) -> bool:
    """Cast a non-targeted tensor's raw elements (flat arrays of equal size) between the dtypes
    :func:`supports` names, rounded as torch rounds; returns whether every element written is finite."""
    if data.size != out.size:
        raise ValueError(f"cast of {data.size} elements into {out.size}")
    if _kernel(kernel) == "c":
        return bool(_merge_ext.cast(data, _C_CODES[src_dtype], out, _C_CODES[out_dtype], data.size, _C_BUILD_INDEX))
    scratch = scratch or Scratch()
    finite = True
    for start in range(0, data.size, TILE_ELEMENTS):
        stop = min(data.size, start + TILE_ELEMENTS)
        tile, _, bits = scratch.views(1, stop - start)
        if src_dtype == "BF16":
            widen_bf16(data[start:stop], tile[0])
        else:
            np.copyto(tile[0], data[start:stop])
        finite = finite and finite_in(tile[0], out_dtype)
        if out_dtype == "BF16":
            round_bf16(tile[0], out[start:stop], bits[0])
        else:
            np.copyto(out[start:stop], tile[0])
    return finite


__all__ = ["C_BUILD", "KERNELS", "NUMPY_TYPES", "TILE_COLUMNS", "TILE_ELEMENTS", "Scratch", "as_float32", "cast", "merge_tensor", "round_bf16", "supports", "widen_bf16"]
