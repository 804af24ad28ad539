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

    Packing (TRL's ``SFTConfig(packing=True)`` or ``padding_free=True``): ``nested-loss`` gives every
    packed sequence its own rank, from the boundaries the batch carries (``position_ids`` or
    ``cu_seq_lens_q``). At the start of training this callback reads those settings from ``args``:
    with them, a batch without boundaries is refused; TRL's ``packing_strategy="wrapped"`` without
    ``padding_free`` (rows with no boundaries at all) is refused at once.

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
        check_packing(self.nested, args)
        self.nested.train_diagonal(state.global_step, total_steps=state.max_steps or None)

    def on_step_begin(self, args: "TrainingArguments", state: "TrainerState", control: "TrainerControl", **kwargs: Any) -> None:
        self.nested.train_diagonal(state.global_step, total_steps=state.max_steps or None)

    def on_train_end(self, args: "TrainingArguments", state: "TrainerState", control: "TrainerControl", **kwargs: Any) -> None:
        self.nested.set_rank(self.nested.config.max_rank)


def check_packing(nested: "NestedLoraModel", args: Any) -> None:
    """Tell ``nested`` whether the run packs sequences (TRL's ``packing``/``padding_free`` in ``args``).

    Raises:
        ConfigError: ``nested-loss`` with TRL's ``wrapped`` packing and no ``padding_free``: its rows
            join sequences with no boundary the model (or the rank assignment) can see.
    """
    from ..errors import ConfigError
    from ..method import PER_EXAMPLE_METHODS

    packing = bool(getattr(args, "packing", False))
    padding_free = bool(getattr(args, "padding_free", False))
    if nested.config.method not in PER_EXAMPLE_METHODS:
        return
    if packing and getattr(args, "packing_strategy", None) == "wrapped" and not padding_free:
        raise ConfigError(
            "nested-loss cannot train TRL's packing_strategy='wrapped' rows: they join sequences with no boundary "
            "(no position_ids), so each could not get its own rank; use packing_strategy='bfd' (the default) or padding_free=True"
        )
    nested.expect_packed = packing or padding_free


class HeldoutRanksCallback(TrainerCallback):
    """Score held-out data at a few ranks during training: every ``every`` optimisation steps (if
    given) and after the last one.

    Each evaluation switches the model to rank ``k`` (:meth:`NestedLoraModel.set_rank`), computes
    the mean cross-entropy per supervised token (:func:`~mlora_export.training.heldout.heldout_loss`),
    and logs ``eval_loss_r{k}`` through ``log`` (``Trainer.log``: the log history and ``report_to``);
    the next step re-installs the training diagonal. Evaluation runs in eval mode without
    gradients and draws no random number, so it leaves the run (and its resumption) unchanged.
    ``results`` holds ``(step, rank, loss)``.
    """

    def __init__(self, nested: "NestedLoraModel", features: Any, pad_token_id: int, ranks: Any, *, every: int | None = None,
                 batch_size: int = 8) -> None:
        self.nested = nested
        self.features = features
        self.pad_token_id = pad_token_id
        self.ranks = tuple(ranks)
        self.every = every
        self.batch_size = batch_size
        self.results: list[tuple[int, int, float]] = []
        self.log: Callable[[dict[str, float]], None] | None = None

    def on_step_end(self, args: "TrainingArguments", state: "TrainerState", control: "TrainerControl", **kwargs: Any) -> None:
        step = state.global_step
        if (self.every and step % self.every == 0) or step >= state.max_steps:
            self.evaluate(step)

    def evaluate(self, step: int) -> dict[int, float]:
        """Score every rank now; return ``{rank: loss}``."""
        from .heldout import heldout_loss

        losses = {}
        for k in self.ranks:
            self.nested.set_rank(k)
            losses[k] = heldout_loss(self.nested.model, self.features, self.pad_token_id, batch_size=self.batch_size)
            self.results.append((step, k, losses[k]))
        logger.info("step %d: held-out loss %s", step, ", ".join(f"r{k} {v:.4f}" for k, v in losses.items()))
        if self.log is not None:
            self.log({f"eval_loss_r{k}": v for k, v in losses.items()})
        return losses


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


__all__ = ["HeldoutRanksCallback", "NestedRankCallback", "StepProgressCallback", "check_packing"]
