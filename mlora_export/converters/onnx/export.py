"""``export_onnx``: one nested adapter + its base model → a verified ONNX export (four kinds).

- ``dynamic`` (default): inputs ``input_ids``, ``attention_mask``, ``lora_rank`` (int64 scalar,
  clamped into ``[0, r]``; ``0`` is the base model); output ``logits``.
- ``fixed``: the rank-``k`` adapter as constants; inputs ``input_ids``, ``attention_mask``.
- ``merged``: ``W + ΔW_k`` folded into the float32 weights; no LoRA ops at all.
- ``adapters``: LoRA factors as graph inputs with a symbolic rank, plus ``adapters/r{k}.onnx_adapter``
  per train rank for ``onnxruntime.LoraAdapter`` / ``RunOptions.add_active_adapter``.

Every export is checked with ``onnx.checker`` and, unless ``verify=False``, run in ONNX Runtime
against PyTorch (DESIGN.md §1 reference) at every train rank; a mismatch raises
:class:`~mlora_export.errors.ExportError` and nothing is written.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...adapter import NestedAdapter
from ...base import check_fits, check_float_targets, scan_base
from ...errors import ConfigError, RankError
from ...fs import atomic_output_dir, check_free_space, check_output_path
from ...progress import Progress
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
    compare,
    make_session,
    raise_on_mismatch,
    reference_logits,
    run_adapter,
    run_rank,
    sample_inputs,
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
    check_opset(opset)
    inputs = [adapter.path if isinstance(adapter, NestedAdapter) else adapter, base_model]
    check_output_path(output, force, inputs)
    nested = adapter if isinstance(adapter, NestedAdapter) else NestedAdapter.load(adapter)
    if rank is not None:
        if not is_int(rank) or not 1 <= rank <= nested.max_rank:
            raise RankError(f"rank {rank!r} is outside [1, {nested.max_rank}] for adapter {str(nested.path)!r}; its train ranks are {list(nested.config.train_ranks)}",
                            rank=rank, option="rank")
        nested.check_rank(rank)
    if verify:
        check_provider(provider)
    train_ranks = list(nested.config.train_ranks)
    adapter_ranks = train_ranks if kind.factor_inputs else []
    verify_ranks = ([0] + train_ranks if kind.rank_input else train_ranks if kind.factor_inputs else [int(rank)]) if verify else []
    total = 4 + len(adapter_ranks) + len(verify_ranks)
    step = [0]

    def tick(what: str) -> None:
        step[0] += 1
        logger.info("onnx export: %s", what)
        if progress is not None:
            progress(step[0], total)

    check_float_targets(scan_base(base_model), nested.modules)  # headers only: before the model loads
    model, task = load_export_model(base_model)
    check_fits(nested, model, base=str(base_model))
    vocab = int(getattr(model.config, "vocab_size"))
    # float32 bytes in the graph (the LoRA factors are constants in dynamic and fixed exports)
    lora_in_graph = {"dynamic": nested.max_rank, "fixed": rank or 0}.get(kind, 0)
    nbytes = param_bytes(model) + 4 * nested.params_at(lora_in_graph)
    external = nbytes > EXTERNAL_DATA_BYTES if external_data is None else bool(external_data)
    tick("base model loaded")
    feeds = sample_inputs(vocab)
    refs = reference_logits(model, task, nested, verify_ranks, feeds) if verify else {}

    # the model, plus one float32 adapter file per rank (A[:k] and s(k)·B[:, :k])
    check_free_space(Path(output).absolute().parent, nbytes + sum(4 * nested.params_at(k) for k in adapter_ranks))
    with atomic_output_dir(output, force, inputs) as tmp:
        top, _ = build_export_model(model, task, nested, kind, rank)
        tick("model wrapped")
        path = tmp / MODEL_NAME
        exporter = export_graph(top, kind, nested, vocab, path, opset=opset, external_data=external)
        if kind.factor_inputs:
            add_empty_defaults(path, nested)  # no active adapter = the base model
        tick(f"exported with the {exporter} exporter")
        check_onnx_model(path, DEFAULT_OPSET)
        tick("onnx.checker passed")
        files = write_adapter_files(nested, adapter_ranks, tmp, tick)
        inputs = ["input_ids", "attention_mask"] + (["lora_rank"] if kind.rank_input else adapter_input_names(nested) if kind.factor_inputs else [])
        shown = inputs[:2] + ["<module>.lora_A.weight", "<module>.lora_B.weight"] if kind.factor_inputs else inputs
        result = OnnxExportResult(kind, Path(output), task, exporter, opset, rank, shown, external)
        result.adapter_files = files
        if verify:
            session = make_session(path, provider)
            for k in verify_ranks:
                if kind.rank_input:
                    got = run_rank(session, feeds, k)
                elif kind.factor_inputs:
                    got = run_adapter(session, feeds, tmp / files[k])
                else:
                    got = session.run(["logits"], feeds)[0]
                check = compare(k, got, refs[k], atol, rtol)
                logger.info("rank %d: max abs diff %.3g (tolerance %.3g)", k, check.max_abs_diff, check.tolerance)
                result.checks.append(check)
                tick(f"verified rank {k}")
            del session
            raise_on_mismatch(result.checks, provider, "ONNX Runtime")
        result.seconds = time.perf_counter() - t0
        write_export_info(tmp, result, nested, base_model, inputs)
    return result


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


__all__ = ["EXPORT_KINDS", "ExportKind", "INFO_NAME", "MODEL_NAME", "OnnxExportResult", "check_opset", "export_onnx", "resolve_kind", "write_export_info"]
