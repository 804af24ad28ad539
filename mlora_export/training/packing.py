"""Packed batches: where each sequence of a row begins, so that ``nested-loss`` gives every packed
sequence its own rank.

Packing puts many sequences in one row (TRL's ``packing=True`` makes one ``[1, N]`` row per step
with ``padding_free``; transformers' ``DataCollatorWithFlattening`` does the same). The model keeps
them apart only through what the batch tells it, and so does this module:

- ``cu_seq_lens_q`` (or ``cu_seq_lens_k``): the cumulative sequence lengths over the flattened
  ``[batch · seq]`` tokens, ``[0, l_1, l_1 + l_2, …, batch · seq]`` (what flash-attention's varlen
  kernels read; TRL's collator computes them);
- otherwise ``position_ids``: a sequence begins at the start of every row and wherever the position
  does not continue the previous one (a reset to 0 in a packed row); tokens whose
  ``attention_mask`` is 0 (padding) never begin one.

A batch with neither has one sequence per row (the ordinary padded batch).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:
    import torch


def sequence_ids(kwargs: Mapping[str, Any], batch: int, length: int) -> "torch.Tensor | None":
    """``[batch, length]`` int64: the index (from 0, row by row) of the sequence each token belongs to,
    or ``None`` when the call carries no sequence boundaries (one sequence per row).

    Raises:
        ConfigError: ``cu_seq_lens`` or ``position_ids`` do not fit the batch's shape.
    """
    import torch

    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        cu = kwargs.get("cu_seq_lens_k")
    if cu is not None:
        cu = torch.as_tensor(cu).detach().to("cpu", torch.long).flatten()
        total = batch * length
        lengths = cu.diff()
        if cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != total or bool((lengths <= 0).any()):
            raise ConfigError(
                f"cu_seq_lens {cu.tolist()[:8]}{'…' if cu.numel() > 8 else ''} do not cut the batch's {batch}×{length} tokens "
                "into sequences: expected increasing offsets from 0 to the number of tokens"
            )
        ids = torch.repeat_interleave(torch.arange(cu.numel() - 1), lengths).view(batch, length)
        if batch > 1:  # a sequence never continues into the next row
            ids[1:] += (ids[1:, :1] == ids[:-1, -1:]).long().cumsum(0)
        return ids
    pos = kwargs.get("position_ids")
    if pos is None:
        return None
    pos = torch.as_tensor(pos).detach().to("cpu", torch.long)
    if pos.dim() == 3:  # multimodal rotary position ids [3, batch, seq]: the text axis comes first
        pos = pos[0]
    if pos.dim() == 1:
        pos = pos.unsqueeze(0)
    if pos.shape[-1] != length or pos.shape[0] not in (1, batch):
        raise ConfigError(f"position_ids of shape {list(pos.shape)} do not fit a batch of {batch}×{length} tokens")
    pos = pos.expand(batch, length)
    starts = torch.ones(batch, length, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    mask = kwargs.get("attention_mask")
    if mask is not None and getattr(mask, "dim", lambda: 0)() == 2 and tuple(mask.shape) == (batch, length):
        starts[:, 1:] &= mask[:, 1:].detach().to("cpu").bool()
    starts[:, 0] = True
    return starts.view(-1).long().cumsum(0).view(batch, length) - 1


def global_offsets(count: int, device: "torch.device", index: int, world: int) -> tuple[int, int]:
    """``(sequences on the processes before process ``index``, sequences on all ``world`` processes)``
    for this micro-batch, with ``count`` sequences here: one small ``all_gather`` over ``torch.distributed``.

    Packed micro-batches hold different numbers of sequences on different processes, so a global
    position (what a sequence's rank depends on) needs every process's count.

    Raises:
        ConfigError: several processes but no initialised ``torch.distributed`` to ask.
    """
    import torch
    import torch.distributed as dist

    if world == 1:
        return 0, count
    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError(
            f"packed batches on {world} processes need torch.distributed to count each process's sequences; "
            "run under torchrun/accelerate, or leave process_index/num_processes unset in one process"
        )
    mine = torch.tensor([count], dtype=torch.long, device=device)
    counts = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, mine)
    values = [int(c.item()) for c in counts]
    return sum(values[:index]), sum(values)


__all__ = ["global_offsets", "sequence_ids"]
