"""numpy kernels of the streaming merge: ``W + L·R`` in float32 tiles, rounded once, without torch.

The merge of a bfloat16 or float32 base needs no torch: the base weight is widened to float32
(bfloat16 is the top half of a float32: a shift), the rank-``k`` product of the tile is one
BLAS ``sgemm`` (numpy's OpenBLAS, float32 accumulation), added, and the sum is rounded once
to the output dtype (bfloat16: round-to-nearest-even on the bit pattern, as torch rounds).
Skipping the torch import (about 2 s of start-up, more than the merge's own arithmetic at small
ranks) is what lets a merge approach the speed of copying the files.

The tensor is walked in tiles of about :data:`TILE_ELEMENTS` elements (rows × columns, both
bounded so that the GEMM's packed operands stay small next to the tile), so the widened tile,
the product and the rounding scratch stay in the CPU's L2 cache. Each worker thread owns one
:class:`Scratch`.

Float16 and float64 are not handled here (numpy's float16 casts are scalar code, several times
slower than torch's); :func:`supports` says which dtype pairs are.
"""

from __future__ import annotations

import numpy as np

#: Elements per tile (float32: 256 KiB), sized to leave the tile, its product and the rounding
#: scratch in a 1 MiB L2 cache.
TILE_ELEMENTS = 64 * 1024
#: Widest tile: a GEMM's packed right operand (``k × columns``) stays small next to the tile.
TILE_COLUMNS = 512

#: The (base dtype, output dtype) pairs these kernels merge.
_PAIRS = {("BF16", "BF16"), ("BF16", "F32"), ("F32", "F32"), ("F32", "BF16")}
#: numpy type of each handled dtype's raw elements (bfloat16 as its uint16 bit patterns).
NUMPY_TYPES: dict[str, type[np.generic]] = {"BF16": np.uint16, "F32": np.float32}


def supports(base_dtype: str, out_dtype: str) -> bool:
    """Whether a ``base_dtype`` weight merges into ``out_dtype`` here (else the caller uses torch)."""
    return (base_dtype, out_dtype) in _PAIRS


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


def merge_tensor(w: np.ndarray, base_dtype: str, left: np.ndarray, right: np.ndarray, out: np.ndarray, out_dtype: str, scratch: Scratch) -> None:
    """``out = round(float32(w) + left · right)``, tile by tile (DESIGN.md §1, one rounding).

    ``w`` is the base weight's raw elements (``[m, n]``, C-contiguous, :data:`NUMPY_TYPES`);
    ``left`` (``[m, k]``) and ``right`` (``[k, n]``) are float32 and C-contiguous; ``out`` is
    ``[m, n]`` of ``out_dtype``'s raw elements and may be ``w`` itself (each tile is widened
    before it is overwritten), which is how the merge rounds in place into its read buffer.
    """
    m, n = w.shape
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
            np.matmul(left[r0:r1], r_part, out=prod)
            if base_dtype == "BF16":
                widen_bf16(src, tile)
                np.add(tile, prod, out=tile)
            else:  # float32: the sum straight from the read buffer
                np.add(src, prod, out=tile if out_dtype == "BF16" else dst)
            if out_dtype == "BF16":
                round_bf16(tile, dst, bits)
            elif base_dtype == "BF16":
                np.copyto(dst, tile)


def cast(data: np.ndarray, src_dtype: str, out: np.ndarray, out_dtype: str, scratch: Scratch) -> None:
    """Cast a non-targeted tensor's raw elements between bfloat16 and float32 (flat arrays), in tiles."""
    for start in range(0, data.size, TILE_ELEMENTS):
        stop = min(data.size, start + TILE_ELEMENTS)
        tile, _, bits = scratch.views(1, stop - start)
        if src_dtype == "BF16":
            widen_bf16(data[start:stop], tile[0])
        else:
            np.copyto(tile[0], data[start:stop])
        if out_dtype == "BF16":
            round_bf16(tile[0], out[start:stop], bits[0])
        else:
            np.copyto(out[start:stop], tile[0])


__all__ = ["NUMPY_TYPES", "TILE_COLUMNS", "TILE_ELEMENTS", "Scratch", "as_float32", "cast", "merge_tensor", "round_bf16", "supports", "widen_bf16"]
