"""Re-nest any LoRA adapter: exact SVD ordering, without the base model or the dense delta.

For each module, with PEFT's factors ``A [r, in]``, ``B [out, r]`` and its own scale ``s``
(``lora_alpha / r`` or ``lora_alpha / sqrt(r)`` with rsLoRA, per module with
``rank_pattern``/``alpha_pattern``), the delta is ``ΔW = s·B·A`` (``[out, in]``). With the thin QR
factorisations ``B = Q_B R_B`` and ``Aᵀ = Q_A R_A`` and the SVD of the small core
``C = s·R_B·R_Aᵀ = U Σ Vᵀ`` (at most ``r×r``), ``ΔW = (Q_B U) Σ (Q_A V)ᵀ`` is the SVD of ``ΔW``,
and the re-nested factors are

    B' = Q_B U Σ^½ = s·B·R_Aᵀ·V·Σ^-½        A' = Σ^½ Vᵀ Q_Aᵀ = Σ^-½·Uᵀ·s·R_B·A

so that ``B'[:, :k]·A'[:k]`` is the best rank-``k`` approximation of ``ΔW`` (Eckart–Young) for
every ``k``. The right-hand forms need only the triangular factors (:func:`r_factor`: CholeskyQR
when the factor is well conditioned, Householder QR otherwise): ``Q`` is never formed, and the
cost is ``O((out + in)·r²)`` per module, never ``O(out·in·min(out, in))``. Everything is computed
in float64 and rounded once to the output dtype. Components with ``σ_i ≤ σ_1·max(out, in)·ε``
(the numerical rank, as ``numpy.linalg.matrix_rank`` counts it) are written as exact zeros, as
are the components beyond ``min(out, in, r_m)`` and those a module of a smaller rank lacks. Signs
are fixed so that each column of ``B'`` has its largest-magnitude entry positive (the first such,
on ties), so re-running gives byte-identical files.

The output is a nested adapter (docs/design.md §2, method ``svd``): scaling ``none``, ``alpha = 1``
(the scale is in ``B'``), train ranks ``1…R``, and ``energy[k-1]``, the share of
``Σ_m ‖ΔW_m‖²_F`` that rank ``k`` keeps, computed over all components (before ``max_rank``
truncation).
"""

from __future__ import annotations

import functools
import logging
import math
import mmap
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..adapter import (
    CONFIG_NAME,
    NESTED_FORMAT,
    PEFT_CONFIG_NAME,
    SLICE_FORMAT,
    WEIGHTS_NAME,
    MatryoshkaConfig,
    NestedAdapter,
    adapter_files,
    build_peft_config,
    lora_tensor_pairs,
    read_json,
    write_json,
)
from ..adapter.peft_config import (
    MODULES_TO_SAVE_REASON,
    check_targets,
    module_scale,
    pattern_key,
    read_peft_config,
)
from ..adapter.rounding import DTYPE_NAMES, finite_in
from ..errors import ConfigError, InvalidAdapterError, NonFiniteOutputError, RankError
from ..fs import atomic_output_dir, check_free_space, check_output_path
from ..io.safetensors import (
    DTYPE_SIZES,
    SafetensorsHeader,
    SafetensorsWriter,
    TensorInfo,
    TensorSpec,
    read_header,
)
from ..method import peft_alpha_for
from ..progress import Progress
from ..threads import blas_threads, map_modules, worker_threads
from ..validate import is_int, is_real

logger = logging.getLogger(__name__)


#: Output dtypes by the names a user may give (torch's or safetensors').
DTYPES: dict[str, str] = {
    "float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64",
    "F32": "F32", "BF16": "BF16", "F16": "F16", "F64": "F64",
}
_MAX_WORKERS = 8

@dataclass(frozen=True)
class RenestResult:
    """What :func:`renest_adapter` wrote.

    ``energy[k-1]`` is the share of ``Σ_m ‖ΔW_m‖²_F`` kept at rank ``k`` for ``k = 1…max_rank``;
    ``energy_rank`` the smallest rank (of the source's ``1…source_rank``) keeping the requested
    share, ``None`` when none was requested.
    """

    path: Path
    source: Path
    max_rank: int
    source_rank: int
    modules: int
    params: int
    bytes: int
    dtype: str
    source_dtype: str
    energy: tuple[float, ...]
    energy_target: float | None
    energy_rank: int | None
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able summary (what ``mlora-export renest --json`` prints)."""
        return {
            "path": str(self.path), "source": str(self.source), "max_rank": self.max_rank, "source_rank": self.source_rank,
            "modules": self.modules, "params": self.params, "bytes": self.bytes, "dtype": self.dtype,
            "source_dtype": self.source_dtype, "energy": list(self.energy), "energy_target": self.energy_target,
            "energy_rank": self.energy_rank, "seconds": round(self.seconds, 4),
        }


@dataclass(frozen=True)
class _Module:
    """One module of the source: its tensors, rank ``r_m`` and PEFT scale ``s_m``."""

    name: str
    a: TensorInfo
    b: TensorInfo
    rank: int
    scale: float

    @property
    def in_features(self) -> int:
        return self.a.shape[1]

    @property
    def out_features(self) -> int:
        return self.b.shape[0]


@dataclass(frozen=True)
class _Source:
    """A validated source adapter folder: its configs, modules (in file order) and header."""

    path: Path
    peft_config: dict[str, Any]
    header: SafetensorsHeader
    modules: list[_Module]
    dtype: str | None  # None when the tensors mix dtypes
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS_NAME

    @property
    def rank(self) -> int:
        return max(m.rank for m in self.modules)


# -- reading the source ------------------------------------------------------------------------

def _scan_modules(weights: Path, header: SafetensorsHeader, cfg: Mapping[str, Any], config_path: Path) -> tuple[list[_Module], str | None]:
    modules: list[_Module] = []
    dtypes: set[str] = set()
    for name, (a, b) in lora_tensor_pairs(weights, header).items():
        if a.shape[0] != b.shape[1]:
            raise InvalidAdapterError(
                f"{weights}: module {name!r} has lora_A {list(a.shape)} and lora_B {list(b.shape)}, whose ranks disagree; "
                "expected A [r, in] and B [out, r]"
            )
        r, s = module_scale(cfg, name, config_path)
        if a.shape[0] != r:
            raise InvalidAdapterError(
                f"{weights}: module {name!r} has rank {a.shape[0]} (lora_A {list(a.shape)}) but {config_path.name} gives it r = {r}"
                f"{' (rank_pattern)' if cfg.get('rank_pattern') else ''}; they must agree"
            )
        dtypes.update((a.dtype, b.dtype))
        modules.append(_Module(name, a, b, r, s))
    modules.sort(key=lambda m: min(m.a.begin, m.b.begin))
    return modules, (dtypes.pop() if len(dtypes) == 1 else None)


def _read_source(path: str | os.PathLike[str]) -> _Source:
    """Open and validate a PEFT LoRA folder (anyone's) or a nested adapter of ours.

    Raises:
        InvalidAdapterError: see :func:`renest_adapter`.
    """
    root, weights, config_path = adapter_files(path)
    cfg = read_peft_config(config_path, patterns=True, refuse={"modules_to_save": MODULES_TO_SAVE_REASON})
    provenance: dict[str, Any] = {"path": str(root)}
    nested_path = root / CONFIG_NAME
    raw = read_json(nested_path) if nested_path.exists() else None
    if isinstance(raw, dict) and raw.get("format") == NESTED_FORMAT:
        # Ours: NestedAdapter.load validates matryoshka_config.json against adapter_config.json
        # (PEFT's scaling equals s(r)), so the delta PEFT computes is the full-rank one.
        nested = NestedAdapter.load(root, check_finite=False)
        source_cfg = nested.config.to_dict()
        source_cfg.pop("p", None)
        for key in ("energy", "energy_target", "energy_rank"):
            source_cfg.pop(key, None)
        provenance.update(source_cfg)
    else:
        provenance.update({"format": SLICE_FORMAT if isinstance(raw, dict) and raw.get("format") == SLICE_FORMAT else "peft-lora"})
        provenance.update({k: cfg[k] for k in ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern") if cfg.get(k) is not None and cfg.get(k) != {}})
    header = read_header(weights)
    modules, dtype = _scan_modules(weights, header, cfg, config_path)
    check_targets(cfg, (m.name for m in modules), config_path)
    return _Source(root, cfg, header, modules, dtype, provenance)


# -- the factorisation --------------------------------------------------------------------------

def _as_float64(mm: mmap.mmap, header: SafetensorsHeader, info: TensorInfo) -> np.ndarray:
    """Tensor ``info`` of the mapped file as a new float64 array (bfloat16 widened bit-exactly)."""
    offset, count = header.data_start + info.begin, info.nbytes // DTYPE_SIZES[info.dtype]
    if info.dtype == "BF16":
        bits = np.frombuffer(mm, dtype=np.uint16, count=count, offset=offset)
        wide = np.left_shift(bits, 16, dtype=np.uint32)
        del bits
        out = wide.view(np.float32).astype(np.float64)
    else:
        view = np.frombuffer(mm, dtype={"F64": np.float64, "F32": np.float32, "F16": np.float16}[info.dtype], count=count, offset=offset)
        out = view.astype(np.float64)
        del view
    return out.reshape(info.shape)


def _check_finite(x: np.ndarray, info: TensorInfo, weights: Path) -> None:
    # A float64 sum of values that were at most float32 cannot overflow: a finite sum proves every
    # element finite. Only a non-finite sum (or a float64 source that overflowed) takes the exact test.
    if not math.isfinite(float(x.sum())) and not np.isfinite(x).all():
        raise InvalidAdapterError(f"{weights}: tensor {info.name!r} has NaN or infinite values; the training diverged or the file is corrupt", path=weights, tensor=info.name)


#: Condition numbers of a factor up to which its ``R`` comes from one Cholesky of its Gram matrix
#: (error ``~ r·ε·κ²``, at most 1e-11 here), from two (CholeskyQR2, error ``~ r·ε``), and above which
#: Householder QR is used.
_ONE_PASS_KAPPA, _TWO_PASS_KAPPA = 1e2, 1e6


def r_factor(x: np.ndarray) -> np.ndarray:
    """``R`` of the thin QR of ``x`` (``[m, r]``, float64): ``[min(m, r), r]`` with ``x = Q·R``.

    Well-conditioned factors (every factor of random or freshly initialised LoRA weights) take
    CholeskyQR: ``R = chol(xᵀx)ᵀ``, one matrix product that runs at BLAS-3 speed, many times
    faster than Householder QR's panels on these tall, thin matrices. Its accuracy depends on the
    condition number ``κ`` of ``x``, which is computed exactly (singular values of the small ``R``):
    one pass for ``κ ≤ 1e2``, a second (CholeskyQR2, as accurate as Householder) for ``κ ≤ 1e6``, and
    Householder QR (``numpy.linalg.qr``) beyond, for rank-deficient factors and when ``m < r``.
    """
    m, r = x.shape
    if m >= r:
        try:
            r1 = np.linalg.cholesky(x.T @ x).T
            sv = np.linalg.svd(r1, compute_uv=False)
        except np.linalg.LinAlgError:
            return np.asarray(np.linalg.qr(x, mode="r"))
        kappa = sv[0] / sv[-1] if sv[-1] > 0 else math.inf
        if kappa <= _ONE_PASS_KAPPA:
            return r1
        if kappa <= _TWO_PASS_KAPPA:
            q1 = x @ np.linalg.inv(r1)
            try:
                return np.linalg.cholesky(q1.T @ q1).T @ r1
            except np.linalg.LinAlgError:
                pass
    return np.asarray(np.linalg.qr(x, mode="r"))


def renest_factors(a: np.ndarray, b: np.ndarray, scale: float, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Re-factor ``ΔW = scale·b·a`` (``a [r, in]``, ``b [out, r]``, float64) into its SVD order.

    Returns ``(a', b', σ)``: ``a' [rank, in]`` and ``b' [out, rank]`` (float64; ``b'`` is a
    column-major view) with ``b'[:, :k]·a'[:k]`` the best rank-``k`` approximation of ``ΔW`` for
    every ``k ≤ rank``, and ``σ``, all ``min(out, in, r)`` singular values of ``ΔW`` (descending,
    non-negative). See the module docstring for the formulas, the zeroed components and the sign
    convention.
    """
    out_f, in_f = b.shape[0], a.shape[1]
    r_b = r_factor(b)      # [min(out, r), r]
    r_a = r_factor(a.T)    # [min(in, r), r]
    u, sigma, vt = np.linalg.svd(scale * (r_b @ r_a.T), full_matrices=False)
    p = sigma.shape[0]
    keep = min(rank, p)
    tol = sigma[0] * max(out_f, in_f) * np.finfo(np.float64).eps if p else 0.0
    live = int(np.count_nonzero(sigma[:keep] > tol))
    a_new = np.zeros((rank, in_f), dtype=np.float64)
    bt_new = np.zeros((rank, out_f), dtype=np.float64)  # b'ᵀ: each component's column of b' is a row
    if live:
        f = scale / np.sqrt(sigma[:live])
        np.matmul((vt[:live] * f[:, None]) @ r_a, b.T, out=bt_new[:live])
        # Signs: the largest-|entry| of each column of b' (the first, on ties) is positive.
        rows = bt_new[:live]
        hi, lo = rows.argmax(axis=1), rows.argmin(axis=1)
        at = np.arange(live)
        top, bottom = rows[at, hi], -rows[at, lo]
        flip = (bottom > top) | ((bottom == top) & (lo < hi))
        sign = np.where(flip, -1.0, 1.0)
        if flip.any():
            rows[flip] *= -1.0
        np.matmul((u[:, :live].T * (f * sign)[:, None]) @ r_b, a, out=a_new[:live])
    return a_new, bt_new.T, sigma


_ROUNDING_TYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16}


def _to_dtype(x: np.ndarray, dtype: str, name: str = "", path: Path | None = None) -> np.ndarray:
    """``x`` (float64) rounded to ``dtype``, as the raw little-endian element array in row-major
    order; bfloat16 is rounded from float32, to nearest even, as torch rounds float64 to bfloat16.

    Raises:
        NonFiniteOutputError: a value is infinite or NaN once rounded (tensor ``name`` of ``path``).
    """
    if dtype != "BF16":
        _check_output(x, dtype, name, path)
        with np.errstate(over="ignore"):
            return x.astype(_ROUNDING_TYPES[dtype], order="C")
    with np.errstate(over="ignore"):
        wide = x.astype(np.float32, order="C")
    _check_output(wide, dtype, name, path)
    u = wide.view(np.uint32)
    carry = np.right_shift(u, 16)
    np.bitwise_and(carry, 1, out=carry)
    carry += np.uint32(0x7FFF)
    u += carry
    return np.right_shift(u, 16).astype(np.uint16)


def _check_output(x: np.ndarray, dtype: str, name: str, path: Path | None) -> None:
    """Refuse a re-nested factor that would not be finite in ``dtype`` (checked before it is rounded)."""
    if not finite_in(x, dtype):
        raise NonFiniteOutputError(
            f"{path}: the re-nested tensor {name!r} would hold infinite or NaN values in {DTYPE_NAMES[dtype]}: the adapter's "
            "scale or weights are too large for it; choose a wider dtype or fix the adapter; nothing was written",
            path=path, tensor=name, option="dtype")


def _renest_module(source: _Source, mm: mmap.mmap, writer: SafetensorsWriter, rank: int, dtype: str, index: int, m: Any) -> np.ndarray:
    """Read, check, factor and write module ``index`` (``m``); return its singular values.

    Raises:
        InvalidAdapterError: the module holds NaN or an infinity.
        NonFiniteOutputError: a re-nested factor overflows ``dtype``.
    """
    page = mmap.PAGESIZE
    a = _as_float64(mm, source.header, m.a)
    b = _as_float64(mm, source.header, m.b)
    _check_finite(a, m.a, source.weights)
    _check_finite(b, m.b, source.weights)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # an overflow is refused below, not warned about
        a_new, b_new, sigma = renest_factors(a, b, m.scale, rank)
    writer.write_at(2 * index, _to_dtype(a_new, dtype, m.a.name, source.weights), _to_dtype(b_new, dtype, m.b.name, source.weights))
    # Drop this module's pages from the process (they stay in the page cache): memory
    # stays flat in the adapter's size.
    start = source.header.data_start + min(m.a.begin, m.b.begin)
    end = source.header.data_start + max(m.a.end, m.b.end)
    start, end = -(-start // page) * page, end // page * page
    if end > start and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        mm.madvise(mmap.MADV_DONTNEED, start, end - start)
    return sigma


def _energy(sigmas: Sequence[np.ndarray], source_rank: int) -> list[float]:
    """Share of ``Σ_m Σ_i σ_{m,i}²`` kept at each rank ``1…source_rank`` (summed in module order,
    so the result does not depend on the thread count). An all-zero adapter keeps everything."""
    kept = np.zeros(source_rank, dtype=np.float64)
    for s in sigmas:
        c = np.cumsum(s.astype(np.float64) ** 2)
        kept[: c.shape[0]] += c
        kept[c.shape[0]:] += c[-1] if c.shape[0] else 0.0
    total = kept[-1]
    if total <= 0:
        return [1.0] * source_rank
    return [float(x) for x in np.minimum(kept / total, 1.0)]


def energy_rank(energy: Sequence[float], target: float) -> int:
    """The smallest rank ``k`` (1-based) with ``energy[k-1] ≥ target`` (to 1e-12), else ``len(energy)``."""
    for k, e in enumerate(energy, start=1):
        if e >= target - 1e-12:
            return k
    return len(energy)


def _check_options(max_rank: int | None, energy: float | None, dtype: str | None, workers: int | None) -> str | None:
    if max_rank is not None and (not is_int(max_rank) or max_rank < 1):
        raise RankError(f"max rank must be a positive integer, got {max_rank!r}")
    if energy is not None and (not is_real(energy) or not 0 < energy <= 1):
        raise ConfigError(f"energy must be a share in (0, 1], e.g. 0.9, got {energy!r}")
    if workers is not None and (not is_int(workers) or workers < 1):
        raise ConfigError(f"workers must be a positive integer, got {workers!r}")
    if dtype is None:
        return None
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}: expected one of float32, bfloat16, float16, float64")
    return DTYPES[dtype]


def _output_peft_config(source: _Source, rank: int) -> dict[str, Any]:
    cfg = source.peft_config
    lora_alpha, rslora = peft_alpha_for(rank, "none", 1.0)
    target = cfg.get("target_modules") or sorted({m.name.rsplit(".", 1)[-1] for m in source.modules})
    out = build_peft_config(
        r=rank,
        lora_alpha=lora_alpha,
        use_rslora=rslora,
        target_modules=target,
        fan_in_fan_out=bool(cfg.get("fan_in_fan_out", False)),
        base_model=cfg.get("base_model_name_or_path"),
        task_type=cfg.get("task_type"),
    )
    # Which modules PEFT adapts depends on these too; kept only when set, so the config stays minimal.
    for key in ("exclude_modules", "layers_to_transform", "layers_pattern"):
        if cfg.get(key) is not None:
            out[key] = cfg[key]
    return out


def renest_adapter(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    max_rank: int | None = None,
    energy: float | None = None,
    dtype: str | None = None,
    force: bool = False,
    workers: int | None = None,
    progress: Progress | None = None,
) -> RenestResult:
    """Re-nest the LoRA adapter folder ``source`` into the nested adapter ``output`` (method ``svd``).

    ``source`` is any PEFT LoRA adapter in safetensors (``lora_alpha``/``use_rslora`` scaling,
    ``rank_pattern`` and ``alpha_pattern``, ``fan_in_fan_out``; float32, bfloat16, float16 or
    float64) or a nested adapter of ours of any method (its full-rank delta, as PEFT applies it).
    No base model is needed. The rank-``k`` prefix of every module of the output is the best
    rank-``k`` approximation of its ``ΔW`` (to float64 rounding, then one rounding to ``dtype``).

    Args:
        max_rank: keep only the first ``R`` components (default: the source's largest rank).
        energy: a share in ``(0, 1]``: record in the output (and return) the smallest rank keeping
            that share of ``Σ‖ΔW‖²_F``.
        dtype: output dtype (``float32``, ``bfloat16``, ``float16``, ``float64``); default the source's.
        force: replace an existing ``output``.
        workers: threads sharing the modules (default: one per CPU, at most 8).
        progress: ``progress(done, total)`` in source bytes.

    The whole ``output`` folder appears at once when it is complete (written in a temporary
    sibling, then renamed); memory holds a few modules at a time, whatever the adapter's size.

    Raises:
        InvalidAdapterError: the source is missing, pickle-only, not LoRA, DoRA, has a LoRA bias,
            trained biases or ``modules_to_save``, shapes that disagree (with each other or with
            ``r``/``rank_pattern``), non-finite weights, or mixed dtypes without ``dtype``.
        RankError: ``max_rank`` is not in ``[1, r]``.
        ConfigError: a bad ``energy``, ``dtype`` or ``workers``.
        OutputExistsError: ``output`` exists and ``force`` is false.
        InsufficientDiskError: not enough free disk for the output.
    """
    t0 = time.perf_counter()
    out_dtype = _check_options(max_rank, energy, dtype, workers)
    check_output_path(output, force, inputs=(source,))
    src = _read_source(source)
    out_dtype = _output_dtype(src, out_dtype)
    source_rank = src.rank
    if max_rank is not None and max_rank > source_rank:
        raise RankError(f"max rank {max_rank} is outside [1, {source_rank}] for adapter {str(src.path)!r} (its largest rank is {source_rank})")
    rank = max_rank or source_rank
    params = sum(rank * (m.in_features + m.out_features) for m in src.modules)
    check_free_space(Path(output).absolute().parent, params * DTYPE_SIZES[out_dtype])
    with atomic_output_dir(output, force) as tmp:
        sigmas, nbytes = _write_factors(src, tmp / WEIGHTS_NAME, rank, out_dtype, workers, progress)
        with np.errstate(over="ignore", invalid="ignore"):
            full = _energy(sigmas, source_rank)
        if not all(np.isfinite(full)):
            raise NonFiniteOutputError(f"{src.weights}: the energy of the re-nested adapter is not finite: the adapter's "
                                       "scale or weights are too large; nothing was written", path=src.weights)
        kept = full[:rank]
        target = float(energy) if energy is not None else None
        at = _energy_at(full, target, rank)
        write_json(tmp / PEFT_CONFIG_NAME, _output_peft_config(src, rank))
        write_json(tmp / CONFIG_NAME, _output_config(src, rank, kept, target, at).to_dict())
    logger.info("re-nested %d modules of %s at rank %d into %s", len(src.modules), src.path, rank, output)
    return RenestResult(
        path=Path(output), source=src.path, max_rank=rank, source_rank=source_rank, modules=len(src.modules), params=params,
        bytes=nbytes, dtype=out_dtype, source_dtype=src.dtype or "mixed", energy=tuple(kept), energy_target=target,
        energy_rank=at, seconds=time.perf_counter() - t0,
    )


def _output_dtype(src: _Source, dtype: str | None) -> str:
    """The output dtype: the one asked for, else the source's own.

    Raises:
        InvalidAdapterError: none asked for and the source's LoRA tensors mix dtypes.
    """
    out_dtype = dtype or src.dtype
    if out_dtype is None:
        found = sorted({t.dtype for m in src.modules for t in (m.a, m.b)})
        raise InvalidAdapterError(f"{src.weights}: LoRA tensors mix dtypes {found}; choose the output dtype", option="dtype")
    return out_dtype


def _write_factors(
    src: _Source, path: Path, rank: int, dtype: str, workers: int | None, progress: Progress | None,
) -> tuple[list[np.ndarray], int]:
    """Re-nest every module of ``src`` into the safetensors file ``path`` (``rank`` components,
    ``dtype``), with ``workers`` threads sharing the modules (:func:`~mlora_export.threads.map_modules`
    of :func:`_renest_module`).

    Returns each module's singular values (in module order) and the bytes written; ``progress``
    is told the source bytes done.

    Raises:
        InvalidAdapterError: the first module (in file order) with a NaN or an infinity.
    """
    specs: list[TensorSpec] = []
    for m in src.modules:
        specs.append(TensorSpec(m.a.name, dtype, (rank, m.in_features)))
        specs.append(TensorSpec(m.b.name, dtype, (m.out_features, rank)))
    with open(src.weights, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        with SafetensorsWriter(path, specs, {"format": "pt"}) as writer, blas_threads(1):
            sigmas = map_modules(functools.partial(_renest_module, src, mm, writer, rank, dtype), src.modules,
                                 workers or worker_threads(_MAX_WORKERS), progress, weight=lambda m: m.a.nbytes + m.b.nbytes)
        return sigmas, writer.bytes_written


def _energy_at(full: Sequence[float], target: float | None, rank: int) -> int | None:
    """The smallest rank keeping ``target`` of the energy (``None`` without a target); warns when
    it lies above the output's ``rank``, which then keeps less."""
    at = energy_rank(full, target) if target is not None else None
    if at is not None and at > rank:
        logger.warning(
            "the smallest rank keeping %g of the energy is %d (%.4g), above the output's max rank %d (which keeps %.4g)",
            target, at, full[at - 1], rank, full[rank - 1],
        )
    return at


def _output_config(src: _Source, rank: int, kept: Sequence[float], target: float | None, at: int | None) -> MatryoshkaConfig:
    """The output's ``matryoshka_config.json``: method ``svd``, train ranks ``1…rank``, scaling
    ``none`` with alpha 1 (the scale is in ``B'``), the energy kept per rank, the source's provenance."""
    extra: dict[str, Any] = {"base_model": src.peft_config.get("base_model_name_or_path"), "energy": list(kept)}
    if target is not None:
        extra.update({"energy_target": target, "energy_rank": at})
    extra["source"] = {**src.provenance, "dtype": src.dtype, "rank": src.rank}
    return MatryoshkaConfig("svd", rank, tuple(range(1, rank + 1)), "none", 1.0, extra=extra)


__all__ = ["DTYPES", "RenestResult", "energy_rank", "pattern_key", "r_factor", "renest_adapter", "renest_factors"]
