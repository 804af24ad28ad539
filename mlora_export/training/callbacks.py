"""``transformers.Trainer`` callbacks for nested adapters (imports transformers at import: kept apart, and
loaded lazily by :mod:`mlora_export.training`, so that importing the package stays light)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

if TYPE_CHECKING:
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from .model import NestedLoraModel

logger = logging.getLogger(__name__)


class NestedRankCallback(TrainerCallback):
    """Install the method's training diagonal at the start of every optimisation step.

    ``Trainer`` calls ``on_step_begin`` once per optimisation step (on the first micro-batch of
    each gradient-accumulation cycle), with ``state.global_step`` = the number of optimiser steps
    done so far. That step number is all :meth:`NestedLoraModel.train_diagonal` needs: DyLoRA's
    ``b`` is a function of ``(seed, step)``, so every process of a distributed run, and a run
    resumed from a checkpoint, draws the same ``b``. For ``matryoshka`` and ``lora`` the diagonal
    is fixed and re-installing it is a no-op in effect.

    Evaluation inside ``Trainer`` (``eval_strategy``) runs with the current training diagonal,
    which for ``matryoshka`` is no single rank: to score rank ``k``, call ``nested.set_rank(k)``
    before ``trainer.evaluate()`` (the next training step re-installs the training diagonal).
    When training ends the model is switched to the full rank ``r`` (``set_rank(r)``), i.e. what
    the saved adapter computes in PEFT. The run's ``state.max_steps`` goes along as ``total_steps``
    (a rank curriculum needs it).

    Example::

        nested = add_nested_adapter(model, MatryoshkaConfig("dylora", 32, (1, 2, 4, 8, 16, 32)))
        trainer = Trainer(model=nested.model, args=args, train_dataset=ds,
                          callbacks=[NestedRankCallback(nested)])
        trainer.train()
        nested.save("./nested")
    """

    def __init__(self, nested: "NestedLoraModel") -> None:
        self.nested = nested

    def on_train_begin(self, args: "TrainingArguments", state: "TrainerState", control: "TrainerControl", **kwargs: Any) -> None:
        self.nested.train_diagonal(state.global_step, total_steps=state.max_steps or None)

    def on_step_begin(self, args: "TrainingArguments", state: "TrainerState", control: "TrainerControl", **kwargs: Any) -> None:
        self.nested.train_diagonal(state.global_step, total_steps=state.max_steps or None)

    def on_train_end(self, args: "TrainingArguments", state: "TrainerState", control: "TrainerControl", **kwargs: Any) -> None:
        self.nested.set_rank(self.nested.config.max_rank)


class StepProgressCallback(TrainerCallback):
    """Report ``progress(done_steps, total_steps)`` after every optimisation step, on the main process only."""

    def __init__(self, progress: Callable[[int, int], None]) -> None:
        self.progress = progress

    def on_train_begin(self, args: "TrainingArguments", state: "TrainerState", control: "TrainerControl", **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self.progress(state.global_step, state.max_steps)

    def on_step_end(self, args: "TrainingArguments", state: "TrainerState", control: "TrainerControl", **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self.progress(state.global_step, state.max_steps)


__all__ = ["NestedRankCallback", "StepProgressCallback"]
