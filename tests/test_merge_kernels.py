"""The merge kernels (compiled C, both its builds, and numpy) against torch: the same rounding,
the same merged values."""

from __future__ import annotations

from pathlib import Path

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


TORCH = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
#: (kernel, C build) pairs: numpy, and every build of the compiled kernel this CPU runs.
VARIANTS = [("numpy", None)] + ([("c", b) for b in range(len(mk._merge_ext.builds()))] if mk._merge_ext is not None else [])
PAIRS = [(a, b) for a in TORCH for b in TORCH]


def _variant_id(v: tuple[str, int | None]) -> str:
    return v[0] if v[1] is None else mk._merge_ext.builds()[v[1]]


def _raw(t: torch.Tensor) -> np.ndarray:
    return t.numpy() if t.dtype == torch.float32 else _bits(t)


def _tensor(raw: np.ndarray, dtype: str) -> torch.Tensor:
    return torch.from_numpy(raw) if dtype == "F32" else torch.from_numpy(raw.view(np.int16)).view(TORCH[dtype])


def _merge(variant: tuple[str, int | None], w: np.ndarray, base: str, left: np.ndarray, right: np.ndarray, out: np.ndarray, out_dtype: str) -> None:
    kernel, build = variant
    if build is None:
        mk.merge_tensor(w, base, left, right, out, out_dtype, mk.Scratch(), kernel=kernel)
    else:  # one build of the compiled kernel, named (merge_tensor takes the best one)
        m, n = w.shape
        mk._merge_ext.merge(w, mk._C_CODES[base], left, right, out, mk._C_CODES[out_dtype], m, n, left.shape[1], build)


def test_the_compiled_kernel_is_built_here() -> None:
    """CI installs with a C compiler: the compiled kernel must be there (the numpy one is the
    fallback for installs without one), with its AVX2 build on an AVX2 CPU."""
    assert mk.KERNELS == ("numpy", "c") and mk.C_BUILD is not None
    flags = open("/proc/cpuinfo").read() if Path("/proc/cpuinfo").exists() else ""
    if all(f" {f}" in flags for f in ("avx2", "fma", "f16c")):
        assert mk.C_BUILD == "avx2"


@pytest.mark.parametrize(
    "variant, pair",
    [(v, p) for v in VARIANTS for p in PAIRS if mk.supports(*p, v[0])],
    ids=[f"{_variant_id(v)}-{'-'.join(p)}" for v in VARIANTS for p in PAIRS if mk.supports(*p, v[0])],
)
@pytest.mark.parametrize("m, n, k", [(300, 1100, 8), (1, 7, 1), (1030, 40, 3), (37, 48, 64), (9, 33, 0)])
def test_merge_is_float32_sum_rounded_once(variant: tuple[str, int | None], pair: tuple[str, str], m: int, n: int, k: int) -> None:
    """``round(float32(W) + L·R)`` over ragged shapes (rows not a multiple of 4, columns not of
    16, k = 0), into another buffer and in place into the weight's own, equal to torch's
    ``addmm`` in float32 rounded once: bit for bit on the AVX2 build (fused multiply-adds in
    order, as BLAS sums), else up to the float32 rounding of the product's sum."""
    base, out_dtype = pair
    gen = torch.Generator().manual_seed(m + n + k)
    w = (torch.randn(m, n, generator=gen) * 0.02).to(TORCH[base])
    left, right = torch.randn(m, k, generator=gen) * 0.01, torch.randn(k, n, generator=gen) * 0.01
    want = w.float().addmm(left, right).to(TORCH[out_dtype])
    exact = variant[1] is not None and mk._merge_ext.builds()[variant[1]] == "avx2"
    tol = {"rtol": 2**-7, "atol": 1e-6} if out_dtype != "F32" else {"rtol": 1e-6, "atol": 1e-7}
    outs = [np.empty((m, n), mk.NUMPY_TYPES[out_dtype])] + ([None] if base == out_dtype else [])
    for out in outs:
        w_np = _raw(w).copy()
        target = w_np if out is None else out
        _merge(variant, w_np, base, left.numpy(), right.numpy(), target, out_dtype)
        got = _tensor(target, out_dtype)
        if exact or k == 0:
            assert torch.equal(got, want), (int((got != want).sum()), "of", got.numel())
        else:
            torch.testing.assert_close(got, want, **tol)


def test_merge_keeps_signed_zeros_and_specials() -> None:
    """k = 0 returns W itself, -0.0, infinities and subnormals included, in every dtype (cast as
    torch casts); NaN stays NaN."""
    values = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 65504.0, 65520.0, 1e-8, -1e-8, 3.4e38, 6e-5, 1e-40, 1.0] * 3)
    for variant in VARIANTS:
        for out_dtype in TORCH:
            if not mk.supports("F32", out_dtype, variant[0]):
                continue
            out = np.empty((1, values.numel()), mk.NUMPY_TYPES[out_dtype])
            _merge(variant, values.numpy().reshape(1, -1), "F32", np.zeros((1, 0), np.float32), np.zeros((0, values.numel()), np.float32), out, out_dtype)
            assert torch.equal(_tensor(out, out_dtype)[0], values.to(TORCH[out_dtype])), (variant, out_dtype)
        if variant[0] == "c":
            nan = np.array([[np.nan, -np.nan] * 8 + [np.nan]], np.float32)
            for out_dtype in ("BF16", "F16"):
                out = np.empty(nan.shape, np.uint16)
                _merge(variant, nan, "F32", np.zeros((1, 0), np.float32), np.zeros((0, nan.shape[1]), np.float32), out, out_dtype)
                assert torch.isnan(_tensor(out, out_dtype).float()).all()


@pytest.mark.skipif(mk._merge_ext is None, reason="the compiled kernel is not built")
@pytest.mark.parametrize("build", range(len(mk._merge_ext.builds())) if mk._merge_ext is not None else [])
def test_c_cast_is_torchs_conversion(build: int) -> None:
    """Every bfloat16 and float16 bit pattern widens as torch widens it; float32 rounds to both
    as torch rounds (ties, overflow to inf, subnormals, random values), bit for bit."""
    ext = mk._merge_ext
    patterns = np.arange(1 << 16, dtype=np.uint16)
    for src in ("BF16", "F16"):
        got = np.empty(patterns.size, np.float32)
        ext.cast(patterns, mk._C_CODES[src], got, 0, patterns.size, build)
        want = _tensor(patterns.copy(), src).float().numpy()
        finite = ~np.isnan(want)
        assert np.array_equal(got.view(np.uint32)[finite], want.view(np.uint32)[finite]) and np.isnan(got[~finite]).all()
    gen = torch.Generator().manual_seed(1)
    upper = torch.randint(0, 1 << 16, (8192,), generator=gen, dtype=torch.int64)
    ties = torch.cat([(upper << 16) | 0x8000, (upper << 16) | 0x1000, (upper << 13) | 0x1000]).to(torch.int64)
    ties = torch.where(ties >= 1 << 31, ties - (1 << 32), ties).to(torch.int32).view(torch.float32)
    values = torch.cat([ties, torch.randn(100_003, generator=gen) * 1000.0, torch.randn(1000, generator=gen) * 1e-6, torch.tensor([65519.0, 65520.0, -70000.0, 1e-40])])
    values = values[~torch.isnan(values)]
    for out_dtype in ("BF16", "F16"):
        got = np.empty(values.numel(), np.uint16)
        ext.cast(values.numpy(), 0, got, mk._C_CODES[out_dtype], values.numel(), build)
        assert np.array_equal(got, _bits(values.to(TORCH[out_dtype]))), out_dtype


def test_c_kernel_refuses_short_buffers() -> None:
    """The compiled kernel checks every buffer against the shape it is given (no read or write
    past an end), and its dtype and build arguments."""
    if mk._merge_ext is None:
        pytest.skip("the compiled kernel is not built")
    ext = mk._merge_ext
    w, left, right = np.zeros((4, 16), np.uint16), np.zeros((4, 2), np.float32), np.zeros((2, 16), np.float32)
    with pytest.raises(ValueError, match="out"):
        ext.merge(w, 1, left, right, np.zeros((4, 15), np.uint16), 1, 4, 16, 2, 0)
    with pytest.raises(ValueError, match="right"):
        ext.merge(w, 1, left, right[:, :8].copy(), np.zeros((4, 16), np.uint16), 1, 4, 16, 2, 0)
    with pytest.raises(ValueError, match="dtype"):
        ext.merge(w, 7, left, right, np.zeros((4, 16), np.uint16), 1, 4, 16, 2, 0)
    with pytest.raises(ValueError, match="build"):
        ext.merge(w, 1, left, right, np.zeros((4, 16), np.uint16), 1, 4, 16, 2, 9)
    with pytest.raises(TypeError):
        ext.merge(w, 1, left, right, w.tobytes(), 1, 4, 16, 2, 0)  # out must be writable
    with pytest.raises(ValueError, match="too large"):  # sizes that overflow are refused, not wrapped
        ext.merge(b"", 1, b"", b"", bytearray(0), 1, 2**62, 4, 0, 0)
    with pytest.raises(ValueError, match="too large"):
        ext.cast(b"", 0, bytearray(0), 1, 2**62, 0)
    with pytest.raises(ValueError, match="negative"):
        ext.merge(w, 1, left, right, np.zeros((4, 16), np.uint16), 1, -4, 16, 2, 0)
    if len(ext.builds()) == 1:  # no AVX2 here: asking for it is an error, not an illegal instruction
        with pytest.raises(ValueError, match="build 1"):
            ext.merge(w, 1, left, right, np.zeros((4, 16), np.uint16), 1, 4, 16, 2, 1)


def test_merge_tensor_checks_its_operands() -> None:
    """Shapes, dtypes and layouts that do not fit are refused with the shapes named (the compiled
    kernel itself checks byte counts only), and so is a kernel that is not here."""
    w, left, right = np.zeros((4, 16), np.uint16), np.zeros((4, 2), np.float32), np.zeros((2, 16), np.float32)
    out = np.zeros((4, 16), np.uint16)
    with pytest.raises(ValueError, match="shapes do not agree"):
        mk.merge_tensor(w, "BF16", left, np.zeros((2, 32), np.float32), out, "BF16")
    with pytest.raises(ValueError, match="float32"):
        mk.merge_tensor(w, "BF16", left.astype(np.float64), right, out, "BF16")
    with pytest.raises(ValueError, match="not F32"):
        mk.merge_tensor(w, "F32", left, right, out, "BF16")
    with pytest.raises(ValueError, match="C-contiguous"):
        mk.merge_tensor(np.zeros((16, 4), np.uint16).T, "BF16", left, right, out, "BF16")
    with pytest.raises(ValueError, match="not available"):
        mk.merge_tensor(w, "BF16", left, right, out, "BF16", kernel="fortran")


@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_id)
def test_zero_delta_on_negative_zero_is_torchs(variant: tuple[str, int | None]) -> None:
    """-0 weights plus a delta of exact zeros (an untrained adapter, B = 0) give what torch's
    ``addmm`` gives (+0: the sum starts at +0, as a BLAS's does), in every kernel alike."""
    w = np.full((5, 40), 0x8000, np.uint16)  # bfloat16 -0.0
    left, right = np.zeros((5, 3), np.float32), -np.ones((3, 40), np.float32)
    want = _bits(_tensor(w.copy(), "BF16").float().addmm(torch.from_numpy(left), torch.from_numpy(right)).to(torch.bfloat16))
    out = np.empty_like(w)
    _merge(variant, w, "BF16", left, right, out, "BF16")
    assert np.array_equal(out, want), (out[0, :4], want[0, :4])


def test_cast_between_bf16_and_f32() -> None:
    x = torch.randn(200_001, generator=torch.Generator().manual_seed(3))
    for kernel in mk.KERNELS:
        out = np.empty(x.numel(), np.uint16)
        mk.cast(x.numpy(), "F32", out, "BF16", mk.Scratch(), kernel=kernel)
        assert np.array_equal(out, _bits(x.to(torch.bfloat16))), kernel
        back = np.empty(x.numel(), np.float32)
        mk.cast(out, "BF16", back, "F32", mk.Scratch(), kernel=kernel)
        assert torch.equal(torch.from_numpy(back), x.to(torch.bfloat16).float()), kernel
    assert mk.supports("BF16", "F32", "numpy") and not mk.supports("F16", "BF16", "numpy") and not mk.supports("F64", "F32")
    assert mk.supports("F16", "BF16", "c") and not mk.supports("F64", "F32", "c")
