"""Nested adapters under sharded training engines: which engine holds the model, and the full LoRA
factors gathered from it for saving (docs/design.md §2: a nested adapter is never written as shards).

Engines, as ``accelerate``/``transformers.Trainer`` set them up:

- ``single`` / ``ddp``: every process holds every parameter; nothing to gather.
- ``fsdp2`` (``torch.distributed.fsdp.fully_shard``): each parameter is a ``DTensor`` sharded on
  dim 0; a LoRA factor is all-gathered with ``DTensor.full_tensor()``, one tensor at a time.
- ``fsdp1`` (``FullyShardedDataParallel``): parameters live in one flat parameter per wrapped
  unit; each unit that holds LoRA factors is unsharded on its own (``summon_full_params`` with
  ``recurse=False``), one unit at a time: the same peak as a forward pass, never the whole base.
  Under FSDP1 a unit's flat parameter holds its base weights too, so those are gathered with it.
- ``deepspeed-zero3``: each parameter is partitioned (``ds_id``); the LoRA factors of one layer are
  gathered with ``deepspeed.zero.GatheredParameters`` on their own.
- ``deepspeed`` (ZeRO-0/1/2): parameters are whole on every process; nothing to gather.

Gathering is a collective: under ``fsdp*``/``deepspeed-zero3`` every process must call
:func:`gather_lora_factors`, in the same order. Only the main process keeps the result (the others
get ``{}`` with ``main_only``), on the CPU, so a 70B base never lands on one device.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

#: Engines whose parameters are sharded across processes (saving is a collective).
SHARDED_ENGINES = frozenset({"fsdp1", "fsdp2", "deepspeed-zero3"})

#: Name components that wrappers insert into module names (FSDP1, activation checkpointing, torch.compile).
_WRAPPER_NAMES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def process_layout() -> tuple[int, int]:
    """``(process index, number of processes)`` of the running ``torch.distributed`` job, else ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """Whether this is process 0 of the ``torch.distributed`` job (or there is no job)."""
    return process_layout()[0] == 0


def _is_dtensor(t: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return False
    return isinstance(t, DTensor)


def _fsdp1_units(model: Any) -> list[Any]:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    except ImportError:  # pragma: no cover - torch without distributed
        return []
    return [m for m in model.modules() if isinstance(m, FSDP)]


def engine_of(model: Any) -> str:
    """The engine holding ``model``'s parameters: ``single``, ``ddp``, ``fsdp1``, ``fsdp2``,
    ``deepspeed`` or ``deepspeed-zero3`` (read from the parameters and modules, not from configs)."""
    params = list(model.parameters())
    if any(hasattr(p, "ds_id") for p in params):
        return "deepspeed-zero3"
    if any(_is_dtensor(p) for p in params):
        return "fsdp2"
    if _fsdp1_units(model):
        return "fsdp1"
    world = process_layout()[1]
    if world > 1 and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "deepspeed"
    return "ddp" if world > 1 else "single"


def module_name(name: str) -> str:
    """A LoRA layer's module name as the nested format writes it: without PEFT's
    ``base_model.model.`` prefix and without the names that FSDP1/checkpoint wrappers insert."""
    for token in _WRAPPER_NAMES:
        name = name.replace(token, "")
    from ..adapter import KEY_PREFIX

    return name[len(KEY_PREFIX):] if name.startswith(KEY_PREFIX) else name


def _lora_layers(model: Any, adapter_name: str) -> list[tuple[str, Any]]:
    from peft.tuners.lora import LoraLayer

    return [(module_name(n), m) for n, m in model.named_modules() if isinstance(m, LoraLayer) and adapter_name in m.lora_A]


def _full(t: "torch.Tensor") -> "torch.Tensor":
    """A detached full copy of parameter ``t`` on the CPU (all-gathered when it is a ``DTensor``)."""
    t = t.detach()
    if _is_dtensor(t):
        t = t.full_tensor()
    return t.cpu().clone()


@contextlib.contextmanager
def _zero3_gathered(params: list[Any]) -> Iterator[None]:
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def _fsdp1_owner(model: Any) -> dict[int, Any]:
    """``id(LoRA layer) → innermost FSDP1 unit`` that holds its parameters."""
    from peft.tuners.lora import LoraLayer
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    owner: dict[int, Any] = {}

    def walk(mod: Any, unit: Any) -> None:
        if isinstance(mod, FSDP):
            unit = mod
        if isinstance(mod, LoraLayer):
            owner[id(mod)] = unit
        for child in mod.children():
            walk(child, unit)

    walk(model, None)
    return owner


def gather_lora_factors(model: Any, adapter_name: str = "default", *, main_only: bool = False) -> dict[str, tuple["torch.Tensor", "torch.Tensor"]]:
    """Module name → full ``(A [r, in], B [out, r])`` on the CPU, in model order, under any engine.

    Only the LoRA factors are gathered (never the base, except as FSDP1 stores them: see the module
    docstring). Under a sharded engine this is a collective: call it on every process. With
    ``main_only`` the other processes return ``{}`` and keep nothing.
    """
    import torch

    engine = engine_of(model)
    keep = not main_only or is_main_process()
    layers = _lora_layers(model, adapter_name)
    owners = _fsdp1_owner(model) if engine == "fsdp1" else {}
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    with torch.no_grad():
        for name, layer in layers:
            a, b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
            if engine == "deepspeed-zero3":
                ctx: Any = _zero3_gathered([a, b])
            elif engine == "fsdp1" and owners.get(id(layer)) is not None:
                from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

                ctx = FSDP.summon_full_params(owners[id(layer)], recurse=False, writeback=False)
            else:
                ctx = contextlib.nullcontext()
            with ctx:
                pair = (_full(a), _full(b))
            if keep:
                out[name] = pair
    if engine in SHARDED_ENGINES:
        logger.debug("gathered the LoRA factors of %d modules from %s", len(layers), engine)
    return out


def check_full_factors(factors: dict[str, tuple["torch.Tensor", "torch.Tensor"]], max_rank: int) -> None:
    """Refuse to save factors that are still shards (an empty or cut tensor) rather than write them.

    Raises:
        ExportError: a factor does not have ``max_rank`` rows (``A``) / columns (``B``).
    """
    from ..errors import ExportError

    for name, (a, b) in factors.items():
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != max_rank or b.shape[1] != max_rank or a.numel() == 0 or b.numel() == 0:
            raise ExportError(
                f"module {name!r}: LoRA factors {list(a.shape)} / {list(b.shape)} are not whole rank-{max_rank} factors "
                "(a shard of a sharded model?); save on every process so that they are gathered first"
            )


def cpu_training_args(has_accelerator: bool) -> dict[str, Any]:
    """``TrainingArguments`` that set up multi-process training on this host's devices.

    With an accelerator, none. On a CPU-only host ``accelerate`` needs ``use_cpu`` to set up gloo
    DDP, but with ``use_cpu`` it skips DeepSpeed (and runs FSDP configs as DDP); under an
    ``accelerate launch`` DeepSpeed config it gets ``use_cpu=False`` and the ``gloo`` backend instead,
    which DeepSpeed's CPU accelerator uses too.
    """
    if has_accelerator:
        return {"use_cpu": False}
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return {"use_cpu": False, "ddp_backend": "gloo"}
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 \
            and os.environ.get("RANK", "0") == "0":
        logger.warning("accelerate runs an FSDP config as plain DDP on a CPU-only host: every process holds the whole model")
    return {"use_cpu": True}


__all__ = ["SHARDED_ENGINES", "check_full_factors", "cpu_training_args", "engine_of", "gather_lora_factors", "is_main_process", "module_name", "process_layout"]
