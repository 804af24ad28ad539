"""The decoder graph with a KV cache that ONNX Runtime GenAI and Optimum expect, and its export.

Inputs, in this order:

- ``input_ids`` ``[batch_size, sequence_length]`` int64;
- ``attention_mask`` ``[batch_size, total_sequence_length]`` int64 (past plus new tokens);
- ``position_ids`` ``[batch_size, sequence_length]`` int64;
- ``past_key_values.{i}.key`` / ``.value`` ``[batch_size, num_key_value_heads, past_sequence_length, head_size]``
  float32 for every layer ``i`` (``past_sequence_length = 0`` on the first step);
- ``lora_rank`` (``dynamic``): int64 scalar, clamped into ``[0, r]``, ``0`` = the base model; or
  (``adapters``) ``<module>.lora_A.weight`` ``[in, k]`` / ``<module>.lora_B.weight`` ``[k, out]``
  in Olive's naming, fed from ``.onnx_adapter`` files (see :mod:`.ort_adapter`).

Outputs: ``logits`` ``[batch_size, sequence_length, vocab]`` and ``present.{i}.key`` / ``.value``
``[batch_size, num_key_value_heads, total_sequence_length, head_size]`` (the past with the new
tokens appended: GenAI's ``past_present_share_buffer = false`` layout).

The LoRA layers are the wrappers of :mod:`.graph`; the transformers model runs with a
``DynamicCache`` built from the past tensors, so the attention is the model's own code.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...adapter import NestedAdapter
from ...errors import ExportError
from .graph import (
    DEFAULT_OPSET,
    _quiet,
    adapter_input_names,
    build_export_model,
    input_factors,
    scale_tensor,
)
from .kinds import ExportKind

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

#: Symbolic dimension names, as GenAI's model builder writes them.
BATCH, SEQUENCE, PAST, TOTAL = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"


def kv_names(num_layers: int, prefix: str) -> list[str]:
    """``{prefix}.{i}.key``, ``{prefix}.{i}.value`` for every layer, in graph order."""
    return [f"{prefix}.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def past_names(num_layers: int) -> list[str]:
    """``past_key_values.{i}.key`` / ``.value``: the cache inputs."""
    return kv_names(num_layers, "past_key_values")


def present_names(num_layers: int) -> list[str]:
    """``present.{i}.key`` / ``.value``: the cache outputs."""
    return kv_names(num_layers, "present")


def kv_shape(config: Any) -> tuple[int, int, int]:
    """``(num_hidden_layers, num_key_value_heads, head_size)`` of a transformers decoder config."""
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
    return int(config.num_hidden_layers), kv_heads, int(head)


def _cache_keyword(model: "torch.nn.Module") -> str:
    """The forward keyword of the cache: ``cache`` (transformers 5.2x) or ``past_key_values`` (before)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def build_decoder_top(model: "torch.nn.Module", adapter: NestedAdapter, kind: ExportKind) -> "torch.nn.Module":
    """Wrap the causal LM ``model`` in place for ``kind`` (``dynamic`` or ``adapters``); return the top module.

    The top module's forward is ``(input_ids, attention_mask, position_ids, past, extra) →
    (logits, *present)`` with ``past`` the flat tuple of cache tensors and ``extra`` either the
    ``lora_rank`` tensor or the flat tuple of LoRA factors.
    """
    kind = ExportKind(kind)
    import torch
    from transformers import DynamicCache

    _, state = build_export_model(model, "causal-lm", adapter, kind, None)
    layers, _, _ = kv_shape(model.config)
    r, scaling, alpha, names = adapter.max_rank, adapter.config.scaling, adapter.config.alpha, list(adapter.modules)
    keyword = _cache_keyword(model)
    config = model.config

    def step(ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, past: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(layers)], config=config)
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{keyword: cache})
        new = getattr(out, keyword) if hasattr(out, keyword) else out.past_key_values
        present: list[torch.Tensor] = []
        for layer in new.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)

    class DecoderRankTop(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, past, lora_rank):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202 - traced by torch.export
            kt = torch.clamp(lora_rank.reshape(()), 0, r)
            state.scale = scale_tensor(kt, scaling, alpha)
            k = kt.item()
            torch._check(k >= 0)
            torch._check(k <= r)
            state.k, state.index = k, None
            return step(input_ids, attention_mask, position_ids, past)

    class DecoderAdapterTop(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, past, weights):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202 - traced by torch.export
            state.weights = {n: (weights[2 * i], weights[2 * i + 1]) for i, n in enumerate(names)}
            return step(input_ids, attention_mask, position_ids, past)

    if kind not in ("dynamic", "adapters"):
        raise ValueError(f"unknown decoder export kind {kind!r}")
    top = DecoderRankTop() if kind.rank_input else DecoderAdapterTop()
    return top.eval()


def _example_inputs(model: "torch.nn.Module", adapter: NestedAdapter, kind: ExportKind) -> tuple[Any, ...]:
    import torch

    kind = ExportKind(kind)
    layers, kv_heads, head = kv_shape(model.config)
    vocab = int(model.config.vocab_size)
    gen = torch.Generator().manual_seed(0)
    batch, seq, past = 2, 3, 4  # distinct sizes, none 0 or 1 (torch.export specialises those)
    ids = torch.randint(min(3, vocab - 1), vocab, (batch, seq), generator=gen)
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    pos = torch.arange(past, past + seq, dtype=torch.int64).expand(batch, seq).contiguous()
    cache = tuple(torch.randn(batch, kv_heads, past, head, generator=gen) for _ in range(2 * layers))
    if kind.rank_input:
        extra: Any = torch.tensor(adapter.max_rank, dtype=torch.int64)
    else:
        extra = tuple(t for _, a, b in input_factors(adapter) for t in (a, b))
    return ids, mask, pos, cache, extra


def input_names(num_layers: int, adapter: NestedAdapter, kind: ExportKind) -> list[str]:
    """The graph inputs of a decoder export, in order."""
    kind = ExportKind(kind)
    head = ["input_ids", "attention_mask", "position_ids", *past_names(num_layers)]
    return head + (["lora_rank"] if kind.rank_input else adapter_input_names(adapter))


def export_decoder(
    top: "torch.nn.Module", model_config: Any, adapter: NestedAdapter, kind: ExportKind, path: Path, *, opset: int = DEFAULT_OPSET,
    external_data: bool = False,
) -> None:
    """Export ``top`` (from :func:`build_decoder_top`) to ``path`` with the dynamo exporter.

    Batch, sequence, past and total lengths are dynamic (the past may be empty); the symbolic
    dimensions get GenAI's names.

    Raises:
        ExportError: the exporter fails (there is no TorchScript fallback: it cannot trace the cache).
    """
    import torch

    kind = ExportKind(kind)
    layers, _, _ = kv_shape(model_config)
    args = _example_inputs(top.model, adapter, kind)
    batch, seq = torch.export.Dim(BATCH), torch.export.Dim(SEQUENCE)
    past = torch.export.Dim(PAST, min=0)
    dyn_past = tuple({0: batch, 2: past} for _ in range(2 * layers))
    if kind.rank_input:
        dyn_extra: Any = None
    else:
        rank_dim = torch.export.Dim("lora_r", min=1, max=max(2, adapter.max_rank)) if adapter.max_rank > 1 else None
        dyn_extra = tuple(d for _ in adapter.modules for d in ((({1: rank_dim}), ({0: rank_dim})) if rank_dim else (None, None)))
    dynamic_shapes = ({0: batch, 1: seq}, {0: batch, 1: torch.export.Dim.AUTO}, {0: batch, 1: seq}, dyn_past, dyn_extra)
    try:
        with _quiet():
            prog = torch.onnx.export(
                top, args, dynamo=True, input_names=input_names(layers, adapter, kind),
                output_names=["logits", *present_names(layers)], dynamic_shapes=dynamic_shapes,
                opset_version=opset, optimize=True, verbose=False,
            )
            prog.save(str(path), external_data=external_data)
    except Exception as e:  # any exporter failure is reported the same way
        for p in path.parent.glob(path.name + "*"):
            p.unlink()
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ExportError(
            f"the decoder export with a KV cache failed ({type(e).__name__}: {first}); run with MLORA_DEBUG=1 -vv for details"
        ) from e
    rename_dims(path, layers)


def rename_dims(path: Path, num_layers: int) -> None:
    """Give the graph's inputs and outputs GenAI's dimension names (``total_sequence_length`` …).

    The exporter names the mask's length after an internal symbol and the present's after the
    sum ``past + sequence``; both are the total length. External data is left in place.
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    mask = next(i for i in model.graph.input if i.name == "attention_mask")
    old_total = mask.type.tensor_type.shape.dim[1].dim_param
    presents = set(present_names(num_layers))
    totals = {old_total} if old_total else set()
    for o in model.graph.output:
        if o.name in presents:
            d = o.type.tensor_type.shape.dim[2]
            if d.dim_param:
                totals.add(d.dim_param)
    for vi in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param in totals:
                d.dim_param = TOTAL
    onnx.save_model(model, str(path))


__all__ = [
    "BATCH", "PAST", "SEQUENCE", "TOTAL", "build_decoder_top", "export_decoder", "input_names", "kv_shape", "past_names",
    "present_names", "rename_dims",
]
