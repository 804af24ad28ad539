"""Batches for training: right padding, ``-100`` labels on padding."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from .tokens import IGNORE_INDEX

if TYPE_CHECKING:
    import torch


class CompletionCollator:
    """Pad a list of ``{"input_ids", "labels"}`` to the longest one (right padding).

    Returns ``input_ids`` (padded with ``pad_token_id``), ``attention_mask`` (0 on padding) and
    ``labels`` (``-100`` on padding), all ``int64 [batch, seq]``.
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = int(pad_token_id)

    def __call__(self, features: Iterable[Mapping[str, Sequence[int]]]) -> dict[str, "torch.Tensor"]:
        import torch

        feats = list(features)
        n = max(len(f["input_ids"]) for f in feats)
        ids = torch.full((len(feats), n), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(feats), n), dtype=torch.long)
        labels = torch.full((len(feats), n), IGNORE_INDEX, dtype=torch.long)
        for i, f in enumerate(feats):
            k = len(f["input_ids"])
            ids[i, :k] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            mask[i, :k] = 1
            labels[i, :k] = torch.as_tensor(f["labels"], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


__all__ = ["CompletionCollator"]
