"""What every ONNX export shares: its options (:class:`OnnxExportOptions`), its result, the checks
made before any weight is read, the room on disk, the steps after the exporter ran, and
``export_info.json``. The plain exports (:mod:`.export`) and the GenAI decoder (:mod:`.genai`)
are two users of these steps; neither imports the other's module for them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...adapter import NestedAdapter
from ...errors import ConfigError, RankError
from ...fs import check_free_space, check_output_path
from ...io.jsonio import write_json
from ...params import param
from ...provenance import created_by
from ...validate import is_int
from .graph import DEFAULT_OPSET, EXTERNAL_DATA_BYTES, param_bytes
from .kinds import ExportKind
from .ort_adapter import add_empty_defaults, write_adapter_files
from .verify import ATOL, RTOL, RankCheck, check_onnx_model, check_provider

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

@dataclass(frozen=True)
class OnnxExportOptions:
    """How :func:`~.export.export_onnx` (and :func:`~.genai.export_genai`) export: the kind, the
    opset and the verification. The defaults export the dynamic-rank kind, verified on the CPU."""

    rank: int | None = param(None, help="Fixed-rank export at rank K (default: the rank is a runtime input).", flag="--rank", min=1)
    merged: bool = param(False, help="With --rank: merge the rank-K delta into the weights (no LoRA ops in the graph).",
                         flag="--merged", hint="see --merged and --rank")
    adapters_per_rank: bool = param(
        False, flag="--adapters-per-rank",
        help="One model with the LoRA weights as inputs, plus adapters/r{k}.onnx_adapter per train rank (onnxruntime.LoraAdapter).")
    genai: bool = param(
        False, flag="--genai",
        help="A decoder with a KV cache (past_key_values.* in, present.* out) and genai_config.json for onnxruntime-genai "
             "(Llama, Qwen2); the rank is the lora_rank input, or with --adapters-per-rank one adapter file per train rank.")
    opset: int = param(DEFAULT_OPSET, help="ONNX opset to write (14 to 25).", flag="--opset", show_default=True)
    verify: bool = param(True, help="Skip the ONNX Runtime vs PyTorch check at every train rank.", flag="--no-verify", negate=True)
    provider: str = param("CPUExecutionProvider", flag="--provider", show_default=True,
                          help="ONNX Runtime execution provider for verification, e.g. CUDAExecutionProvider (needs pip install '.[gpu]').")
    atol: float = param(ATOL, help="Absolute tolerance of the ONNX Runtime vs PyTorch check.")
    rtol: float = param(RTOL, help="Relative tolerance of the ONNX Runtime vs PyTorch check.")
    external_data: bool | None = param(
        None, help="Store the weights in model.onnx.data (default: when they exceed EXTERNAL_DATA_BYTES; protobuf caps one file at 2 GB).")

    def kind(self) -> ExportKind:
        """The export kind these options ask for (:func:`resolve_kind`).

        Raises:
            ConfigError: conflicting options.
        """
        return resolve_kind(self.rank, self.merged, self.adapters_per_rank, self.genai)


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


def open_export_inputs(
    adapter: str | os.PathLike[str] | NestedAdapter, base_model: str | os.PathLike[str], output: str | os.PathLike[str],
    options: OnnxExportOptions, force: bool,
) -> tuple[NestedAdapter, list[Any]]:
    """The checks every ONNX export makes before it reads a weight, in this order: the opset, the
    output against the inputs, the adapter, the options' ``rank`` (when given), the provider (to verify).

    Returns the opened adapter and the input paths the output must keep clear of.

    Raises:
        ConfigError, OutputExistsError, OutputPathError, InvalidAdapterError, RankError: see :func:`export_onnx`.
    """
    check_opset(options.opset)
    sources = [adapter.path if isinstance(adapter, NestedAdapter) else adapter, base_model]
    check_output_path(output, force, sources)
    nested = adapter if isinstance(adapter, NestedAdapter) else NestedAdapter.load(adapter)
    rank = options.rank
    if rank is not None:
        if not is_int(rank) or not 1 <= rank <= nested.max_rank:
            raise RankError(f"rank {rank!r} is outside [1, {nested.max_rank}] for adapter {str(nested.path)!r}; its train ranks are {list(nested.config.train_ranks)}",
                            rank=rank, option="rank")
        nested.check_rank(rank)
    if options.verify:
        check_provider(options.provider)
    return nested, sources


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
    write_json(folder / INFO_NAME, info)


__all__ = [
    "INFO_FORMAT", "INFO_NAME", "MAX_OPSET", "MIN_OPSET", "MODEL_NAME", "OnnxExportOptions", "OnnxExportResult", "check_opset",
    "check_room", "finish_model", "graph_size", "open_export_inputs", "resolve_kind", "write_export_info",
]
