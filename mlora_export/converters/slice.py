"""Slice a nested adapter into plain PEFT LoRA adapters, one folder per rank (docs/design.md §2).

A slice at rank ``k`` holds ``A[:k]`` and ``B[:, :k]`` (contiguous, source dtype) and an
``adapter_config.json`` with ``r = k``, so ``PeftModel.from_pretrained`` applies exactly
``ΔW_k = s(k)·B[:, :k]·A[:k, :]``:

- ``baked`` (default): ``B[:, :k]`` is multiplied by ``s(k)`` (in float32, rounded once to the
  source dtype) and ``lora_alpha = k``, so PEFT's scaling is 1. Every serving stack reads it alike.
- ``native``: the exact prefix; ``s(k)`` is expressed as ``lora_alpha = s(k)·k`` (no ``use_rslora``, which llama.cpp's
  converter ignores), so PEFT's ``lora_alpha / k`` is ``s(k)`` everywhere.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..adapter import (
    CONFIG_NAME,
    PEFT_CONFIG_NAME,
    SLICE_FORMAT,
    WEIGHTS_NAME,
    AdapterReader,
    NestedAdapter,
    build_peft_config,
    scratch_bytes,
    write_json,
)
from ..adapter.ranks import (
    SCALE_MODES,
    check_ranks_in_range,
    check_scale_mode,
    resolve_ranks,
)
from ..errors import OutputExistsError
from ..fs import atomic_output_dir, check_free_space, check_output_path
from ..io.safetensors import SafetensorsWriter, TensorSpec
from ..method import peft_alpha_for
from ..progress import Progress
from ..threads import map_modules, worker_threads

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class SliceResult:
    """What one slice folder holds."""

    rank: int
    path: Path
    params: int
    bytes: int
    scale: float


def slice_peft_config(adapter: NestedAdapter, k: int, scale_mode: str) -> dict[str, Any]:
    """The ``adapter_config.json`` of the rank-``k`` slice."""
    if scale_mode == "baked":
        lora_alpha, rslora = float(k), False
    else:
        lora_alpha, rslora = peft_alpha_for(k, adapter.config.scaling, adapter.config.alpha)
    src = adapter.peft_config
    target = src.get("target_modules") or sorted({n.rsplit(".", 1)[-1] for n in adapter.modules})
    return build_peft_config(
        r=k,
        lora_alpha=lora_alpha,
        use_rslora=rslora,
        target_modules=target,
        fan_in_fan_out=adapter.fan_in_fan_out,
        base_model=src.get("base_model_name_or_path") or adapter.base_model,
        task_type=src.get("task_type"),
        modules_to_save=src.get("modules_to_save"),
    )


def _tensor_specs(adapter: NestedAdapter, k: int) -> list[TensorSpec]:
    """The rank-``k`` file's tensors, in source order: module ``i``'s ``A[:k]`` is tensor ``2i``,
    its ``B[:, :k]`` tensor ``2i + 1``."""
    specs = []
    for m in adapter.modules.values():
        specs.append(TensorSpec(m.key_a, adapter.dtype, (k, m.in_features)))
        specs.append(TensorSpec(m.key_b, adapter.dtype, (m.out_features, k)))
    return specs


def _module_slicer(reader: AdapterReader, writers: Mapping[int, SafetensorsWriter], scale_mode: str, check_finite: bool) -> Callable[[int, str], None]:
    """The work of one module (for :func:`~mlora_export.threads.map_modules`): check its source
    tensors for NaN/inf (while they are in cache), then write its ``A[:k]`` and ``B[:, :k]`` into
    every rank's file at their place. Each module's rows are read from memory once for all ranks."""
    adapter = reader.adapter
    ranks = sorted(writers, reverse=True)
    factors = {k: adapter.scale(k) if scale_mode == "baked" else None for k in ranks}
    widest = max(m.out_features for m in adapter.modules.values())
    local = threading.local()

    def slice_module(index: int, name: str) -> None:
        if check_finite:
            reader.check_finite([name])
        if not hasattr(local, "scratch"):  # one work buffer per thread for every B it computes: written out before the next
            local.scratch = np.empty(scratch_bytes(widest, ranks[0]), dtype=np.uint8)
        for k in ranks:
            # A[:k] is a view of the map, written out as it is; B[:, :k] is computed.
            a = reader.lora_A_data(name, k)
            b = reader.lora_B_data(name, k, factors[k], local.scratch)
            writers[k].write_at(2 * index, a, b)
            del a, b  # views of the map must not outlive the reader

    return slice_module


def _write_slice_configs(adapter: NestedAdapter, k: int, folder: Path, scale_mode: str) -> None:
    write_json(folder / PEFT_CONFIG_NAME, slice_peft_config(adapter, k, scale_mode))
    source = adapter.config.to_dict() if adapter.is_nested else {"format": "peft-lora", "r": adapter.max_rank}
    source.pop("p", None)
    write_json(
        folder / CONFIG_NAME,
        {
            "format": SLICE_FORMAT,
            "rank": k,
            "scale_mode": scale_mode,
            "scale": adapter.scale(k),
            "source": {"path": str(adapter.path), **source},
        },
    )


def write_slices(
    adapter: NestedAdapter,
    folders: Mapping[int, Path],
    scale_mode: str = "baked",
    *,
    reader: AdapterReader | None = None,
    progress: Progress | None = None,
    workers: int | None = None,
    check_finite: bool = True,
) -> list[SliceResult]:
    """Write the rank-``k`` slice into ``folders[k]`` (an existing, empty folder) for each ``k``.

    ``workers`` threads (default: one per CPU, at most 4) take the modules in turn and write each
    into every rank file at its place, so every module's rows are read from memory once. With
    ``check_finite`` each module is first checked for NaN and infinity, as
    :meth:`NestedAdapter.load` does (so load the adapter with ``check_finite=False``). On an error
    the folders hold partial files, for the caller to remove (:func:`slice_adapter` writes into a
    temporary folder for that).

    Raises:
        ConfigError: unknown ``scale_mode``.
        RankError: a rank is outside ``[1, r]``.
        InvalidAdapterError: a tensor holds NaN or infinity (the first such in the file is named).
    """
    check_scale_mode(scale_mode)
    check_ranks_in_range(adapter, folders)
    if not folders:
        return []
    if reader is None:
        with adapter.reader(populate=True) as rd:
            return write_slices(adapter, folders, scale_mode, reader=rd, progress=progress, workers=workers, check_finite=check_finite)
    with contextlib.ExitStack() as files:
        writers = {
            k: files.enter_context(SafetensorsWriter(folder / WEIGHTS_NAME, _tensor_specs(adapter, k), {"format": "pt"}))
            for k, folder in folders.items()
        }
        map_modules(_module_slicer(reader, writers, scale_mode, check_finite), list(adapter.modules), workers or worker_threads(),
                    progress, weight=lambda name: sum(adapter.modules[name].params_at(k) for k in folders) * adapter.itemsize)
    results = []
    for k in sorted(folders):
        _write_slice_configs(adapter, k, folders[k], scale_mode)
        results.append(SliceResult(rank=k, path=folders[k], params=adapter.params_at(k), bytes=writers[k].bytes_written, scale=adapter.scale(k)))
        logger.info("wrote rank %d slice (%d params)", k, adapter.params_at(k))
    return results


def slice_adapter(
    adapter: NestedAdapter | str | os.PathLike[str],
    ranks: Iterable[int] | str,
    output: str | os.PathLike[str],
    *,
    scale_mode: str = "baked",
    force: bool = False,
    progress: Progress | None = None,
    workers: int | None = None,
) -> list[SliceResult]:
    """Slice ``adapter`` at each rank in ``ranks`` into ``output/r{k}``; ``"all"`` = the train ranks.

    ``workers`` threads (default: one per CPU, at most 4) share the work module by module and
    check the source for NaN and infinity as they go (see :func:`write_slices`).

    The whole ``output`` folder appears at once when every slice is written (written in a
    temporary sibling, then renamed), so a failure leaves nothing behind.

    Raises:
        InvalidAdapterError: the adapter folder is invalid, or a weight is NaN or infinite.
        RankError: a rank is outside ``[1, r]``.
        ConfigError: unknown ``scale_mode``.
        OutputExistsError: ``output`` exists and ``force`` is false.
        OutputPathError: ``output`` is, holds or lies inside the adapter folder.
    """
    check_scale_mode(scale_mode)
    inputs = [adapter.path if isinstance(adapter, NestedAdapter) else adapter]
    check_output_path(output, force, inputs)
    # The NaN/inf check reads the whole file: write_slices makes it alongside the writing.
    nested = adapter if isinstance(adapter, NestedAdapter) else NestedAdapter.load(adapter, check_finite=False)
    ks = resolve_ranks(nested, ranks if isinstance(ranks, str) else list(ranks))
    needed = sum(nested.bytes_at(k) for k in ks)
    check_free_space(Path(output).absolute().parent, needed)
    with atomic_output_dir(output, force, inputs, needed_bytes=needed) as tmp:
        folders = {k: tmp / f"r{k}" for k in ks}
        for folder in folders.values():
            folder.mkdir()
        results = write_slices(nested, folders, scale_mode, progress=progress, workers=workers)
    final = Path(output)
    return [SliceResult(r.rank, final / r.path.name, r.params, r.bytes, r.scale) for r in results]


__all__ = [
    "SCALE_MODES",
    "OutputExistsError",
    "SliceResult",
    "check_scale_mode",
    "resolve_ranks",
    "slice_adapter",
    "slice_peft_config",
    "write_slices",
]
