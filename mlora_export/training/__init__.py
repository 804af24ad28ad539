"""Training nested adapters on a transformers model.

- :mod:`.model`: :class:`NestedLoraModel`, the nested adapter on a PEFT model (diagonals, rank
  switching, saving), with :func:`add_nested_adapter` and :func:`load_nested_adapter`;
- :mod:`.callbacks`: ``transformers.Trainer`` callbacks (imported on first use: they import
  transformers);
- :mod:`.pipeline`: the ``train()`` pipeline behind ``mlora-export train`` (:class:`TrainSettings`);
- :mod:`.heldout`: :func:`heldout_loss`, the held-out loss logged per rank while training;
- :mod:`.packing`: where packed sequences begin, so that each gets its own rank;
- :mod:`.recipe`: training options beyond the method (:class:`NestedRecipe`: LoRA+, rank
  curriculum, per-rank loss, the paper's init of ``A``, loss-aware rank sampling), with
  :mod:`.rank_schedule` (the rank weights over a run);
- :mod:`.trainer` and :mod:`.checkpoint`: the pipeline's ``Trainer`` (:class:`NestedTrainer`: the
  loss on supervised tokens only, the recipe) and its checkpoints without pickles.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .model import NestedLoraModel, add_nested_adapter, load_nested_adapter
from .heldout import heldout_loss
from .pipeline import RunOptions, TrainResult, TrainSettings, train
from .recipe import NestedRecipe

if TYPE_CHECKING:
    from .callbacks import HeldoutRanksCallback, NestedRankCallback, StepProgressCallback

    NestedTrainer: type  # made on first use (:func:`.trainer.nested_trainer_class`): it subclasses transformers.Trainer


def __getattr__(name: str) -> Any:
    # the callbacks subclass transformers.TrainerCallback: import transformers only when asked
    if name in ("HeldoutRanksCallback", "NestedRankCallback", "StepProgressCallback"):
        from . import callbacks

        return getattr(callbacks, name)
    if name == "NestedTrainer":
        from . import trainer

        return trainer.nested_trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "HeldoutRanksCallback", "NestedLoraModel", "NestedRankCallback", "NestedRecipe", "NestedTrainer", "RunOptions", "StepProgressCallback",
    "TrainResult", "TrainSettings",
    "add_nested_adapter", "heldout_loss", "load_nested_adapter", "train",
]
