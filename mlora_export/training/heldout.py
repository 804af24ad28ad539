"""The held-out loss of a model on tokenised features: what training logs per rank while it runs
(:class:`~.callbacks.HeldoutRanksCallback`), in the same terms as the training loss."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def heldout_loss(model: Any, features: Sequence[dict[str, list[int]]], pad_token_id: int, *, batch_size: int = 32) -> float:
    """Mean cross-entropy per supervised token (labels ≠ -100) of ``model`` on tokenised ``features``."""
    import torch

    from ..data import IGNORE_INDEX, CompletionCollator

    collate = CompletionCollator(pad_token_id)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(features), batch_size):
            batch = collate(features[i : i + batch_size])
            logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
            labels = batch["labels"].to(device)[:, 1:]
            lg = logits[:, :-1].float()
            total += float(torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"))
            count += int((labels != IGNORE_INDEX).sum())
    model.train(was_training)
    return total / max(count, 1)


__all__ = ["heldout_loss"]
