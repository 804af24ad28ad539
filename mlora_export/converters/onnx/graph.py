"""Build the PyTorch module that becomes the ONNX graph, and export it.

A targeted ``nn.Linear`` / ``Conv1D`` of the base model is replaced by a small wrapper:

- ``_DynamicRankLora`` (``dynamic`` export): ``y = base(x) + B[:, :k] · (s(k) · A[:k, :] · x)``
  with ``k = clamp(lora_rank, 0, r)`` read from the graph input ``lora_rank`` and ``s(k)`` computed
  in the graph for the adapter's scaling (``none`` → ``alpha``, ``rank`` → ``alpha/k``, ``sqrt`` →
  ``alpha/sqrt(k)``; ``max(k, 1)`` guards the division, and at ``k = 0`` the empty slices give a
  zero delta). The factors are *sliced* by ``k`` (ONNX ``Slice`` with a runtime end), so a lower
  rank does less work.
- ``_FixedLora`` (``fixed``): the same with constant ``A[:k]`` and ``s(k)·B[:, :k]``.
- ``_InputLora`` (``adapters``): ``Aᵀ`` (``[in, k]``) and ``(s(k)·B)ᵀ`` (``[k, out]``) are graph
  inputs named ``<module>.lora_A.weight`` / ``<module>.lora_B.weight`` with a symbolic rank
  dimension (Olive's and ONNX Runtime GenAI's naming and layout: ``y = base(x) + (x·Aᵀ)·Bᵀ``), so
  that an ONNX Runtime adapter file (``.onnx_adapter``) can supply them per run.

``merged`` exports need no wrapper: the deltas are added to the float32 base weights.

The rank travels from the top-level wrapper to the layer wrappers through one :class:`RankState`
object per exported model (not a dict: ``torch.export`` snapshots and restores module attribute
dicts, which would break the sharing).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...adapter import NestedAdapter
from ...base import TASK_CAUSAL_LM, TASK_SEQ_CLS, base_task, load_base_model
from ...errors import ExportError, NonFiniteOutputError
from .kinds import ExportKind

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

#: Default ONNX opset: the lowest the dynamo exporter writes natively.
DEFAULT_OPSET = 18
#: Models whose weights exceed this many bytes are saved with external data (protobuf's 2 GB cap).
EXTERNAL_DATA_BYTES = 1_800_000_000



def load_export_model(base_dir: str | os.PathLike[str]) -> tuple["torch.nn.Module", str]:
    """The base model in float32 for export, with its task (:func:`~mlora_export.base.base_task`);
    loaders' chatter silenced, the KV cache off (the graph takes no past)."""
    task = base_task(base_dir)
    with _quiet():
        model = load_base_model(base_dir, "float32", task=task)
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return model, task


# -- the wrappers ---------------------------------------------------------------------------


@dataclass
class RankState:
    """What the top-level wrapper hands to the layer wrappers during one forward pass."""

    k: Any = None  # python int or SymInt: the clamped rank (dynamo path)
    index: Any = None  # int64 tensor arange(k) (TorchScript path, which cannot trace a tensor-valued slice end)
    scale: Any = None  # 0-d float32 tensor s(k)
    weights: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # InputLora: name -> (A, B)


def _wrappers() -> dict[str, type]:
    """The wrapper classes (defined lazily so that importing this module does not import torch)."""
    import torch
    import torch.nn.functional as F

    class _DynamicRankLora(torch.nn.Module):
        """``base(x) + B[:, :k] · (s(k) · A[:k, :] · x)`` with ``k`` and ``s(k)`` from :class:`RankState`."""

        def __init__(self, base: torch.nn.Module, a: torch.Tensor, b: torch.Tensor, state: RankState) -> None:
            super().__init__()
            self.base = base
            self.register_buffer("lora_A", a.contiguous(), persistent=False)
            self.register_buffer("lora_B", b.contiguous(), persistent=False)
            self.state = state

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            st = self.state
            if st.index is not None:
                a = self.lora_A.index_select(0, st.index)
                b = self.lora_B.index_select(1, st.index)
            else:
                a = self.lora_A[: st.k]
                b = self.lora_B[:, : st.k]
            return self.base(x) + F.linear(F.linear(x, a) * st.scale, b)

    class _FixedLora(torch.nn.Module):
        """``base(x) + B' · (A' · x)`` with constant ``A' = A[:k]`` and ``B' = s(k)·B[:, :k]``."""

        def __init__(self, base: torch.nn.Module, a: torch.Tensor, b: torch.Tensor) -> None:
            super().__init__()
            self.base = base
            self.register_buffer("lora_A", a.contiguous(), persistent=False)
            self.register_buffer("lora_B", b.contiguous(), persistent=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.base(x) + F.linear(F.linear(x, self.lora_A), self.lora_B)

    class _InputLora(torch.nn.Module):
        """``base(x) + (x · Aᵀ) · Bᵀ`` with ``Aᵀ [in, k]``, ``Bᵀ [k, out]`` graph inputs from :class:`RankState`."""

        def __init__(self, base: torch.nn.Module, name: str, state: RankState) -> None:
            super().__init__()
            self.base = base
            self.name = name
            self.state = state

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a_t, b_t = self.state.weights[self.name]
            return self.base(x) + torch.matmul(torch.matmul(x, a_t), b_t)

    return {"dynamic": _DynamicRankLora, "fixed": _FixedLora, "input": _InputLora}


def _replace_module(model: "torch.nn.Module", name: str, new: "torch.nn.Module") -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def scale_tensor(k: "torch.Tensor", scaling: str, alpha: float) -> "torch.Tensor":
    """``s(k)`` as a 0-d float32 tensor, traceable; ``max(k, 1)`` guards the division at ``k = 0``."""
    import torch

    kf = torch.clamp(k, min=1).to(torch.float32)
    if scaling == "none":
        return torch.ones_like(kf) * alpha
    if scaling == "rank":
        return alpha / kf
    return alpha / torch.sqrt(kf)


def _factors(adapter: NestedAdapter, k: int | None = None, *, baked: bool) -> Iterator[tuple[str, "torch.Tensor", "torch.Tensor"]]:
    """``(name, A[:k], B[:, :k])`` in float32 for every module; ``baked`` multiplies B by ``s(k)``."""
    import torch

    k = adapter.max_rank if k is None else k
    s = adapter.scale(k) if k > 0 else 0.0
    with adapter.reader() as rd:
        for name in adapter.modules:
            # clone: safetensors slices may view the memory map, which closes with the reader
            a = rd.lora_A(name, k).to(torch.float32).clone()
            b = rd.lora_B(name, k).to(torch.float32)
            b = (b * s if baked else b.clone()).contiguous()
            check_finite_tensor(a, adapter.modules[name].key_a)
            check_finite_tensor(b, adapter.modules[name].key_b, f" times s({k}) = {s:g}" if baked else "")
            yield name, a.contiguous(), b


def check_finite_tensor(t: "torch.Tensor", name: str, how: str = "") -> None:
    """Refuse a float32 tensor about to be written into an export that holds an infinity or a NaN.

    Raises:
        NonFiniteOutputError: naming the tensor.
    """
    import torch

    if t.numel() and not bool(torch.isfinite(t).all()):
        raise NonFiniteOutputError(
            f"ONNX export: tensor {name!r}{how} would hold infinite or NaN values in float32: the adapter's scale or "
            "weights are too large; nothing was written", tensor=name)


def build_export_model(
    model: "torch.nn.Module", task: str, adapter: NestedAdapter, kind: ExportKind, rank: int | None
) -> tuple["torch.nn.Module", RankState]:
    """Wrap ``model`` in place for ``kind`` (``dynamic|fixed|merged|adapters``); return the top module.

    The top module's forward is ``(input_ids, attention_mask[, lora_rank | *lora weights]) → logits``.
    """
    import torch

    kind = ExportKind(kind)
    wrappers = _wrappers()
    state = RankState()
    r = adapter.max_rank
    if kind is ExportKind.DYNAMIC:
        for name, a, b in _factors(adapter, baked=False):
            _replace_module(model, name, wrappers["dynamic"](model.get_submodule(name), a, b, state))
    elif kind is ExportKind.FIXED:
        for name, a, b in _factors(adapter, rank, baked=True):
            _replace_module(model, name, wrappers["fixed"](model.get_submodule(name), a, b))
    elif kind is ExportKind.MERGED:
        with adapter.reader() as rd, torch.no_grad():
            for name in adapter.modules:
                w = model.get_submodule(name).weight
                w.add_(rd.delta_weight(name, int(rank)))  # float32 base + float32 delta
                check_finite_tensor(w, f"{name}.weight", f" + the rank-{rank} delta (s = {adapter.scale(int(rank)):g})")
    elif kind is ExportKind.ADAPTERS:
        for name in adapter.modules:
            _replace_module(model, name, wrappers["input"](model.get_submodule(name), name, state))
    else:
        raise ValueError(f"unknown export kind {kind!r}")

    scaling, alpha, names = adapter.config.scaling, adapter.config.alpha, list(adapter.modules)

    extra = {"use_cache": False} if task == TASK_CAUSAL_LM else {}

    def run(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, attention_mask=mask, **extra).logits

    class DynamicTop(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.torchscript = False

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, lora_rank: torch.Tensor) -> torch.Tensor:
            kt = torch.clamp(lora_rank.reshape(()), 0, r)
            state.scale = scale_tensor(kt, scaling, alpha)
            if self.torchscript:
                state.k, state.index = None, torch.arange(kt, dtype=torch.int64)
            else:
                k = kt.item()
                torch._check(k >= 0)
                torch._check(k <= r)
                state.k, state.index = k, None
            return run(input_ids, attention_mask)

    class PlainTop(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return run(input_ids, attention_mask)

    class AdapterTop(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
            state.weights = {n: (weights[2 * i], weights[2 * i + 1]) for i, n in enumerate(names)}
            return run(input_ids, attention_mask)

    top = {"dynamic": DynamicTop, "adapters": AdapterTop}.get(kind, PlainTop)()
    return top.eval(), state


def lora_input_names(module: str) -> tuple[str, str]:
    """``(<module>.lora_A.weight, <module>.lora_B.weight)``: Olive's names for the LoRA graph inputs."""
    return f"{module}.lora_A.weight", f"{module}.lora_B.weight"


def adapter_input_names(adapter: NestedAdapter) -> list[str]:
    """Graph input names of the LoRA weights in an ``adapters`` export, in forward order."""
    out: list[str] = []
    for name in adapter.modules:
        out += lora_input_names(name)
    return out


def input_factors(adapter: NestedAdapter, k: int | None = None) -> Iterator[tuple[str, "torch.Tensor", "torch.Tensor"]]:
    """``(name, A[:k]ᵀ, (s(k)·B[:, :k])ᵀ)`` in float32, contiguous: the ``[in, k]`` / ``[k, out]`` graph inputs."""
    for name, a, b in _factors(adapter, k, baked=True):
        yield name, a.T.contiguous(), b.T.contiguous()


# -- export ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' and loaders' chatter, progress bars and warnings (the CLI owns both streams)."""
    sink = io.StringIO()
    torch_onnx_log = logging.getLogger("torch.onnx")  # "torchvision is not installed" warnings
    level = torch_onnx_log.level
    torch_onnx_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        torch_onnx_log.setLevel(level)
    for line in sink.getvalue().splitlines():
        if line.strip():
            logger.debug("%s", line)


def _example_inputs(top: "torch.nn.Module", kind: ExportKind, adapter: NestedAdapter, vocab: int) -> tuple[Any, ...]:
    import torch

    kind = ExportKind(kind)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(min(3, vocab - 1), vocab, (2, 7), generator=gen)
    mask = torch.ones_like(ids)
    if kind.rank_input:
        return ids, mask, torch.tensor(adapter.max_rank, dtype=torch.int64)
    if kind.factor_inputs:
        return (ids, mask, *[t for _, a, b in input_factors(adapter) for t in (a, b)])
    return ids, mask


def export_graph(
    top: "torch.nn.Module",
    kind: ExportKind,
    adapter: NestedAdapter,
    vocab: int,
    path: Path,
    *,
    opset: int = DEFAULT_OPSET,
    external_data: bool = False,
) -> str:
    """Export ``top`` to ``path`` with dynamic batch and sequence; return the exporter used.

    Tries the dynamo exporter (``torch.export`` + onnxscript) first and falls back to the
    TorchScript exporter when it fails.

    Raises:
        ExportError: both exporters fail.
    """
    import torch

    kind = ExportKind(kind)
    args = _example_inputs(top, kind, adapter, vocab)
    names = ["input_ids", "attention_mask"]
    if kind.rank_input:
        names.append("lora_rank")
    elif kind.factor_inputs:
        names += adapter_input_names(adapter)
    errors = []

    # dynamo exporter
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    dyn: list[Any] = [{0: batch, 1: seq}, {0: batch, 1: seq}]
    if kind.rank_input:
        dyn.append(None)
    elif kind.factor_inputs:
        rank_dim = torch.export.Dim("lora_r", min=1, max=max(2, adapter.max_rank)) if adapter.max_rank > 1 else None
        for _ in adapter.modules:
            dyn += [{1: rank_dim} if rank_dim else None, {0: rank_dim} if rank_dim else None]
    try:
        with _quiet():
            prog = torch.onnx.export(
                top, args, dynamo=True, input_names=names, output_names=["logits"],
                dynamic_shapes=(dyn[0], dyn[1], tuple(dyn[2:])) if kind.factor_inputs else tuple(dyn),
                opset_version=opset, optimize=True, verbose=False,
            )
            prog.save(str(path), external_data=external_data)
        return "dynamo"
    except Exception as e:  # noqa: BLE001 - fall back, report both failures below
        logger.warning("dynamo exporter failed (%s: %s); trying the TorchScript exporter", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        errors.append(f"dynamo: {type(e).__name__}: {e}")
        for p in path.parent.glob(path.name + "*"):
            p.unlink()

    # TorchScript exporter
    axes: dict[str, dict[int, str]] = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
    if kind.factor_inputs:
        for n in names[2:]:
            axes[n] = {1 if n.endswith("lora_A.weight") else 0: "lora_r"}
    axes["logits"] = {0: "batch", 1: "sequence"} if args[0].dim() == 2 and _is_lm(top, args) else {0: "batch"}
    if hasattr(top, "torchscript"):
        top.torchscript = True
    try:
        with _quiet():
            torch.onnx.export(
                top, args, str(path), dynamo=False, input_names=names, output_names=["logits"], dynamic_axes=axes,
                opset_version=opset, do_constant_folding=True,
            )
        if external_data:
            import onnx

            m = onnx.load(str(path))
            onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + ".data")
        return "torchscript"
    except Exception as e:
        errors.append(f"torchscript: {type(e).__name__}: {e}")
        raise ExportError(f"ONNX export failed with both exporters: {' | '.join(x.splitlines()[0] for x in errors)}; run with MLORA_DEBUG=1 -vv for details") from e
    finally:
        if hasattr(top, "torchscript"):
            top.torchscript = False


def _is_lm(top: "torch.nn.Module", args: tuple[Any, ...]) -> bool:
    import torch

    with torch.no_grad():
        return top(*args).dim() == 3


def param_bytes(model: "torch.nn.Module") -> int:
    """Bytes of all parameters and buffers (for the external-data decision)."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


__all__ = [
    "DEFAULT_OPSET", "EXTERNAL_DATA_BYTES", "TASK_CAUSAL_LM", "TASK_SEQ_CLS", "RankState", "build_export_model",
    "adapter_input_names", "export_graph", "input_factors", "load_export_model", "lora_input_names",
    "param_bytes", "scale_tensor",
]
