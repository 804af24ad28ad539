"""Training nested adapters on a transformers model.

- :mod:`.model`: :class:`NestedLoraModel`, the nested adapter on a PEFT model (diagonals, rank
  switching, saving), with :func:`add_nested_adapter` and :func:`load_nested_adapter`;
- :mod:`.callbacks`: ``transformers.Trainer`` callbacks (imported on first use: they import
  transformers);
- :mod:`.recipe`: training options beyond the method (:class:`NestedRecipe`: LoRA+, rank
  curriculum, per-rank loss, the paper's init of ``A``, loss-aware rank sampling);
- :mod:`.trainer`: :class:`NestedTrainer`, ``transformers.Trainer`` with the recipe (imported on
  first use);
- :mod:`.pipeline`: the ``train()`` pipeline behind ``mlora-export train`` (:class:`TrainSettings`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .model import NestedLoraModel, add_nested_adapter, load_nested_adapter
from .pipeline import TrainResult, TrainSettings, heldout_loss, train
from .recipe import NestedRecipe

if TYPE_CHECKING:
    from .callbacks import NestedRankCallback, StepProgressCallback
    from .trainer import NestedTrainer


def __getattr__(name: str) -> Any:
    # the callbacks subclass transformers.TrainerCallback: import transformers only when asked
    if name in ("NestedRankCallback", "StepProgressCallback"):
        from . import callbacks

        return getattr(callbacks, name)
    if name == "NestedTrainer":
        from . import trainer

        return trainer.NestedTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "NestedLoraModel", "NestedRankCallback", "NestedRecipe", "NestedTrainer", "StepProgressCallback", "TrainResult", "TrainSettings",
    "add_nested_adapter", "heldout_loss", "load_nested_adapter", "train",
]
