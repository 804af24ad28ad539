"""The ``transformers.Trainer`` behind ``mlora-export train``: a stock ``Trainer`` with two changes.

- **Checkpoints without pickles** (:mod:`.checkpoint`): optimizer, scheduler and random states are
  written as safetensors + JSON and read back from them; ``training_args.bin`` is not kept; a
  checkpoint's :data:`~.checkpoint.MARKER` (written last) records the run's settings and data.
- **The loss on the supervised tokens only.** A causal LM's loss needs the logits of the
  positions whose next token is learned (labels ``≠ -100``), not of every position: for a chat
  model with a large vocabulary the output head and its cross-entropy over all positions (prompts,
  system and user turns, padding) are a large share of a step. :meth:`NestedTrainer.compute_loss`
  runs the model as usual but hands the output head only those positions' hidden states, then
  takes the cross-entropy of the ``[supervised tokens, vocabulary]`` logits, divided by
  ``num_items_in_batch`` as the model's own loss would be: the same loss to float rounding, at
  the cost TRL's fused head pays (it too scores only the supervised positions). Models whose head
  cannot be found, or whose hidden states are not ``[batch, seq, hidden]``, get ``Trainer``'s own loss.

Made on first use (:func:`nested_trainer_class`): it subclasses ``transformers.Trainer``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .checkpoint import FORMAT, MARKER, OPTIMIZER, SCHEDULER, load_state, rng_name, rng_states, save_state, set_rng_states

logger = logging.getLogger(__name__)

_TRAINER: type | None = None


def nested_trainer_class() -> type:
    """:class:`NestedTrainer` (made on first use: it imports transformers)."""
    global _TRAINER
    if _TRAINER is None:
        _TRAINER = _make_trainer_class()
    return _TRAINER


def _output_head(model: Any) -> Any | None:
    """The output embedding (LM head) module of a (PEFT-wrapped, accelerate-wrapped) causal LM, if any."""
    inner = getattr(model, "module", model)  # DDP
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    getter = getattr(inner, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return head if head is not None and hasattr(head, "register_forward_pre_hook") else None


def supervised_loss(model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Any | None:
    """The causal-LM loss of ``inputs`` computed from the supervised positions' logits only;
    ``None`` when the model's head cannot be fed that way (the caller then uses the model's own loss).

    ``sum of -log p(next token)`` over positions whose next label is not ``-100``, divided by
    ``num_items_in_batch`` when given (the supervised tokens of the whole accumulated batch) and by
    this batch's count otherwise: exactly what transformers' ``ForCausalLMLoss`` computes.
    """
    import torch
    import torch.nn.functional as F

    labels = inputs.get("labels")
    head = _output_head(model)
    if labels is None or head is None or labels.dim() != 2:
        return None
    shifted = labels[:, 1:]
    keep = shifted != -100
    rows = F.pad(keep, (0, 1), value=False)  # hidden state t predicts token t + 1
    picked = {"done": False}

    def pick(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        hidden = args[0] if args else None
        if picked["done"] or hidden is None or hidden.dim() != 3 or tuple(hidden.shape[:2]) != tuple(rows.shape):
            return None
        picked["done"] = True
        return (hidden[rows.to(hidden.device)], *args[1:])

    handle = head.register_forward_pre_hook(pick)
    try:
        outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
    finally:
        handle.remove()
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    if picked["done"] and logits.dim() == 2:
        target = shifted[keep].to(logits.device)
    else:  # the head saw something else (a model computing logits its own way): score every position
        logits = logits[:, :-1].reshape(-1, logits.shape[-1])
        target = shifted.reshape(-1).to(logits.device)
    total = F.cross_entropy(logits.float(), target, ignore_index=-100, reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else keep.sum()
    if torch.is_tensor(count):
        count = count.to(total.device)
    return total / count


def _make_trainer_class() -> type:
    from transformers import Trainer

    class NestedTrainer(Trainer):
        """``transformers.Trainer`` with pickle-free checkpoints and the loss on supervised tokens only
        (see the module docstring). ``checkpoint_record`` (a JSON-able dict) goes into each checkpoint's
        :data:`~.checkpoint.MARKER`."""

        checkpoint_record: dict[str, Any] = {}

        # -- the loss ------------------------------------------------------------------------
        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None) -> Any:
            if return_outputs or self.label_smoother is not None or self.compute_loss_func is not None:
                return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            given = num_items_in_batch if self.model_accepts_loss_kwargs else None  # as Trainer passes it to the model
            loss = supervised_loss(model, inputs, given)
            if loss is None:
                return super().compute_loss(model, inputs, return_outputs=False, num_items_in_batch=num_items_in_batch)
            if self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # DDP averages gradients over processes; the count covers all
            return loss

        # -- checkpoints ---------------------------------------------------------------------
        def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
            if self.is_deepspeed_enabled or self.is_fsdp_enabled:
                raise ConfigError("checkpoints of nested-adapter training hold no pickle and are written in one process or under DDP only, "
                                  "not under FSDP or DeepSpeed")
            if self.args.should_save:
                os.makedirs(output_dir, exist_ok=True)
                save_state(self.optimizer.state_dict(), output_dir, OPTIMIZER)
                save_state(self.lr_scheduler.state_dict(), output_dir, SCHEDULER)

        def _save_scaler(self, output_dir: str) -> None:
            if getattr(self.accelerator, "scaler", None) is not None and self.args.should_save:
                save_state(self.accelerator.scaler.state_dict(), output_dir, "scaler")

        def _save_rng_state(self, output_dir: str) -> None:
            os.makedirs(output_dir, exist_ok=True)
            save_state(rng_states(), output_dir, rng_name(self.args.process_index, self.args.world_size))

        def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
            super()._save(output_dir, state_dict)
            if self.args.should_save:
                Path(output_dir or self.args.output_dir, "training_args.bin").unlink(missing_ok=True)

        def _save_checkpoint(self, model: Any, trial: Any) -> None:
            super()._save_checkpoint(model, trial)
            folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
            if self.args.world_size > 1:
                self.accelerator.wait_for_everyone()  # every process's random state is written
            if self.args.should_save:
                record = {"format": FORMAT, "step": self.state.global_step, "world_size": self.args.world_size, **self.checkpoint_record}
                (folder / MARKER).write_text(json.dumps(record, indent=1), encoding="utf-8")

        def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
            if checkpoint is None:
                return
            self.optimizer.load_state_dict(load_state(checkpoint, OPTIMIZER))
            self.lr_scheduler.load_state_dict(load_state(checkpoint, SCHEDULER))

        def _load_scaler(self, checkpoint: str | None) -> None:
            if checkpoint is not None and getattr(self.accelerator, "scaler", None) is not None:
                self.accelerator.scaler.load_state_dict(load_state(checkpoint, "scaler"))

        def _load_rng_state(self, checkpoint: str | None) -> None:
            if checkpoint is None:
                return
            set_rng_states(load_state(checkpoint, rng_name(self.args.process_index, self.args.world_size)))

    return NestedTrainer


__all__ = ["nested_trainer_class", "supervised_loss"]
