"""The numpy merge kernels against torch: the same rounding, the same merged values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlora_export.converters import merge_kernels as mk


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.int16).numpy().view(np.uint16)


def test_round_bf16_is_torchs_rounding() -> None:
    """Round to nearest even on every kind of float32: ties both ways, overflow to inf, infinities,
    signed zeros, subnormals, random values; a NaN stays a NaN."""
    gen = torch.Generator().manual_seed(0)
    upper = torch.randint(0, 1 << 16, (4096,), generator=gen, dtype=torch.int64)
    ties = ((upper << 16) | 0x8000).to(torch.int64)  # exactly half-way: even and odd upper halves
    near = torch.cat([(upper << 16) | 0x7FFF, (upper << 16) | 0x8001, upper << 16])
    bits = torch.cat([ties, near]).to(torch.int64)
    bits = torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32)
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 3.4e38, -3.4e38, 1e-40, -1e-45, 1.0, -2.5])
    values = torch.cat([bits.view(torch.float32), special, torch.randn(100_000, generator=gen) * 10.0])
    values = values[~torch.isnan(values)]
    got = np.empty(values.numel(), np.uint16)
    mk.round_bf16(values.numpy().copy(), got, np.empty(values.numel(), np.uint32))
    assert np.array_equal(got, _bits(values.to(torch.bfloat16)))
    nan = np.array([np.nan, -np.nan], np.float32)
    out = np.empty(2, np.uint16)
    mk.round_bf16(nan.copy(), out, np.empty(2, np.uint32))
    assert torch.isnan(torch.from_numpy(out.view(np.int16)).view(torch.bfloat16)).all()


@pytest.mark.parametrize(
    "pair, in_place",
    [(("BF16", "BF16"), True), (("BF16", "BF16"), False), (("F32", "F32"), True), (("BF16", "F32"), False), (("F32", "BF16"), False)],
)
@pytest.mark.parametrize("m, n, k", [(300, 1100, 8), (1, 7, 1), (1030, 40, 3)])
def test_merge_tensor_is_float32_sum_rounded_once(pair: tuple[str, str], in_place: bool, m: int, n: int, k: int) -> None:
    """``round(float32(W) + L·R)`` over ragged tiles (shapes that are not multiples of a tile), in
    place in the weight's own buffer or into another, equal to torch's ``addmm`` in float32 rounded
    once (up to the float32 rounding of the product's sum: one unit in the last place)."""
    base, out_dtype = pair
    gen = torch.Generator().manual_seed(m + n + k)
    w = torch.randn(m, n, generator=gen) * 0.02
    w = w.to(torch.bfloat16) if base == "BF16" else w
    left, right = torch.randn(m, k, generator=gen) * 0.01, torch.randn(k, n, generator=gen) * 0.01
    odt = torch.bfloat16 if out_dtype == "BF16" else torch.float32
    want = w.float().addmm(left, right).to(odt)
    w_np = _bits(w).copy() if base == "BF16" else w.numpy().copy()
    out = w_np if in_place else np.empty((m, n), mk.NUMPY_TYPES[out_dtype])
    mk.merge_tensor(w_np, base, left.numpy(), right.numpy(), out, out_dtype, mk.Scratch())
    got = torch.from_numpy(out.view(np.int16)).view(torch.bfloat16) if out_dtype == "BF16" else torch.from_numpy(out)
    tol = {"rtol": 2**-7, "atol": 1e-6} if out_dtype == "BF16" else {"rtol": 1e-6, "atol": 1e-7}
    torch.testing.assert_close(got, want, **tol)


def test_cast_between_bf16_and_f32() -> None:
    x = torch.randn(200_001, generator=torch.Generator().manual_seed(3))
    out = np.empty(x.numel(), np.uint16)
    mk.cast(x.numpy(), "F32", out, "BF16", mk.Scratch())
    assert np.array_equal(out, _bits(x.to(torch.bfloat16)))
    back = np.empty(x.numel(), np.float32)
    mk.cast(out, "BF16", back, "F32", mk.Scratch())
    assert torch.equal(torch.from_numpy(back), x.to(torch.bfloat16).float())
    assert mk.supports("BF16", "F32") and not mk.supports("F16", "BF16") and not mk.supports("F64", "F32")
