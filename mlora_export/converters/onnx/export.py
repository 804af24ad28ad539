"""``export_onnx``: one nested adapter + its base model → a verified ONNX export (four kinds).

- ``dynamic`` (default): inputs ``input_ids``, ``attention_mask``, ``lora_rank`` (int64 scalar,
  clamped into ``[0, r]``; ``0`` is the base model); output ``logits``.
- ``fixed``: the rank-``k`` adapter as constants; inputs ``input_ids``, ``attention_mask``.
- ``merged``: ``W + ΔW_k`` folded into the float32 weights; no LoRA ops at all.
- ``adapters``: LoRA factors as graph inputs with a symbolic rank, plus ``adapters/r{k}.onnx_adapter``
  per train rank for ``onnxruntime.LoraAdapter`` / ``RunOptions.add_active_adapter``.

Every export is checked with ``onnx.checker`` and, unless ``verify=False``, run in ONNX Runtime
against PyTorch (DESIGN.md §1 reference in float64, on text from the base's tokenizer, within what
float32 PyTorch itself achieves: :mod:`.verify`) at every train rank; a mismatch raises
:class:`~mlora_export.errors.ExportError` and nothing is written.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...adapter import NestedAdapter
from ...base import check_fits, check_float_targets, scan_base
from ...errors import ConfigError, RankError
from ...fs import atomic_output_dir, check_free_space, check_output_path
from ...progress import Progress, StepCounter
from ...provenance import created_by
from ...validate import is_int
from .graph import (
    DEFAULT_OPSET,
    EXTERNAL_DATA_BYTES,
    adapter_input_names,
    build_export_model,
    export_graph,
    load_export_model,
    param_bytes,
)
from .kinds import EXPORT_KINDS, ExportKind
from .ort_adapter import (
    add_empty_defaults,
    write_adapter_files,
)
from .verify import (
    ATOL,
    RTOL,
    RankCheck,
    check_onnx_model,
    check_provider,
    reference_logits,
    run_adapter,
    run_rank,
    text_inputs,
    verify_export,
)

logger = logging.getLogger(__name__)

MODEL_NAME = "model.onnx"
INFO_NAME = "export_info.json"
INFO_FORMAT = "mlora-onnx/1"
MIN_OPSET = 14
#: Highest opset that exports, passes onnx.checker and runs (torch 2.13's exporter, onnx 1.23, ORT 1.32):
#: from 26 on, the exporter's version conversion leaves ops that onnx.checker rejects.
MAX_OPSET = 25


@dataclass
class OnnxExportResult:
    """What an export wrote and how it verified."""

    kind: str
    path: Path
    task: str
    exporter: str
    opset: int
    rank: int | None
    inputs: list[str]
    external_data: bool
    checks: list[RankCheck] = field(default_factory=list)
    adapter_files: dict[int, str] = field(default_factory=dict)
    seconds: float = 0.0
    #: What the verification ran on: ``"text"`` (the base's tokenizer), ``"random"`` token ids, or ``""`` (not verified).
    verified_on: str = ""

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_NAME

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "path": str(self.path),
            "model": str(self.model_path),
            "task": self.task,
            "exporter": self.exporter,
            "opset": self.opset,
            "rank": self.rank,
            "inputs": self.inputs,
            "outputs": ["logits"],
            "external_data": self.external_data,
            "adapter_files": {str(k): v for k, v in self.adapter_files.items()},
            "verification": [c.to_dict() for c in self.checks],
            "verified_on": self.verified_on or None,
            "seconds": round(self.seconds, 2),
        }


def resolve_kind(rank: int | None, merged: bool, adapters_per_rank: bool, genai: bool = False) -> ExportKind:
    """The export kind from the options: a rank, merged, one adapter file per rank, a GenAI decoder.

    Raises:
        ConfigError: ``merged`` without ``rank``, ``adapters_per_rank`` with ``rank``/``merged``,
            or ``genai`` with ``rank``/``merged``.
    """
    if genai:
        if rank is not None or merged:
            raise ConfigError(
                "a GenAI decoder with a KV cache takes its rank per request (lora_rank, or one adapter file per train rank); "
                "it cannot be combined with a fixed rank or a merged export",
                option="genai",
            )
        return ExportKind.GENAI_ADAPTERS if adapters_per_rank else ExportKind.GENAI
    if adapters_per_rank:
        if rank is not None or merged:
            raise ConfigError("one adapter file per train rank cannot be combined with a fixed rank or a merged export", option="adapters_per_rank")
        return ExportKind.ADAPTERS
    if merged:
        if rank is None:
            raise ConfigError("a merged export needs a rank: the rank whose delta is merged into the base weights", option="merged")
        return ExportKind.MERGED
    return ExportKind.FIXED if rank is not None else ExportKind.DYNAMIC


def check_opset(opset: int) -> int:
    """Return ``opset`` if this onnx build can write it and the exporters support it.

    Raises:
        ConfigError: outside ``[MIN_OPSET, min(MAX_OPSET, onnx.defs.onnx_opset_version())]``.
    """
    import onnx

    top = min(MAX_OPSET, onnx.defs.onnx_opset_version())
    if not is_int(opset) or not MIN_OPSET <= opset <= top:
        raise ConfigError(f"opset {opset!r} is not supported: expected an integer in [{MIN_OPSET}, {top}] (default {DEFAULT_OPSET})", option="opset")
    return opset


def export_onnx(
    adapter: str | os.PathLike[str] | NestedAdapter,
    base_model: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    rank: int | None = None,
    merged: bool = False,
    adapters_per_rank: bool = False,
    opset: int = DEFAULT_OPSET,
    verify: bool = True,
    force: bool = False,
    provider: str = "CPUExecutionProvider",
    atol: float = ATOL,
    rtol: float = RTOL,
    external_data: bool | None = None,
    progress: Progress | None = None,
    genai: bool = False,
) -> OnnxExportResult:
    """Export ``adapter`` on ``base_model`` to the folder ``output`` (see the module docstring).

    ``genai``: a decoder with a KV cache and ``genai_config.json`` for ONNX Runtime GenAI instead
    (:func:`~mlora_export.converters.onnx.genai.export_genai`; with ``adapters_per_rank``, Olive-style adapter files).

    ``external_data``: store the weights in ``model.onnx.data``; ``None`` (default) does so when
    they exceed :data:`EXTERNAL_DATA_BYTES` (protobuf caps one file at 2 GB).

    Raises:
        ConfigError: conflicting flags, a bad opset or an unavailable provider.
        RankError: ``rank`` outside ``[1, r]``.
        OutputExistsError: ``output`` exists without ``force`` or cannot be written.
        OutputPathError: ``output`` is, holds or lies inside the adapter or base model folder.
        InvalidAdapterError, BaseModelError, BaseModelMismatchError: bad inputs.
        ExportError: the exporters fail, or ONNX Runtime disagrees with PyTorch beyond tolerance.
    """

    t0 = time.perf_counter()
    kind = resolve_kind(rank, merged, adapters_per_rank, genai)
    if genai:
        from .genai import export_genai

        return export_genai(
            adapter, base_model, output, adapters_per_rank=adapters_per_rank, opset=opset, verify=verify, force=force,
            provider=provider, atol=atol, rtol=rtol, external_data=external_data, progress=progress,
        )
    nested, sources = open_export_inputs(adapter, base_model, output, opset=opset, force=force, verify=verify, provider=provider, rank=rank)
    adapter_ranks, verify_ranks = _export_ranks(kind, nested, rank, verify)
    tick = StepCounter(4 + len(adapter_ranks) + len(verify_ranks), progress, logger, "onnx export")
    check_float_targets(scan_base(base_model), nested.modules)  # headers only: before the model loads
    model, task = load_export_model(base_model)
    check_fits(nested, model, base=str(base_model))
    vocab = int(getattr(model.config, "vocab_size"))
    # float32 bytes in the graph (the LoRA factors are constants in dynamic and fixed exports)
    lora_in_graph = {"dynamic": nested.max_rank, "fixed": rank or 0}.get(kind, 0)
    nbytes, external = graph_size(model, nested, lora_in_graph, external_data)
    tick("base model loaded")
    feeds, source = text_inputs(base_model, vocab) if verify else ({}, "")
    refs = reference_logits(model, task, nested, verify_ranks, feeds) if verify else {}

    check_room(output, nbytes, nested, adapter_ranks)
    with atomic_output_dir(output, force, sources) as tmp:
        top, _ = build_export_model(model, task, nested, kind, rank)
        tick("model wrapped")
        path = tmp / MODEL_NAME
        exporter = export_graph(top, kind, nested, vocab, path, opset=opset, external_data=external)
        files = finish_model(path, nested, kind.factor_inputs, exporter, adapter_ranks, tick)
        inputs = ["input_ids", "attention_mask"] + (["lora_rank"] if kind.rank_input else adapter_input_names(nested) if kind.factor_inputs else [])
        shown = inputs[:2] + ["<module>.lora_A.weight", "<module>.lora_B.weight"] if kind.factor_inputs else inputs
        result = OnnxExportResult(kind, Path(output), task, exporter, opset, rank, shown, external)
        result.adapter_files, result.verified_on = files, source
        if verify:
            run = functools.partial(_run_export, kind, feeds, {k: tmp / f for k, f in files.items()})
            result.checks = verify_export(path, provider, verify_ranks, refs, run, atol=atol, rtol=rtol, tick=tick)
        result.seconds = time.perf_counter() - t0
        write_export_info(tmp, result, nested, base_model, inputs)
    return result


def open_export_inputs(
    adapter: str | os.PathLike[str] | NestedAdapter, base_model: str | os.PathLike[str], output: str | os.PathLike[str], *,
    opset: int, force: bool, verify: bool, provider: str, rank: int | None = None,
) -> tuple[NestedAdapter, list[Any]]:
    """The checks every ONNX export makes before it reads a weight, in this order: the opset, the
    output against the inputs, the adapter, ``rank`` (when given), the provider (to verify).

    Returns the opened adapter and the input paths the output must keep clear of.

    Raises:
        ConfigError, OutputExistsError, OutputPathError, InvalidAdapterError, RankError: see :func:`export_onnx`.
    """
    check_opset(opset)
    sources = [adapter.path if isinstance(adapter, NestedAdapter) else adapter, base_model]
    check_output_path(output, force, sources)
    nested = adapter if isinstance(adapter, NestedAdapter) else NestedAdapter.load(adapter)
    if rank is not None:
        if not is_int(rank) or not 1 <= rank <= nested.max_rank:
            raise RankError(f"rank {rank!r} is outside [1, {nested.max_rank}] for adapter {str(nested.path)!r}; its train ranks are {list(nested.config.train_ranks)}",
                            rank=rank, option="rank")
        nested.check_rank(rank)
    if verify:
        check_provider(provider)
    return nested, sources


def _export_ranks(kind: ExportKind, nested: NestedAdapter, rank: int | None, verify: bool) -> tuple[list[int], list[int]]:
    """``(adapter_ranks, verify_ranks)``: the ranks that get an adapter file (the train ranks, for
    factor inputs) and those checked in ONNX Runtime (with a rank input, also 0 = the base model)."""
    train_ranks = list(nested.config.train_ranks)
    adapter_ranks = train_ranks if kind.factor_inputs else []
    if not verify:
        return adapter_ranks, []
    return adapter_ranks, [0] + train_ranks if kind.rank_input else train_ranks if kind.factor_inputs else [int(rank or 0)]


def graph_size(model: Any, nested: NestedAdapter, lora_rank: int, external_data: bool | None) -> tuple[int, bool]:
    """``(bytes, external)``: the float32 bytes of the graph (the base's parameters plus the LoRA
    factors up to ``lora_rank`` held as constants) and whether they go to ``model.onnx.data``
    (``external_data``, or by default when they exceed :data:`EXTERNAL_DATA_BYTES`)."""
    nbytes = param_bytes(model) + 4 * nested.params_at(lora_rank)
    return nbytes, nbytes > EXTERNAL_DATA_BYTES if external_data is None else bool(external_data)


def check_room(output: str | os.PathLike[str], graph_bytes: int, nested: NestedAdapter, adapter_ranks: list[int]) -> None:
    """Refuse an export the disk cannot hold: the model plus one float32 adapter file per rank
    (``A[:k]`` and ``s(k)·B[:, :k]``).

    Raises:
        InsufficientDiskError: not enough free space next to ``output``.
    """
    check_free_space(Path(output).absolute().parent, graph_bytes + sum(4 * nested.params_at(k) for k in adapter_ranks))


def finish_model(
    path: Path, nested: NestedAdapter, factor_inputs: bool, exporter: str, adapter_ranks: list[int], tick: Callable[[str], None],
) -> dict[int, str]:
    """After the exporter ran: empty default factors (no active adapter = the base model), the
    ``onnx.checker``, then one ``.onnx_adapter`` file per rank of ``adapter_ranks`` next to the
    model. Returns those files by rank.

    Raises:
        ExportError: the checker refuses the model.
    """
    if factor_inputs:
        add_empty_defaults(path, nested)
    tick(f"exported with the {exporter} exporter")
    check_onnx_model(path, DEFAULT_OPSET)
    tick("onnx.checker passed")
    return write_adapter_files(nested, adapter_ranks, path.parent, tick)


def _run_export(kind: ExportKind, feeds: dict[str, Any], adapter_files: dict[int, Path], session: Any, k: int) -> Any:
    """The logits of a plain export at rank ``k``: fed as ``lora_rank``, with the rank's adapter
    file active, or (fixed and merged) the one rank the graph holds."""
    if kind.rank_input:
        return run_rank(session, feeds, k)
    if kind.factor_inputs:
        return run_adapter(session, feeds, adapter_files[k])
    return session.run(["logits"], feeds)[0]


def write_export_info(
    folder: Path, result: OnnxExportResult, adapter: NestedAdapter, base_model: str | os.PathLike[str], inputs: list[str],
    *, info_format: str = INFO_FORMAT, **extra: Any,
) -> None:
    """``export_info.json``: what was exported, its inputs, the rank input's contract, the source adapter."""
    info = {
        "format": info_format,
        **{k: v for k, v in result.to_dict().items() if k not in ("path", "model", "seconds")},
        "model": MODEL_NAME,
        "inputs": inputs,
        **{k: v for k, v in extra.items() if k != "lora_rank"},
        "lora_rank": (
            {"dtype": "int64", "shape": [], "range": [0, adapter.max_rank], "out_of_range": "clamped into [0, r]; 0 = base model",
             **extra.get("lora_rank", {})}
            if ExportKind(result.kind).rank_input else None
        ),
        "adapter": {
            "source": str(adapter.path), "max_rank": adapter.max_rank, "train_ranks": list(adapter.config.train_ranks),
            "scaling": adapter.config.scaling, "alpha": adapter.config.alpha, "method": adapter.config.method,
        },
        "base_model": str(base_model),
        "created_by": created_by(),
    }
    with open(folder / INFO_NAME, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)
        f.write("\n")


__all__ = [
    "EXPORT_KINDS", "ExportKind", "INFO_NAME", "MODEL_NAME", "OnnxExportResult", "check_opset", "check_room", "export_onnx", "finish_model",
    "graph_size", "open_export_inputs", "resolve_kind", "write_export_info",
]
