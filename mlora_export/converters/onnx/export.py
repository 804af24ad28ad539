"""``export_onnx``: one nested adapter + its base model → a verified ONNX export (four kinds).

- ``dynamic`` (default): inputs ``input_ids``, ``attention_mask``, ``lora_rank`` (int64 scalar,
  clamped into ``[0, r]``; ``0`` is the base model); output ``logits``.
- ``fixed``: the rank-``k`` adapter as constants; inputs ``input_ids``, ``attention_mask``.
- ``merged``: ``W + ΔW_k`` folded into the float32 weights; no LoRA ops at all.
- ``adapters``: LoRA factors as graph inputs with a symbolic rank, plus ``adapters/r{k}.onnx_adapter``
  per train rank for ``onnxruntime.LoraAdapter`` / ``RunOptions.add_active_adapter``.

Every export is checked with ``onnx.checker`` and, unless ``verify=False``, run in ONNX Runtime
against PyTorch (docs/design.md §1 reference) at every train rank; a mismatch raises
:class:`~mlora_export.errors.ExportError` and nothing is written.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path
from typing import Any

from ...adapter import NestedAdapter
from ...base import check_fits, check_float_targets, scan_base
from ...fs import atomic_output_dir
from ...params import merge_legacy
from ...progress import Progress, StepCounter
from .common import (
    INFO_NAME,
    MODEL_NAME,
    OnnxExportOptions,
    OnnxExportResult,
    check_opset,
    check_room,
    finish_model,
    graph_size,
    open_export_inputs,
    resolve_kind,
    write_export_info,
)
from .graph import (
    adapter_input_names,
    build_export_model,
    export_graph,
    load_export_model,
)
from .kinds import EXPORT_KINDS, ExportKind
from .verify import (
    reference_logits,
    run_adapter,
    run_rank,
    sample_inputs,
    verify_export,
)

logger = logging.getLogger(__name__)


def export_onnx(
    adapter: str | os.PathLike[str] | NestedAdapter,
    base_model: str | os.PathLike[str],
    output: str | os.PathLike[str],
    options: OnnxExportOptions | None = None,
    *,
    force: bool = False,
    progress: Progress | None = None,
    **legacy: Any,
) -> OnnxExportResult:
    """Export ``adapter`` on ``base_model`` to the folder ``output`` (see the module docstring), as
    ``options`` say (:class:`~.common.OnnxExportOptions`: the kind, the opset, the verification).

    With ``options.genai`` the export is :func:`~mlora_export.converters.onnx.genai.export_genai`'s
    (a decoder with a KV cache for ONNX Runtime GenAI). The options passed as keywords of this
    function (``rank=8``…) still work for one release, with a ``DeprecationWarning``.

    Raises:
        ConfigError: conflicting options, a bad opset or an unavailable provider.
        RankError: ``rank`` outside ``[1, r]``.
        OutputExistsError: ``output`` exists without ``force`` or cannot be written.
        OutputPathError: ``output`` is, holds or lies inside the adapter or base model folder.
        InvalidAdapterError, BaseModelError, BaseModelMismatchError: bad inputs.
        ExportError: the exporters fail, or ONNX Runtime disagrees with PyTorch beyond tolerance.
    """
    options = merge_legacy(options, OnnxExportOptions, legacy, "export_onnx")
    t0 = time.perf_counter()
    kind = options.kind()
    if options.genai:
        from .genai import export_genai

        return export_genai(adapter, base_model, output, options, force=force, progress=progress)
    nested, sources = open_export_inputs(adapter, base_model, output, options, force)
    rank = options.rank
    adapter_ranks, verify_ranks = _export_ranks(kind, nested, rank, options.verify)
    tick = StepCounter(4 + len(adapter_ranks) + len(verify_ranks), progress, logger, "onnx export")
    check_float_targets(scan_base(base_model), nested.modules)  # headers only: before the model loads
    model, task = load_export_model(base_model)
    check_fits(nested, model, base=str(base_model))
    vocab = int(getattr(model.config, "vocab_size"))  # noqa: B009 - torch types a module attribute as Tensor | Module
    # float32 bytes in the graph (the LoRA factors are constants in dynamic and fixed exports)
    lora_in_graph = {"dynamic": nested.max_rank, "fixed": rank or 0}.get(kind, 0)
    nbytes, external = graph_size(model, nested, lora_in_graph, options.external_data)
    tick("base model loaded")
    feeds = sample_inputs(vocab)
    refs = reference_logits(model, task, nested, verify_ranks, feeds) if options.verify else {}

    check_room(output, nbytes, nested, adapter_ranks)
    with atomic_output_dir(output, force, sources) as tmp:
        top, _ = build_export_model(model, task, nested, kind, rank)
        tick("model wrapped")
        path = tmp / MODEL_NAME
        exporter = export_graph(top, kind, nested, vocab, path, opset=options.opset, external_data=external)
        files = finish_model(path, nested, kind.factor_inputs, exporter, adapter_ranks, tick)
        inputs = ["input_ids", "attention_mask"] + (["lora_rank"] if kind.rank_input else adapter_input_names(nested) if kind.factor_inputs else [])
        shown = inputs[:2] + ["<module>.lora_A.weight", "<module>.lora_B.weight"] if kind.factor_inputs else inputs
        result = OnnxExportResult(kind, Path(output), task, exporter, options.opset, rank, shown, external)
        result.adapter_files = files
        if options.verify:
            run = functools.partial(_run_export, kind, feeds, {k: tmp / f for k, f in files.items()})
            result.checks = verify_export(path, options.provider, verify_ranks, refs, run, tolerance=(options.atol, options.rtol), tick=tick)
        result.seconds = time.perf_counter() - t0
        write_export_info(tmp, result, nested, base_model, inputs)
    return result


def _export_ranks(kind: ExportKind, nested: NestedAdapter, rank: int | None, verify: bool) -> tuple[list[int], list[int]]:
    """``(adapter_ranks, verify_ranks)``: the ranks that get an adapter file (the train ranks, for
    factor inputs) and those checked in ONNX Runtime (with a rank input, also 0 = the base model)."""
    train_ranks = list(nested.config.train_ranks)
    adapter_ranks = train_ranks if kind.factor_inputs else []
    if not verify:
        return adapter_ranks, []
    return adapter_ranks, [0] + train_ranks if kind.rank_input else train_ranks if kind.factor_inputs else [int(rank or 0)]


def _run_export(kind: ExportKind, feeds: dict[str, Any], adapter_files: dict[int, Path], session: Any, k: int) -> Any:
    """The logits of a plain export at rank ``k``: fed as ``lora_rank``, with the rank's adapter
    file active, or (fixed and merged) the one rank the graph holds."""
    if kind.rank_input:
        return run_rank(session, feeds, k)
    if kind.factor_inputs:
        return run_adapter(session, feeds, adapter_files[k])
    return session.run(["logits"], feeds)[0]


__all__ = [
    "EXPORT_KINDS", "ExportKind", "INFO_NAME", "MODEL_NAME", "OnnxExportOptions", "OnnxExportResult", "check_opset", "check_room",
    "export_onnx", "finish_model", "graph_size", "open_export_inputs", "resolve_kind", "write_export_info",
]
