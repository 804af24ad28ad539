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
- **The nested adapter's recipe** (:class:`~.recipe.NestedRecipe`, given with ``nested``): LoRA+
  builds the optimizer from :func:`~.recipe.lora_plus_param_groups`; when the recipe computes its
  own loss (per-rank loss, loss-aware rank sampling) the trainer counts the supervised tokens of
  each train rank over the whole optimisation step (every micro-batch, summed over the processes)
  before the step runs, and each micro-batch's loss is its exact share of the step's loss
  (:meth:`~.model.NestedLoraModel.example_loss`), from the same supervised positions' logits.

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


def __getattr__(name: str) -> Any:
    # NestedTrainer subclasses transformers.Trainer: made when first asked for
    if name == "NestedTrainer":
        return nested_trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


def _supervised_logits(model: Any, inputs: dict[str, Any]) -> tuple[Any, Any, Any] | None:
    """Run ``model`` on ``inputs`` and return ``(logits [n, vocab], target [n], row [n])`` of the
    positions whose next label is not ``-100`` (all positions, targets ``-100`` included, when the
    head saw something else), ``row`` being each position's example; ``None`` when the model's head
    cannot be fed that way (the model is then not run)."""
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
    example = torch.arange(shifted.shape[0], device=shifted.device).unsqueeze(1).expand_as(shifted)
    if picked["done"] and logits.dim() == 2:
        target, row = shifted[keep], example[keep]
    else:  # the head saw something else (a model computing logits its own way): score every position
        logits = logits[:, :-1].reshape(-1, logits.shape[-1])
        target, row = shifted.reshape(-1), example.reshape(-1)
    return logits, target.to(logits.device), row.to(logits.device)


def supervised_loss(model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Any | None:
    """The causal-LM loss of ``inputs`` computed from the supervised positions' logits only;
    ``None`` when the model's head cannot be fed that way (the caller then uses the model's own loss).

    ``sum of -log p(next token)`` over positions whose next label is not ``-100``, divided by
    ``num_items_in_batch`` when given (the supervised tokens of the whole accumulated batch) and by
    this batch's count otherwise: exactly what transformers' ``ForCausalLMLoss`` computes.
    """
    import torch
    import torch.nn.functional as F

    got = _supervised_logits(model, inputs)
    if got is None:
        return None
    logits, target, _ = got
    total = F.cross_entropy(logits.float(), target, ignore_index=-100, reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else (inputs["labels"][:, 1:] != -100).sum()
    if torch.is_tensor(count):
        count = count.to(total.device)
    return total / count


def supervised_token_losses(model: Any, inputs: dict[str, Any]) -> tuple[Any, Any] | None:
    """Per example of ``inputs``: ``(sum of -log p(next token) over its supervised positions, their
    number)``, each ``[batch]``, from the supervised positions' logits only (as :func:`supervised_loss`);
    ``None`` when the model's head cannot be fed that way."""
    import torch
    import torch.nn.functional as F

    got = _supervised_logits(model, inputs)
    if got is None:
        return None
    logits, target, row = got
    n = inputs["labels"].shape[0]
    tok = F.cross_entropy(logits.float(), target, ignore_index=-100, reduction="none")
    sums = torch.zeros(n, dtype=tok.dtype, device=tok.device).index_add(0, row, tok)
    counts = torch.zeros(n, dtype=torch.long, device=tok.device).index_add(0, row, (target != -100).long())
    return sums, counts


def _make_trainer_class() -> type:
    from transformers import Trainer

    from .callbacks import NestedRankCallback
    from .recipe import NestedRecipe, lora_plus_param_groups, rank_token_counts, token_losses

    class NestedTrainer(Trainer):
        """``transformers.Trainer`` with pickle-free checkpoints, the loss on supervised tokens only
        and the recipe of ``nested`` (see the module docstring). With ``nested`` (a
        :class:`~.model.NestedLoraModel`), ``model`` defaults to ``nested.model`` and
        :class:`~.callbacks.NestedRankCallback` is added. ``checkpoint_record`` (a JSON-able dict)
        goes into each checkpoint's :data:`~.checkpoint.MARKER`.

        Example::

            nested = add_nested_adapter(model, cfg, recipe=NestedRecipe(per_rank_loss=True))
            nested_trainer_class()(nested, args=args, train_dataset=ds, data_collator=collate).train()
        """

        checkpoint_record: dict[str, Any] = {}

        def __init__(self, nested: Any = None, **kwargs: Any) -> None:
            if nested is not None:
                callbacks = list(kwargs.pop("callbacks", None) or [])
                if not any(isinstance(c, NestedRankCallback) for c in callbacks):
                    callbacks.insert(0, NestedRankCallback(nested))
                kwargs["callbacks"] = callbacks
                kwargs.setdefault("model", nested.model)
            super().__init__(**kwargs)
            self.nested = nested
            self.recipe: NestedRecipe = nested.recipe if nested is not None else NestedRecipe()
            #: the current optimisation step's supervised tokens per train rank, over all micro-batches and processes
            self.rank_tokens: Any = None
            if self.recipe.own_loss:
                self.loss_is_scaled_for_ga = True  # normalised over the whole step: Trainer must not divide again

        # -- the recipe: LoRA+ groups, the step's tokens per rank ------------------------------
        def create_optimizer(self, model: Any = None) -> Any:
            """Trainer's optimizer, with ``B`` in its own group at ``lr · lora_plus_ratio`` under LoRA+."""
            ratio = self.recipe.lora_plus_ratio
            if ratio is None or self.optimizer is not None:
                return super().create_optimizer(model)
            opt_model = self.model if model is None else model
            if self.optimizer_cls_and_kwargs is not None:
                optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
            else:
                optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            groups = lora_plus_param_groups(opt_model.named_parameters(), self.args.learning_rate, ratio, self.args.weight_decay)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
            return self.optimizer

        def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> tuple[list, Any]:
            batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
            if self.recipe.own_loss and batch_samples:
                self.rank_tokens = self.step_rank_tokens(batch_samples)
            return batch_samples, num_items

        def step_rank_tokens(self, batches: list[dict[str, Any]]) -> Any:
            """Supervised tokens per train rank of the optimisation step made of ``batches`` (this
            process's micro-batches), summed over the processes: the ranks are those the forward hook
            will assign (:meth:`~.model.NestedLoraModel.ranks_at` at the same global positions)."""
            import torch

            nested = self.nested
            step = self.state.global_step
            index, world = nested.layout()
            counts = torch.zeros(len(nested.config.train_ranks), dtype=torch.float64)
            seen = 0
            for batch in batches:
                labels = batch["labels"]
                n = int(labels.shape[0])
                start = seen * world + index * n
                counts += rank_token_counts(labels, nested.ranks_at(step, range(start, start + n)), nested.config.train_ranks)
                seen += n
            if world > 1:
                counts = self.accelerator.reduce(counts.to(self.args.device), reduction="sum").cpu()
            return counts

        # -- the loss ------------------------------------------------------------------------
        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None) -> Any:
            if self.recipe.own_loss and model.training and "labels" in inputs:
                return self._recipe_loss(model, inputs, return_outputs)
            if return_outputs or self.label_smoother is not None or self.compute_loss_func is not None:
                return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            given = num_items_in_batch if self.model_accepts_loss_kwargs else None  # as Trainer passes it to the model
            loss = supervised_loss(model, inputs, given)
            if loss is None:
                return super().compute_loss(model, inputs, return_outputs=False, num_items_in_batch=num_items_in_batch)
            if self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # DDP averages gradients over processes; the count covers all
            return loss

        def _recipe_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool) -> Any:
            """The recipe's loss (per-rank, with loss-aware statistics): this micro-batch's exact
            share of the step's loss, from the supervised positions' logits when the head allows."""
            got = None if return_outputs else supervised_token_losses(model, inputs)
            outputs = None
            if got is None:
                outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
                logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
                got = token_losses(logits, inputs["labels"])
            loss = self.nested.example_loss(*got, rank_tokens=self.rank_tokens)
            # each process holds its share of the step's loss; DDP, FSDP and DeepSpeed average gradients over processes
            loss = loss * self.accelerator.num_processes
            return (loss, outputs) if return_outputs else loss

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


__all__ = ["nested_trainer_class", "supervised_loss", "supervised_token_losses"]
