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
import queue
import threading
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor, wait
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
from ..errors import InvalidAdapterError, OutputExistsError
from ..fs import atomic_output_dir, check_free_space, check_output_path
from ..method import peft_alpha_for
from ..progress import Progress
from ..safetensors_io import SafetensorsWriter
from ..threads import worker_threads

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


def _tensor_specs(adapter: NestedAdapter, k: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """The rank-``k`` file's tensors, in source order: module ``i``'s ``A[:k]`` is tensor ``2i``,
    its ``B[:, :k]`` tensor ``2i + 1``."""
    specs = []
    for m in adapter.modules.values():
        specs.append((m.key_a, adapter.dtype, (k, m.in_features)))
        specs.append((m.key_b, adapter.dtype, (m.out_features, k)))
    return specs


class _Cancelled(Exception):
    """Another thread failed, or the user interrupted: stop."""


class _SharedWork:
    """What the slicing threads share: the modules left (handed out in file order), the
    progress count, the non-finite modules found, and a stop flag."""

    def __init__(self, adapter: NestedAdapter, total: int, progress: Progress | None) -> None:
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._modules: "queue.SimpleQueue[tuple[int, str]]" = queue.SimpleQueue()
        for item in enumerate(adapter.modules):
            self._modules.put(item)
        self._done = 0
        self._total = total
        self._progress = progress
        self.non_finite: list[tuple[int, InvalidAdapterError]] = []

    def next_module(self) -> tuple[int, str] | None:
        """The next module to slice (index in file order, name), or ``None`` when all are taken."""
        if self.stop.is_set():
            raise _Cancelled
        try:
            return self._modules.get_nowait()
        except queue.Empty:
            return None

    def advance(self, nbytes: int) -> None:
        with self._lock:
            self._done += nbytes
            if self._progress is not None:
                self._progress(self._done, self._total)

    def found_non_finite(self, index: int, error: InvalidAdapterError) -> None:
        with self._lock:
            self.non_finite.append((index, error))
        self.stop.set()


def _slice_modules(reader: AdapterReader, writers: Mapping[int, SafetensorsWriter], scale_mode: str, check_finite: bool, shared: _SharedWork) -> None:
    """One thread's work: take modules until none is left, and for each, check its source tensors
    for NaN/inf (while they are in cache), then write its ``A[:k]`` and ``B[:, :k]`` into every
    rank's file at their place. Each module's rows are read from memory once for all ranks."""
    try:
        adapter = reader.adapter
        ranks = sorted(writers, reverse=True)
        factors = {k: adapter.scale(k) if scale_mode == "baked" else None for k in ranks}
        # One work buffer for every B this thread computes: written out before the next one.
        scratch = np.empty(scratch_bytes(max(m.out_features for m in adapter.modules.values()), ranks[0]), dtype=np.uint8)
        while (item := shared.next_module()) is not None:
            index, name = item
            if check_finite:
                try:
                    reader.check_finite([name])
                except InvalidAdapterError as e:
                    shared.found_non_finite(index, e)
                    return
            nbytes = 0
            for k in ranks:
                # A[:k] is a view of the map, written out as it is; B[:, :k] is computed.
                a = reader.lora_A_data(name, k)
                b = reader.lora_B_data(name, k, factors[k], scratch)
                writers[k].write_at(2 * index, a, b)
                nbytes += a.nbytes + b.nbytes
                del a, b  # views of the map must not outlive the reader
            shared.advance(nbytes)
    except BaseException:
        shared.stop.set()
        raise


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
    shared = _SharedWork(adapter, sum(adapter.bytes_at(k) for k in folders), progress)
    with contextlib.ExitStack() as files:
        writers = {
            k: files.enter_context(SafetensorsWriter(folder / WEIGHTS_NAME, _tensor_specs(adapter, k), {"format": "pt"}))
            for k, folder in folders.items()
        }
        threads = max(1, min(workers or worker_threads(), len(adapter.modules)))
        with ThreadPoolExecutor(max_workers=threads) as pool:
            futures = [pool.submit(_slice_modules, reader, writers, scale_mode, check_finite, shared) for _ in range(threads)]
            try:
                wait(futures)
            finally:
                shared.stop.set()  # on Ctrl-C the threads stop at their next module
        errors = [e for e in (f.exception() for f in futures) if e is not None and not isinstance(e, _Cancelled)]
        if errors:
            raise errors[0]
        if shared.non_finite:
            raise min(shared.non_finite, key=lambda item: item[0])[1]  # the first bad module in file order
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
