"""``transformers.Trainer`` with a nested adapter's recipe (imports transformers at import: loaded lazily).

:class:`NestedTrainer` is a stock ``Trainer`` plus :class:`~.callbacks.NestedRankCallback`; with the
default :class:`~.recipe.NestedRecipe` every override hands over to ``Trainer``'s own code. With
LoRA+ it builds the optimizer from :func:`~.recipe.lora_plus_param_groups`; when the recipe computes
its own loss (per-rank loss, loss-aware rank sampling) it counts the supervised tokens of each train
rank over the whole optimisation step (every micro-batch of the accumulation, summed over the
processes) before the step runs, so that each micro-batch's loss
(:meth:`~.model.NestedLoraModel.loss`) is its exact share of the step's loss.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from transformers import Trainer

from .callbacks import NestedRankCallback
from .recipe import lora_plus_param_groups, rank_token_counts

if TYPE_CHECKING:
    import torch

    from .model import NestedLoraModel


class NestedTrainer(Trainer):
    """A ``Trainer`` that trains ``nested`` (its ``model`` is ``nested.model``) with ``nested.recipe``.

    Example::

        nested = add_nested_adapter(model, MatryoshkaConfig(train_ranks=(1, 2, 4, 8)), recipe=NestedRecipe(per_rank_loss=True))
        NestedTrainer(nested, args=args, train_dataset=ds, data_collator=collate).train()
    """

    def __init__(self, nested: "NestedLoraModel", **kwargs: Any) -> None:
        callbacks = list(kwargs.pop("callbacks", None) or [])
        if not any(isinstance(c, NestedRankCallback) for c in callbacks):
            callbacks.insert(0, NestedRankCallback(nested))
        kwargs.setdefault("model", nested.model)
        super().__init__(callbacks=callbacks, **kwargs)
        self.nested = nested
        #: the current optimisation step's supervised tokens per train rank, over all micro-batches and processes
        self.rank_tokens: torch.Tensor | None = None
        if nested.recipe.own_loss:
            self.loss_is_scaled_for_ga = True  # normalised over the whole step: Trainer must not divide again

    def create_optimizer(self, model: Any = None) -> Any:
        """Trainer's optimizer, with ``B`` in its own group at ``lr · lora_plus_ratio`` under LoRA+."""
        ratio = self.nested.recipe.lora_plus_ratio
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
        if self.nested.recipe.own_loss and batch_samples:
            self.rank_tokens = self.step_rank_tokens(batch_samples)
        return batch_samples, num_items

    def step_rank_tokens(self, batches: list[dict[str, Any]]) -> "torch.Tensor":
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

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None) -> Any:
        if not (self.nested.recipe.own_loss and model.training and "labels" in inputs):
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        loss = self.nested.loss(outputs.logits, labels, rank_tokens=self.rank_tokens)
        # each process holds its share of the step's loss; DDP, FSDP and DeepSpeed average gradients over processes
        loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss


__all__ = ["NestedTrainer"]
