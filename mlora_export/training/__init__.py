"""Training nested adapters on a transformers model.

- :mod:`.model`: :class:`NestedLoraModel`, the nested adapter on a PEFT model (diagonals, rank
  switching, saving), with :func:`add_nested_adapter` and :func:`load_nested_adapter`;
- :mod:`.callbacks`: ``transformers.Trainer`` callbacks (imported on first use: they import
  transformers);
- :mod:`.pipeline`: the ``train()`` pipeline behind ``mlora-export train`` (:class:`TrainSettings`);
- :mod:`.packing`: where packed sequences begin, so that each gets its own rank;
- :mod:`.trainer` and :mod:`.checkpoint`: the pipeline's ``Trainer`` (the loss on supervised
  tokens only) and its checkpoints without pickles.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .model import NestedLoraModel, add_nested_adapter, load_nested_adapter
from .pipeline import TrainResult, TrainSettings, heldout_loss, train

if TYPE_CHECKING:
    from .callbacks import HeldoutRanksCallback, NestedRankCallback, StepProgressCallback


def __getattr__(name: str) -> Any:
    # the callbacks subclass transformers.TrainerCallback: import transformers only when asked
    if name in ("HeldoutRanksCallback", "NestedRankCallback", "StepProgressCallback"):
        from . import callbacks

        return getattr(callbacks, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "HeldoutRanksCallback", "NestedLoraModel", "NestedRankCallback", "StepProgressCallback", "TrainResult", "TrainSettings",
    "add_nested_adapter", "heldout_loss", "load_nested_adapter", "train",
]
