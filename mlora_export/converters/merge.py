"""Streaming merge: fold the rank-``k`` delta of a nested adapter into a base model, shard by shard.

For every targeted linear layer the merged weight is ``W + s(k)·B[:, :k]·A[:k, :]`` (docs/design.md §1),
computed in float32 and rounded once to the output dtype (the base tensor's dtype, or ``dtype``
when given). ``Conv1D`` targets (``fan_in_fan_out``) are handled by viewing the base weight and
the output through :func:`~mlora_export.adapter.orient_delta`, so the orientation stays in one
place.

The output is a Hugging Face model folder with the base's layout: the same shard names, the same
tensors in the same order, the same ``model.safetensors.index.json`` (rewritten only when
``dtype`` changes ``total_size``), and every non-targeted tensor byte-identical (copied as raw
bytes). Memory stays bounded by a few tensors plus the adapter (and at most 1 GiB of idle
reusable buffers), whatever the model size: each shard is read tensor by tensor (each tensor
mapped on its own while it is in flight, no whole-shard mapping), merged, and written as it is
produced, past the page cache where the file system allows (``O_DIRECT``,
:mod:`~mlora_export.io.direct_io`: gigabytes written once cost the page cache seconds of system
CPU), straight from the merged tensor's buffer (placed in memory as its bytes lie in the file,
so no copy is made on the way out). A thread pool (one thread per CPU, at most
:data:`_MAX_WORKERS`) reads and merges up to two tensors per thread ahead of the one being
written, across shard boundaries, so the disk is kept busy from the first tensor to the last.

This module is the plan (which tensors, which rank, what to check, in what order); the reading,
buffering and look-ahead are the I/O layer's (:mod:`mlora_export.io.streaming`), and the writing
is :func:`~mlora_export.io.safetensors.write_safetensors`'s. The arithmetic runs in
:mod:`~mlora_export.converters.merge_kernels`: the compiled kernel
(bfloat16, float16 and float32; one pass per tensor with the GIL released) where the package
was built with a C compiler, numpy's kernels (bfloat16 and float32) where it was not. The
command then never imports torch, whose import alone costs about as long as copying a 1B model;
only float64 weights (and float16 ones without the compiled kernel) are merged by torch, held
to one intra-op thread during the merge (no OpenMP barriers, which stall badly on a busy machine).

Everything is checked before any output is written: the base has safetensors weights (a
``.bin``-only base is refused, nothing is unpickled), every adapter target exists in the base
with the expected shape and a float dtype, and the disk has room. Every merged (or cast) value
is checked finite in the output dtype by the kernel that computes it, in the same pass: an
overflow (a huge scale, float16's range) is refused naming the weight. The output appears
atomically (:func:`~mlora_export.fs.atomic_output_dir`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..adapter import AdapterReader, NestedAdapter, orient_delta
from ..adapter.reader import ReadableAdapter
from ..adapter.rounding import DTYPE_NAMES, ROUNDS_TO_INF
from ..base import SAFE_INDEX, BaseFolder, Shard, check_fits_weights, scan_base
from ..errors import (
    BaseModelError,
    BaseModelMismatchError,
    ConfigError,
    NonFiniteOutputError,
)
from ..fs import atomic_output_dir, check_free_space, check_output_path
from ..io.direct_io import ALIGN
from ..io.jsonio import read_json, write_json
from ..io.safetensors import (
    DTYPE_SIZES,
    TensorInfo,
    TensorSpec,
    data_offsets,
    torch_dtype,
    write_safetensors,
)
from ..io.streaming import (
    BufferPool,
    MappedRegion,
    ShortReadError,
    in_file,
    lookahead,
    pread,
    release,
)
from ..progress import Progress
from ..threads import blas_threads, torch_threads, worker_threads
from . import merge_kernels as mk

if TYPE_CHECKING:
    import numpy as np
    import torch

logger = logging.getLogger(__name__)


#: ``--dtype`` values and their safetensors names.
OUTPUT_DTYPES: dict[str, str] = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
#: Float dtypes that ``dtype`` casts (other tensors, e.g. integer buffers, are copied as they are).
CASTABLE_DTYPES = ("F32", "F16", "BF16", "F64")

#: Elements per row block of the merge (float32: 1 MiB), sized to stay in the CPU cache.
_BLOCK_ELEMENTS = 256 * 1024
#: Most worker threads reading and merging tensors ahead of the one being written.
_MAX_WORKERS = 4


@dataclass(frozen=True)
class MergeResult:
    """What :func:`merge_adapter` wrote."""

    path: Path
    rank: int
    scale: float
    dtype: str | None
    shards: list[str]
    merged_tensors: int
    copied_tensors: int
    bytes: int
    seconds: float
    key_prefix: dict[str, str] = field(default_factory=dict)
    copied_files: list[str] = field(default_factory=list)
    skipped_files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able summary (what ``mlora-export merge --json`` prints)."""
        return {
            "path": str(self.path),
            "rank": self.rank,
            "scale": self.scale,
            "dtype": self.dtype,
            "shards": self.shards,
            "merged_tensors": self.merged_tensors,
            "copied_tensors": self.copied_tensors,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 3),
            "key_prefix": self.key_prefix,
            "copied_files": self.copied_files,
            "skipped_files": self.skipped_files,
        }


def resolve_weight_keys(modules: Iterable[str], keys: Collection[str], *, where: str = "the base model") -> tuple[dict[str, str], str, str]:
    """Map adapter module names to base weight keys: ``module`` → ``module + ".weight"``, up to a prefix.

    Checkpoints do not always name tensors like the model class the adapter was trained on:
    ``openai-community/gpt2`` stores ``h.0.attn.c_attn.weight`` where ``GPT2LMHeadModel`` (and so
    the adapter) says ``transformer.h.0.attn.c_attn``; an adapter trained on a bare ``LlamaModel``
    says ``layers.0…`` where the checkpoint has ``model.layers.0…``. One rule is found for all
    modules: strip a leading prefix (up to two name components) from the module name and/or add
    one found in ``keys``. The exact name wins; otherwise the smallest change that maps every
    module; two equally small rules are an error.

    Returns:
        ``(mapping, strip, add)``: module → weight key, and the prefix removed and added.

    Raises:
        BaseModelMismatchError: no single rule maps every module (names the first missing one),
            or the rule is ambiguous.
    """
    mods = list(modules)
    keyset = keys if isinstance(keys, (set, frozenset, dict)) else set(keys)
    if not mods:
        return {}, "", ""

    def works(strip: str, add: str) -> bool:
        return all(m.startswith(strip) and f"{add}{m[len(strip):]}.weight" in keyset for m in mods)

    if works("", ""):
        return {m: f"{m}.weight" for m in mods}, "", ""
    first = mods[0]
    parts = first.split(".")
    strips = [""] + [".".join(parts[:i]) + "." for i in range(1, min(3, len(parts)))]
    candidates: dict[tuple[str, str], None] = {}
    for strip in strips:
        rest = f"{first[len(strip):]}.weight"
        for key in keyset:
            if key == rest or key.endswith("." + rest):
                candidates[(strip, key[: len(key) - len(rest)])] = None
    valid = sorted((c for c in candidates if works(*c)), key=lambda c: len(c[0]) + len(c[1]))
    if valid and (len(valid) == 1 or len(valid[0][0]) + len(valid[0][1]) < len(valid[1][0]) + len(valid[1][1])):
        strip, add = valid[0]
        logger.info("base weight names: strip %r / add %r to the adapter's module names", strip, add)
        return {m: f"{add}{m[len(strip):]}.weight" for m in mods}, strip, add
    if valid:
        rules = "; ".join(f"strip {s!r} add {a!r}" for s, a in valid[:4])
        raise BaseModelMismatchError(
            f"the adapter's module names map to the weights of {where} in more than one way ({rules}); "
            "rename the base tensors to match the adapter's module names"
        )
    missing = [m for m in mods if f"{m}.weight" not in keyset]
    example = next((k for k in sorted(keyset) if k.endswith(".weight")), None)
    raise BaseModelMismatchError(
        f"adapter target {missing[0]!r} has no weight {missing[0] + '.weight'!r} in {where} "
        f"({len(missing)} of {len(mods)} targets missing, with no common prefix that would fix them"
        + (f"; the base has names like {example!r}" if example else "")
        + "); is this the base model the adapter was trained on?"
    )


# -- reading and merging one tensor --------------------------------------------------------
def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _merge_one(
    fd: int,
    data_start: int,
    info: TensorInfo,
    module: str,
    rd: AdapterReader,
    k: int,
    out_dtype: str,
    buffers: BufferPool,
    scratch: Callable[[], mk.Scratch | None],
    phase: int = 0,
) -> "tuple[Any, list[np.ndarray]]":
    """Read one base weight and return ``W + s(k)·B[:, :k]·A[:k]`` in ``out_dtype`` (and its buffers).

    The dtypes :func:`~mlora_export.converters.merge_kernels.supports` names go through
    :func:`~mlora_export.converters.merge_kernels.merge_tensor` (float32 sums, rounded once),
    from the base's map into a buffer placed ``phase`` bytes past a page boundary (as the result
    lies in the output file); the others through :func:`_merge_torch`.
    """
    if not mk.supports(info.dtype, out_dtype):
        return _merge_torch(fd, data_start, info, module, rd, k, out_dtype, buffers)
    import numpy as np

    adapter = rd.adapter
    a_data, b_data = rd.lora_A_data(module, k), rd.lora_B_data(module, k)
    a = mk.as_float32(a_data, adapter.dtype)
    bs = mk.as_float32(b_data, adapter.dtype)
    del a_data, b_data  # views of the adapter's map
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is caught with the merged values
        bs *= np.float32(adapter.scale(k))
    if adapter.fan_in_fan_out:  # Conv1D stores W as [in, out]: add orient_delta(sB·A) = Aᵀ·(sB)ᵀ
        left, right = np.ascontiguousarray(orient_delta(a, True)), np.ascontiguousarray(orient_delta(bs, True))
    else:
        left, right = bs, a
    buf = buffers.get(_numel(info.shape) * DTYPE_SIZES[out_dtype], phase)
    out = buf.view(mk.NUMPY_TYPES[out_dtype]).reshape(info.shape)
    region = MappedRegion(fd, info.nbytes, data_start + info.begin)
    try:
        w = region.array(mk.NUMPY_TYPES[info.dtype], info.shape)
        finite = mk.merge_tensor(w, info.dtype, left, right, out, out_dtype, scratch())
        del w
    finally:
        region.close()
    if not finite:
        buffers.put([buf])
        raise _non_finite(info.name, out_dtype, adapter, k)
    return out, [buf]


def _non_finite(name: str, out_dtype: str, adapter: ReadableAdapter | None = None, k: int = 0) -> NonFiniteOutputError:
    """The error for a merged (``adapter`` and ``k`` given) or cast weight that is not finite in ``out_dtype``."""
    what = DTYPE_NAMES.get(out_dtype, out_dtype)
    if adapter is not None:
        return NonFiniteOutputError(
            f"the merged weight {name!r} would hold infinite or NaN values in {what}: W + s({k})·B·A overflows "
            f"(s({k}) = {adapter.scale(k):g}); the adapter's scale or weights are too large for this base, or the base "
            "weight is not finite; nothing was written", tensor=name)
    return NonFiniteOutputError(
        f"the base weight {name!r} would hold infinite or NaN values in {what} (out of its range, or not finite in the base); "
        "choose another dtype; nothing was written", tensor=name, option="dtype")


def _merge_torch(
    fd: int, data_start: int, info: TensorInfo, module: str, rd: AdapterReader, k: int, out_dtype: str, buffers: BufferPool
) -> "tuple[torch.Tensor, list[np.ndarray]]":
    """:func:`_merge_one` for float64, and float16 where the compiled kernel is not built: torch row blocks.

    The sum runs in float32 (float64 for a float64 base) row blocks of :data:`_BLOCK_ELEMENTS`
    (``addmm_`` adds the block of ``B·A`` to the block of ``W`` while both are in cache) and
    each block is rounded once.
    """
    import torch

    adapter = rd.adapter
    raw = pread(fd, info.nbytes, data_start + info.begin, buffers)
    w = torch.from_numpy(raw).view(torch_dtype(info.dtype)).view(info.shape)
    cdt = torch.float64 if w.dtype == torch.float64 else torch.float32
    odt = torch_dtype(out_dtype)
    a = rd.lora_A(module, k).to(cdt)
    bs = rd.lora_B(module, k).to(cdt) * adapter.scale(k)
    bufs: list[Any] = [raw]
    if w.dtype == odt == cdt:
        out = w  # merged in place in our own read buffer
    else:
        bufs.append(buffers.get(w.numel() * DTYPE_SIZES[out_dtype]))
        out = torch.from_numpy(bufs[-1]).view(odt).view(info.shape)
    w_o = orient_delta(w, adapter.fan_in_fan_out)  # [out, in] views of the base layout
    out_o = orient_delta(out, adapter.fan_in_fan_out)
    rows = max(1, _BLOCK_ELEMENTS // max(1, w_o.shape[1]))
    limit = ROUNDS_TO_INF[out_dtype]
    for r0 in range(0, w_o.shape[0], rows):
        blk = w_o[r0 : r0 + rows].to(cdt)  # a view of our own read buffer when already float32
        blk.addmm_(bs[r0 : r0 + rows], a)
        if blk.numel():
            lo, hi = torch.aminmax(blk)  # NaN propagates: the test below fails for it
            if not (-limit < float(lo) and float(hi) < limit):
                buffers.put(bufs)
                raise _non_finite(info.name, out_dtype, adapter, k)
        if out is not w:
            out_o[r0 : r0 + rows].copy_(blk)
    return out, bufs


def _copy_one(
    fd: int, data_start: int, info: TensorInfo, out_dtype: str, buffers: BufferPool, scratch: Callable[[], mk.Scratch | None], phase: int = 0
) -> tuple[Any, list[Any]]:
    """A non-targeted tensor: its raw bytes (mapped, closed once written), or the tensor cast to
    ``out_dtype`` (and its buffers)."""
    if out_dtype == info.dtype:
        region = MappedRegion(fd, info.nbytes, data_start + info.begin)
        return region.view, [region]  # the map is closed once written (release)
    if mk.supports(info.dtype, out_dtype):
        out = buffers.get(_numel(info.shape) * DTYPE_SIZES[out_dtype], phase)
        region = MappedRegion(fd, info.nbytes, data_start + info.begin)
        try:
            src = region.array(mk.NUMPY_TYPES[info.dtype], (_numel(info.shape),))
            finite = mk.cast(src, info.dtype, out.view(mk.NUMPY_TYPES[out_dtype]), out_dtype, scratch())
            del src
        finally:
            region.close()
        if not finite:
            buffers.put([out])
            raise _non_finite(info.name, out_dtype)
        return out, [out]
    buf = pread(fd, info.nbytes, data_start + info.begin, buffers)
    import torch

    src_t = torch.from_numpy(buf).view(torch_dtype(info.dtype)).view(info.shape)
    if src_t.numel() and torch.is_floating_point(src_t):
        lo, hi = torch.aminmax(src_t)
        if not (-ROUNDS_TO_INF[out_dtype] < float(lo) and float(hi) < ROUNDS_TO_INF[out_dtype]):
            buffers.put([buf])
            raise _non_finite(info.name, out_dtype)
    return src_t.to(torch_dtype(out_dtype)), [buf]


# -- the merge ------------------------------------------------------------------------------


def _output_dtype(info: TensorInfo, dtype: str | None) -> str:
    return dtype if dtype is not None and info.dtype in CASTABLE_DTYPES else info.dtype


def _shard_specs(shard: Shard, dtype: str | None) -> list[TensorSpec]:
    return [TensorSpec(name, _output_dtype(info, dtype), info.shape) for name, info in shard.header.tensors.items()]


def _data_bytes(specs: list[TensorSpec]) -> int:
    return sum(spec.nbytes for spec in specs)


def _write_config(src: Path, dst: Path, dtype_name: str | None) -> None:
    if dtype_name is None:
        shutil.copyfile(src, dst)
        return
    cfg = read_json(src, BaseModelError, what="model config")
    if not isinstance(cfg, dict):
        raise BaseModelError(f"{src}: expected a JSON object; fix the base model's config.json", path=src)
    cfg["dtype"] = dtype_name
    if "torch_dtype" in cfg:
        cfg["torch_dtype"] = dtype_name
    write_json(dst, cfg, sort_keys=True)


@dataclass(frozen=True)
class _Plan:
    """What a merge will write, worked out (and checked) before anything is written."""

    base: BaseFolder
    #: weight key → adapter module, for every targeted weight
    targets: dict[str, str]
    #: the prefix stripped from / added to the adapter's module names to find the base's keys
    strip: str
    add: str
    #: per shard, its tensors' ``(name, output dtype, shape)``, in the base's order
    shards: list[tuple[Shard, list[TensorSpec]]]
    #: output tensor bytes, all shards
    total: int
    #: output bytes on disk, headers and side files included
    needed: int


def _plan(nested: NestedAdapter, base_model: str | os.PathLike[str], out_dtype: str | None) -> _Plan:
    """Scan the base and check that the adapter fits it (names, shapes, float dtypes)."""
    base = scan_base(base_model)
    if base.skipped:
        logger.info("not copying from the base: %s (weights in other formats, sub-folders, hidden files)", ", ".join(base.skipped))
    located = base.locate()
    mapping, strip, add = resolve_weight_keys(nested.modules, located, where=f"base model {str(base.root)!r}")
    targets = check_fits_weights(nested, {key: (shard.name, info) for key, (shard, info) in located.items()}, mapping)
    shards = [(shard, _shard_specs(shard, out_dtype)) for shard in base.shards]
    total = sum(_data_bytes(specs) for _, specs in shards)
    needed = total + sum(s.header.data_start for s in base.shards) + sum(p.stat().st_size for p in base.copy_files)
    return _Plan(base, targets, strip, add, shards, total, needed)


def _needs_torch(plan: _Plan) -> bool:
    """Whether a tensor to merge or cast has a dtype the kernels here do not handle (float64, or
    float16 without the compiled kernel): torch is imported only then."""
    return any(
        (name in plan.targets or odt != info.dtype) and not mk.supports(info.dtype, odt)
        for shard, specs in plan.shards
        for (name, odt, _), info in zip(specs, shard.header.tensors.values())
    )


def _in_shard(path: Path, job: Callable[[int], Any]) -> Any:
    """Run ``job(fd)`` on the shard file (:func:`~mlora_export.io.streaming.in_file`).

    Raises:
        BaseModelError: the shard ends before a tensor its header lists (it shrank, or lies).
    """
    try:
        return in_file(path, job)
    except ShortReadError as e:
        raise BaseModelError(f"unexpected end of file while reading the base model at byte {e.offset}; re-download it") from e


def _write_shards(plan: _Plan, rd: AdapterReader, k: int, tmp: Path, progress: Progress | None) -> int:
    """Write every output shard; returns the bytes written.

    The jobs of all shards form one stream: worker threads read and merge up to
    :func:`_lookahead`'s depth of tensors ahead of the one being written, across shard
    boundaries too (a pipeline that emptied at every shard would leave the disk idle while the
    next shard's first tensor is merged). Each tensor's buffers are released once written.
    """
    workers = worker_threads(_MAX_WORKERS)
    buffers = BufferPool()
    local = threading.local()

    def scratch() -> mk.Scratch | None:
        """This worker thread's tiles, made on its first tensor (only the numpy kernels use them)."""
        if mk.KERNELS[-1] != "numpy":
            return None
        if not hasattr(local, "scratch"):
            local.scratch = mk.Scratch()
        return local.scratch  # type: ignore[no-any-return]

    def jobs() -> Iterator[Callable[[], Any]]:
        for shard, specs in plan.shards:
            start = shard.header.data_start
            # each output buffer is placed as its bytes lie in the output file: written without a copy
            phases = [offset % ALIGN for offset in data_offsets(specs, shard.header.metadata)]
            for (name, odt, _), info, phase in zip(specs, shard.header.tensors.values(), phases):
                module = plan.targets.get(name)
                common: dict[str, Any] = {"data_start": start, "info": info, "out_dtype": odt, "buffers": buffers, "scratch": scratch, "phase": phase}
                if module is not None:
                    job = functools.partial(_merge_one, module=module, rd=rd, k=k, **common)
                else:
                    job = functools.partial(_copy_one, **common)
                yield functools.partial(_in_shard, shard.path, job)

    done = 0
    written = 0

    def stream(results: Iterator[Any], specs: list[TensorSpec]) -> Iterator[Any]:
        """This shard's tensors, each released (maps closed, buffers back to the pool) once written."""
        nonlocal done
        for spec, (item, bufs) in zip(specs, results):  # specs first: no result is pulled past the shard
            yield item
            del item
            release(bufs, buffers)
            done += spec.nbytes
            if progress is not None:
                progress(done, plan.total)

    with (
        blas_threads(1),  # one BLAS thread per tile: parallelism comes from the pool
        torch_threads(1) if _needs_torch(plan) else contextlib.nullcontext(),
        ThreadPoolExecutor(workers, "mlora-merge") as pool,
        # closing() stops the workers (cancel queued jobs, wait for running ones) also when
        # writing fails half-way
        contextlib.closing(lookahead(pool, jobs(), 2 * workers)) as results,
    ):
        for shard, specs in plan.shards:
            written += write_safetensors(tmp / shard.name, specs, stream(results, specs), shard.header.metadata, direct=True)
            logger.debug("wrote %s", shard.name)
    return written


def _write_side_files(base: BaseFolder, tmp: Path, dtype: str | None, total: int) -> None:
    """The index (its ``total_size`` updated when ``dtype`` changes it) and the files a copy keeps
    (``config.json`` with its dtype updated)."""
    if base.index_path is not None:
        if dtype is None:
            shutil.copyfile(base.index_path, tmp / SAFE_INDEX)
        else:
            index = dict(base.index or {})
            metadata = index.get("metadata")
            index["metadata"] = {**(metadata if isinstance(metadata, dict) else {}), "total_size": total}
            write_json(tmp / SAFE_INDEX, index, sort_keys=True)
    for src in base.copy_files:
        if src.name == "config.json":
            _write_config(src, tmp / src.name, dtype)
        else:
            shutil.copyfile(src, tmp / src.name)


def merge_adapter(
    adapter: NestedAdapter | str | os.PathLike[str],
    base_model: str | os.PathLike[str],
    rank: int,
    output: str | os.PathLike[str],
    *,
    dtype: str | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> MergeResult:
    """Merge the rank-``rank`` delta of ``adapter`` into the base model and write a full model folder.

    ``adapter`` is a nested adapter or a plain PEFT LoRA folder (a slice works too); the base is
    a Hugging Face model folder with safetensors weights. Each targeted weight becomes
    ``W + s(k)·B[:, :k]·A[:k, :]`` (transposed for ``Conv1D``), computed in float32 and rounded
    once; ``dtype`` (``"float32"``, ``"float16"`` or ``"bfloat16"``) casts every float tensor of
    the output, else each tensor keeps the base's dtype and untouched tensors keep their bytes.
    ``progress(done, total)`` is called in output data bytes. While it runs, numpy's BLAS (and
    torch, where float64 weights need it) is held to one thread (the merge parallelises over
    tensors instead); the settings are restored after.

    Raises:
        InvalidAdapterError: the adapter folder is invalid.
        RankError: ``rank`` is outside ``[1, r]``.
        ConfigError: unknown ``dtype``.
        BaseModelError: the base folder is missing, pickle-only, corrupt, or a target is not a
            float tensor.
        BaseModelMismatchError: a target module is missing from the base or has another shape.
        OutputExistsError: ``output`` exists (without ``force``) or cannot be created.
        OutputPathError: ``output`` is, holds or lies inside the base or adapter folder.
        InsufficientDiskError: not enough free disk for the output.
    """
    if dtype is not None and dtype not in OUTPUT_DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}: expected one of {', '.join(OUTPUT_DTYPES)}", option="dtype")
    out_dtype = OUTPUT_DTYPES[dtype] if dtype is not None else None
    inputs = [adapter.path if isinstance(adapter, NestedAdapter) else adapter, base_model]
    out_path = check_output_path(output, force, inputs)
    nested = adapter if isinstance(adapter, NestedAdapter) else NestedAdapter.load(adapter)
    k = nested.check_rank(rank)
    plan = _plan(nested, base_model, out_dtype)  # every check before anything is written
    check_free_space(out_path.absolute().parent, plan.needed)
    base = plan.base
    logger.info("merging rank %d (s = %g) of %d modules into %d shard(s) of %s", k, nested.scale(k), len(plan.targets), len(base.shards), base.root)
    started = time.perf_counter()
    with atomic_output_dir(out_path, force, inputs, needed_bytes=plan.needed) as tmp, nested.reader() as rd:
        written = _write_shards(plan, rd, k, tmp, progress)
        _write_side_files(base, tmp, dtype, plan.total)
    seconds = time.perf_counter() - started
    logger.info("wrote %s (%d merged, %d copied tensors, %.1f s)", out_path, len(plan.targets), sum(len(s) for _, s in plan.shards) - len(plan.targets), seconds)
    return MergeResult(
        path=out_path,
        rank=k,
        scale=nested.scale(k),
        dtype=dtype,
        shards=[s.name for s in base.shards],
        merged_tensors=len(plan.targets),
        copied_tensors=sum(len(specs) for _, specs in plan.shards) - len(plan.targets),
        bytes=written,
        seconds=seconds,
        key_prefix={"strip": plan.strip, "add": plan.add} if plan.strip or plan.add else {},
        copied_files=[p.name for p in base.copy_files],
        skipped_files=base.skipped,
    )


__all__ = ["MergeResult", "OUTPUT_DTYPES", "merge_adapter", "resolve_weight_keys"]
