"""Slice a nested adapter into plain PEFT LoRA adapters, one folder per rank (DESIGN.md §2).

A slice at rank ``k`` holds ``A[:k]`` and ``B[:, :k]`` (contiguous, source dtype) and an
``adapter_config.json`` with ``r = k``, so ``PeftModel.from_pretrained`` applies exactly
``ΔW_k = s(k)·B[:, :k]·A[:k, :]``:

- ``baked`` (default): ``B[:, :k]`` is multiplied by ``s(k)`` (in float32, rounded once to the
  source dtype) and ``lora_alpha = k``, so PEFT's scaling is 1. Every serving stack reads it alike.
- ``native``: the exact prefix; ``s(k)`` is expressed through ``lora_alpha``/``use_rslora``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

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
from ..errors import ConfigError, OutputExistsError, RankError
from ..fs import atomic_output_dir, check_free_space, check_output_path
from ..method import peft_alpha_for
from ..safetensors_io import FileRange, write_safetensors

logger = logging.getLogger(__name__)

ScaleMode = Literal["baked", "native"]
SCALE_MODES: tuple[str, ...] = ("baked", "native")
#: ``progress(done, total)`` in bytes; called from the library, drawn by the CLI.
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class SliceResult:
    """What one slice folder holds."""

    rank: int
    path: Path
    params: int
    bytes: int
    scale: float


def resolve_ranks(adapter: NestedAdapter, ranks: Sequence[int] | str) -> tuple[int, ...]:
    """Turn ``"all"`` into the train ranks and validate explicit ranks against ``[1, r]``.

    Raises:
        RankError: a rank is outside ``[1, r]``, or none is given.
    """
    if isinstance(ranks, str):
        if ranks != "all":
            raise RankError(f"ranks must be a list of integers or 'all', got {ranks!r}")
        return tuple(adapter.config.train_ranks)
    out = tuple(sorted(set(ranks)))
    if not out:
        raise RankError("no ranks requested: give e.g. --ranks 8,16 or --ranks all")
    bad = [k for k in out if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= adapter.max_rank]
    if bad:
        raise RankError(
            f"rank(s) {bad} are outside [1, {adapter.max_rank}] for adapter {str(adapter.path)!r}; "
            f"its train ranks are {list(adapter.config.train_ranks)}"
        )
    untrained = [k for k in out if k not in adapter.config.train_ranks]
    if untrained:
        logger.warning(
            "rank(s) %s were not trained and may be weaker; the trained ranks are %s", untrained, list(adapter.config.train_ranks)
        )
    return out


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


def _slice_tensors(reader: AdapterReader, k: int, scale_mode: str, done: list[int], total: int, progress: Progress | None) -> Iterator["np.ndarray | FileRange"]:
    adapter = reader.adapter
    factor = adapter.scale(k) if scale_mode == "baked" else None
    # One work buffer for every B of this rank: written out before the next one is computed.
    scratch = np.empty(scratch_bytes(max(m.out_features for m in adapter.modules.values()), k), dtype=np.uint8)
    for name in adapter.modules:
        a = reader.lora_A_range(name, k)  # A[:k] is a contiguous run of the source file
        yield a
        b = reader.lora_B_data(name, k, factor, scratch)
        nbytes = b.length if isinstance(b, FileRange) else b.nbytes
        yield b
        del b
        done[0] += a.length + nbytes
        if progress is not None:
            progress(done[0], total)


def write_slice(adapter: NestedAdapter, k: int, folder: Path, scale_mode: str = "baked", *, reader: AdapterReader | None = None, progress: Progress | None = None, _done: list[int] | None = None, _total: int | None = None) -> SliceResult:
    """Write the rank-``k`` slice of ``adapter`` into the existing, empty ``folder``."""
    if scale_mode not in SCALE_MODES:
        raise ConfigError(f"unknown scale mode {scale_mode!r}: expected one of {', '.join(SCALE_MODES)}")
    if not 1 <= k <= adapter.max_rank:
        raise RankError(f"rank {k} is outside [1, {adapter.max_rank}] for adapter {str(adapter.path)!r}")
    specs = []
    for m in adapter.modules.values():
        specs.append((m.key_a, adapter.dtype, (k, m.in_features)))
        specs.append((m.key_b, adapter.dtype, (m.out_features, k)))
    done = _done if _done is not None else [0]
    total = _total if _total is not None else adapter.bytes_at(k)

    def run(rd: AdapterReader) -> int:
        return write_safetensors(folder / WEIGHTS_NAME, specs, _slice_tensors(rd, k, scale_mode, done, total, progress), {"format": "pt"})

    if reader is None:
        with adapter.reader() as rd:
            nbytes = run(rd)
    else:
        nbytes = run(reader)
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
    return SliceResult(rank=k, path=folder, params=adapter.params_at(k), bytes=nbytes, scale=adapter.scale(k))


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

    ``workers`` threads write rank files concurrently (default: up to 4, one per CPU).

    The whole ``output`` folder appears at once when every slice is written (written in a
    temporary sibling, then renamed), so a failure leaves nothing behind.

    Raises:
        InvalidAdapterError: the adapter folder is invalid.
        RankError: a rank is outside ``[1, r]``.
        ConfigError: unknown ``scale_mode``.
        OutputExistsError: ``output`` exists and ``force`` is false.
    """
    if scale_mode not in SCALE_MODES:
        raise ConfigError(f"unknown scale mode {scale_mode!r}: expected one of {', '.join(SCALE_MODES)}")
    check_output_path(output, force)
    nested = adapter if isinstance(adapter, NestedAdapter) else NestedAdapter.load(adapter)
    ks = resolve_ranks(nested, ranks if isinstance(ranks, str) else list(ranks))
    total = sum(nested.bytes_at(k) for k in ks)
    check_free_space(Path(output).absolute().parent, total)
    done = [0]
    with atomic_output_dir(output, force) as tmp, nested.reader() as rd:
        # Ranks are independent files: write them from a few threads (the copies and writes
        # release the GIL), largest first so the threads finish together.
        with ThreadPoolExecutor(max_workers=workers or max(1, min(len(ks), os.cpu_count() or 1, 4))) as pool:
            futures = {}
            for k in sorted(ks, reverse=True):
                folder = tmp / f"r{k}"
                folder.mkdir()
                futures[k] = pool.submit(write_slice, nested, k, folder, scale_mode, reader=rd, progress=progress, _done=done, _total=total)
            results = [futures[k].result() for k in ks]
        for res in results:
            logger.info("wrote rank %d slice (%d params)", res.rank, res.params)
    final = Path(output)
    return [SliceResult(r.rank, final / r.path.name, r.params, r.bytes, r.scale) for r in results]


__all__ = ["SliceResult", "SCALE_MODES", "resolve_ranks", "slice_adapter", "slice_peft_config", "write_slice", "OutputExistsError"]
