"""Put nested adapters on a transformers model and train them (docs/design.md §1).

Built on PEFT's own LoRA layers, so PEFT's module matching (``all-linear``, names, regexes),
quantised base layers (QLoRA), gradient checkpointing and ``save_pretrained`` keep working. The one
addition is a forward hook on every ``lora_A`` that multiplies ``A·x`` by a diagonal ``d`` before
``B``, with PEFT's own scaling held at 1, so a layer computes ``W x + B · diag(d) · A x``:

- ``nested-loss``: one diagonal per example, ``d_j = s(t_j)`` on the first ``t_j`` components, with
  the ranks ``t_j`` of each optimisation step stratified over ``T`` (every rank trained exactly as
  it is served; :func:`~mlora_export.method.example_ranks`);
- ``matryoshka``: ``d = p``, ``p_i = Σ_{t ∈ T, t ≥ i} s(t)`` (the paper's one pass: its forward is
  the *sum* of the nested deltas, not any single rank);
- ``lora``: ``d = s(r)·1`` (plain LoRA);
- ``dylora``: ``d_i = s(b)`` for ``i ≤ b``, 0 above, ``b ∈ T`` resampled every optimisation step;
- inference at rank ``k`` (:meth:`NestedLoraModel.set_rank`): ``d_i = s(k)`` for ``i ≤ k``, 0 above,
  which is exactly ``ΔW_k = s(k)·B[:, :k]·A[:k, :]`` — rank switching in place, no reload.

The diagonal lives in a non-persistent buffer of each ``lora_A`` module owned by one
:class:`NestedLoraModel`; nothing is global, and it never reaches the saved state dict.

Training loops. With ``transformers.Trainer`` pass ``callbacks=[NestedRankCallback(nested)]``
(:mod:`.callbacks`): it calls :meth:`NestedLoraModel.train_diagonal` with the optimiser
step at the start of each optimisation step. In a plain PyTorch loop call
``nested.train_diagonal(step)`` yourself before the forward passes of each optimisation step (once
per step, not per micro-batch, when accumulating gradients)::

    nested = add_nested_adapter(model, MatryoshkaConfig("nested-loss", 32, (1, 2, 4, 8, 16, 32)))
    opt = torch.optim.AdamW([p for p in nested.model.parameters() if p.requires_grad], lr=1e-3)
    for step, batch in enumerate(loader):
        nested.train_diagonal(step)
        loss = nested.model(**batch).loss
        loss.backward(); opt.step(); opt.zero_grad()
    nested.set_rank(8)             # evaluate (or serve) one nested rank in place
    nested.save("./nested")

During training the model computes ``B · diag(d) · A`` with the *training* diagonal, which for
``matryoshka`` is no single rank: switch with :meth:`NestedLoraModel.set_rank` before evaluating
(the Trainer callback does ``set_rank(r)`` when training ends). PEFT's own ``merge_adapter`` /
``merge_and_unload`` read the weights, not the hook: call :meth:`NestedLoraModel.remove` first (it
hands back a plain PEFT adapter at rank ``r`` and ``s(r)``), or merge a slice on disk.

Under ``torchrun``/``accelerate launch`` (DDP) nothing changes: DyLoRA's diagonal depends on the
step only, and ``nested-loss``'s per-example ranks on ``(seed, step, global position)`` only, so a
distributed run trains what one process with the same global batch would. Under FSDP (1 or 2) and
DeepSpeed ZeRO-3 the parameters are sharded: :meth:`NestedLoraModel.save` then gathers the LoRA
factors (never the base) and must be called on every process; only the main one writes
(:mod:`mlora_export.training.distributed`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..adapter import KEY_PREFIX, MatryoshkaConfig, NestedAdapter, save_nested
from ..errors import ConfigError, RankError
from ..fs import atomic_output_dir
from ..method import (
    PER_EXAMPLE_METHODS,
    check_method,
    example_ranks,
    rank_diagonal,
    training_diagonal,
)
from .rank_schedule import curriculum_weights, loss_aware_weights, update_running_losses
from ..validate import is_int
from .packing import global_offsets, sequence_ids
from .recipe import NestedRecipe, lora_plus_param_groups, nested_rank_loss, scale_a_like_paper, token_losses

if TYPE_CHECKING:
    import torch
    from peft import PeftModel

logger = logging.getLogger(__name__)

_BUFFER = "mlora_diag"
#: The diagonal last installed, as a tuple, kept on each ``lora_A`` next to its buffer (so that
#: re-installing the same one, every step for ``matryoshka``/``lora``, costs nothing).
_KEY = "_mlora_diag_key"

#: ``LoraConfig`` options :func:`add_nested_adapter` sets itself.
_OWN_LORA_KEYS = frozenset({"r", "lora_alpha", "use_rslora", "lora_dropout", "target_modules", "fan_in_fan_out", "task_type", "bias"})
#: ``LoraConfig`` options that may pass through: they only choose modules or initialise ``A``/``B``.
_PASS_LORA_KEYS = frozenset({"exclude_modules", "layers_to_transform", "layers_pattern", "init_lora_weights", "base_model_name_or_path", "revision"})


def _diag_hook(module: Any, args: Any, output: "torch.Tensor") -> "torch.Tensor":
    """Forward hook of a ``lora_A``: ``A·x ↦ d ⊙ (A·x)``.

    ``d`` is ``[r]`` (one diagonal for the batch, broadcast over every leading dim),
    ``[batch, 1, r]`` (``nested-loss``: one per example, broadcast over the sequence) or
    ``[batch, seq, r]`` (``nested-loss`` on packed rows: one per token, that of its sequence).
    """
    d = getattr(module, _BUFFER)
    if d.dim() == 3 and (output.dim() != 3 or output.shape[0] != d.shape[0] or d.shape[1] not in (1, output.shape[1])):
        raise ConfigError(
            f"per-example diagonals need LoRA inputs shaped [batch, seq, features] with batch {d.shape[0]}"
            f"{'' if d.shape[1] == 1 else f' and seq {d.shape[1]}'}; this layer got {list(output.shape[:-1])} "
            "(a model that flattens the batch cannot train nested-loss)"
        )
    return output * d.to(output.dtype)


def _has_diag_hook(module: Any) -> bool:
    return any(fn is _diag_hook for fn in module._forward_hooks.values())


def _batch_shape(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, int, Any] | None:
    """``(batch, seq, device)`` of a transformers model call (``input_ids`` or ``inputs_embeds``)."""
    for key in ("input_ids", "inputs_embeds"):
        value = kwargs.get(key)
        if value is not None:
            break
    else:
        value = args[0] if args and hasattr(args[0], "shape") else None
    if value is None:
        return None
    return int(value.shape[0]), int(value.shape[1]) if value.dim() > 1 else 1, value.device


def _stats_vector(sums: "torch.Tensor", counts: "torch.Tensor") -> "torch.Tensor":
    """``[sums, counts]`` as one float64 tensor on ``counts``' device (one all-reduce for both)."""
    import torch

    return torch.cat([sums.to(counts.device, torch.float64), counts.to(torch.float64)])


def _process_layout() -> tuple[int, int]:
    """``(process index, number of processes)`` of the running ``torch.distributed`` job, else ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class NestedLoraModel:
    """A PEFT model whose LoRA layers carry a nested-adapter diagonal; the handle to train, switch rank and save.

    Create it with :func:`add_nested_adapter` (new adapter) or :func:`load_nested_adapter`
    (an adapter on disk). ``model`` is the :class:`peft.PeftModel` to train or run; ``recipe``
    (:class:`~mlora_export.training.recipe.NestedRecipe`) the training options beyond the method.

    Raises:
        ConfigError: a recipe option the method cannot use.
    """

    def __init__(self, model: "PeftModel", config: MatryoshkaConfig, *, adapter_name: str = "default", seed: int = 0,
                 recipe: NestedRecipe | None = None) -> None:
        import torch
        from peft.tuners.lora import LoraLayer

        from ..method import peft_alpha_for

        self.recipe = recipe if recipe is not None else NestedRecipe()
        self.recipe.check_method(config.method)
        self.model = model
        self.config = config
        self.adapter_name = adapter_name
        self.seed = seed
        self.sampled_rank: int | None = None
        #: ``nested-loss``: the train rank of each example of the last training forward on this process.
        self.last_example_ranks: list[int] = []
        self.module_names: list[str] = []
        self._layers: list[Any] = []
        self._step = 0
        self._seen = 0  # sequences of the step's global batch before this process's next micro-batch
        self._per_example = False
        #: Whether training batches are packed (set by :class:`~.callbacks.NestedRankCallback` from
        #: TRL's ``packing``/``padding_free``): a batch without sequence boundaries is then refused.
        self.expect_packed = False
        self._layout: tuple[int, int] | None = None
        self._total_steps: int | None = None
        #: loss-aware sampling: running mean token loss per train rank, and the step whose statistics wait to be folded in
        self.rank_losses: list[float | None] = [None] * len(config.train_ranks)
        self._pending: tuple[int, "torch.Tensor", "torch.Tensor"] | None = None
        #: a training forward ran whose loss :meth:`loss` has not computed yet (a recipe with its own loss)
        self._awaiting_loss = False
        r = config.max_rank
        prefix = KEY_PREFIX
        for name, layer in model.named_modules():
            if not isinstance(layer, LoraLayer) or adapter_name not in layer.lora_A:
                continue
            if layer.r[adapter_name] != r:
                raise RankError(f"LoRA layer {name!r} has rank {layer.r[adapter_name]}, expected {r}")
            layer.scaling[adapter_name] = 1.0  # the diagonal carries all scaling
            lora_a = layer.lora_A[adapter_name]
            if not hasattr(lora_a, _BUFFER):
                lora_a.register_buffer(_BUFFER, torch.ones(r, device=lora_a.weight.device), persistent=False)
                setattr(lora_a, _KEY, None)
            if not _has_diag_hook(lora_a):  # a deep copy of a handled model keeps its hooks
                lora_a.register_forward_hook(_diag_hook)
            self._layers.append(layer)
            self.module_names.append(name[len(prefix):] if name.startswith(prefix) else name)
        if not self.module_names:
            raise ConfigError(f"the model has no LoRA layers for adapter {adapter_name!r}")
        # PEFT's own config describes the rank-r adapter at s(r), as the nested format does, so that
        # PEFT's save_pretrained (Trainer checkpoints, trainer.save_model) writes an adapter that loads right.
        peft_cfg = model.peft_config[adapter_name]
        peft_cfg.lora_alpha, peft_cfg.use_rslora = peft_alpha_for(r, config.scaling, config.alpha)
        self._pre_hook = model.get_base_model().register_forward_pre_hook(self._before_forward, with_kwargs=True)
        if config.method == "svd":
            self.set_rank(r)
        else:
            self.train_diagonal(step=0)

    # -- diagonals ------------------------------------------------------------------------
    def _lora_a_modules(self) -> list[Any]:
        if not self._layers:
            raise ConfigError("this nested adapter handle was removed (remove()); make a new one to switch ranks")
        return [layer.lora_A[self.adapter_name] for layer in self._layers]

    def set_diagonal(self, values: Sequence[float] | "torch.Tensor") -> None:
        """Set one ``d`` (length ``r``) in every layer for every example; a no-op when it is already installed.

        Ends the per-example mode of ``nested-loss`` until the next :meth:`train_diagonal`.

        Raises:
            RankError: ``values`` does not have length ``r``.
        """
        import torch

        d = torch.as_tensor(values, dtype=torch.float32).detach().cpu()
        if d.shape != (self.config.max_rank,):
            raise RankError(f"diagonal has shape {list(d.shape)}, expected [{self.config.max_rank}]")
        self._per_example = False
        self._install(d, tuple(d.tolist()))

    def _install(self, d: "torch.Tensor", key: tuple[Any, ...] | None) -> None:
        """Put ``d`` (``[r]`` or ``[batch, 1, r]``) in every layer's buffer; ``key`` skips a re-install."""
        import torch

        mods = self._lora_a_modules()
        if key is not None and all(getattr(m, _KEY, None) == key for m in mods):
            return
        on_device: dict[tuple[Any, Any], torch.Tensor] = {}
        with torch.no_grad():
            for mod in mods:
                buf = getattr(mod, _BUFFER)
                src = on_device.get((buf.device, buf.dtype))
                if src is None:
                    src = on_device[(buf.device, buf.dtype)] = d.to(buf.device, buf.dtype)
                if key is not None and buf.shape == src.shape:
                    buf.copy_(src)
                else:  # per-example diagonals: a new tensor per forward, shared by every layer, so a
                    # graph still waiting for its backward keeps the diagonals it was built with
                    mod._buffers[_BUFFER] = src
                setattr(mod, _KEY, key)

    def sample_rank(self, step: int) -> int:
        """DyLoRA's ``b`` for optimisation step ``step``: uniform over ``T``, a function of ``(seed, step)``
        only, so every process of a distributed run draws the same ``b``."""
        return random.Random(self.seed * 1_000_003 + step).choice(self.config.train_ranks)

    def train_diagonal(self, step: int = 0, *, total_steps: int | None = None, process_index: int | None = None,
                       num_processes: int | None = None) -> list[float] | None:
        """Install the method's training diagonal for optimisation step ``step``; return it.

        Call it once per optimisation step, before that step's forward passes (all its
        micro-batches). ``nested-loss`` returns ``None``: from here on every training forward
        assigns each example its rank (:func:`~mlora_export.method.example_ranks`) by its global
        position in the step, ``seen + process_index·batch + j``, where ``seen`` counts the
        examples of the step's global batch in earlier micro-batches (``batch`` per process and
        micro-batch, on ``num_processes`` processes: ``process_index``/``num_processes``, default from
        ``torch.distributed`` when it is initialised). This matches the order in which a
        ``Trainer``/``accelerate`` data loader shards a global batch, so a distributed run trains the
        ranks one process would.

        Packed rows (several sequences in one row, boundaries in ``position_ids`` or
        ``cu_seq_lens_q``: :mod:`~mlora_export.training.packing`) count each sequence as an
        example, row by row: every token gets the diagonal of its sequence's rank. Processes then
        hold different numbers of sequences, so under several processes each forward exchanges its
        count (one small ``all_gather``) to number them as one process would.
        ``total_steps`` (the run's optimisation steps) is needed by a rank curriculum.

        Raises:
            ConfigError: the method is not trained (``svd``).
        """
        c = self.config
        if total_steps is not None:
            self._total_steps = int(total_steps)
        if c.method in PER_EXAMPLE_METHODS:
            self._step, self._seen, self._per_example = step, 0, True
            self._layout = None if process_index is None and num_processes is None else (process_index or 0, num_processes or 1)
            self.sampled_rank = None
            return None
        b = self.sample_rank(step) if c.method == "dylora" else None
        self.sampled_rank = b
        d = training_diagonal(c.method, c.max_rank, c.train_ranks, c.scaling, c.alpha, sampled_rank=b)
        self.set_diagonal(d)
        return d

    def example_diagonals(self, ranks: Sequence[int]) -> "torch.Tensor":
        """``[len(ranks), 1, r]``: row ``j`` is rank ``ranks[j]``'s inference diagonal (``s(t)`` on the first ``t``)."""
        import torch

        r = self.config.max_rank
        return torch.tensor([rank_diagonal(r, t, self.config.scaling, self.config.alpha) for t in ranks], dtype=torch.float32).view(len(ranks), 1, r)

    def _before_forward(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Forward pre-hook of the transformers model: in ``nested-loss`` training, give each example its rank."""
        if not self._per_example:
            return
        if not module.training:  # evaluation inside a training run: the full rank r, as saved
            self._install(self.example_diagonals([self.config.max_rank])[0, 0], ("eval-r",))
            return
        shape = _batch_shape(args, kwargs)
        if shape is None:
            raise ConfigError("nested-loss needs input_ids or inputs_embeds to know the batch size of each forward")
        n, length, device = shape
        index, world = self.layout()
        seq_ids = sequence_ids(kwargs, n, length)
        if seq_ids is None:
            if self.expect_packed:
                raise ConfigError(
                    "a packed training batch carries no sequence boundaries (no position_ids or cu_seq_lens), so nested-loss "
                    "cannot give each packed sequence its own rank; pack padding-free (TRL: packing_strategy='bfd' or "
                    "padding_free=True), which passes position_ids"
                )
            start = self._seen + index * n
            self._seen += n * world
            count = n
        else:
            count = int(seq_ids[-1, -1]) + 1
            before, total = global_offsets(count, device, index, world)
            start = self._seen + before
            self._seen += total
        if self.recipe.own_loss:
            if count != n:
                raise ConfigError(
                    "per_rank_loss and loss_aware_ranks need one sequence per row: they weigh each example's loss by its rank, "
                    "and a packed row holds several; train them without packing/padding_free", option="per_rank_loss")
            if self._awaiting_loss:
                raise ConfigError(
                    "per_rank_loss and loss_aware_ranks compute the loss themselves: take each training forward's loss from "
                    "nested.loss()/forward_loss() (a plain loop) or train with mlora-export's NestedTrainer, not the model's "
                    "own loss (e.g. TRL's SFTTrainer)", option="per_rank_loss")
            self._awaiting_loss = True
        ranks = self.ranks_at(self._step, range(start, start + count))
        self.last_example_ranks = ranks
        d = self.example_diagonals(ranks)
        if seq_ids is not None and count != n:  # packed rows: each token gets its sequence's diagonal
            d = d[:, 0][seq_ids]
        self._install(d, None)

    def layout(self) -> tuple[int, int]:
        """``(process index, number of processes)`` the per-example positions are counted with."""
        return self._layout or _process_layout()

    # -- the recipe: rank weights over the run, the loss, optimizer groups -----------------------
    def rank_weights_at(self, step: int) -> tuple[float, ...] | None:
        """The weights over the train ranks of the per-example assignment at optimisation step ``step``.

        The config's ``rank_weights`` (``None``: uniform), moved by the recipe's rank curriculum
        (:func:`~mlora_export.training.rank_schedule.curriculum_weights`) and loss-aware share
        (:func:`~mlora_export.training.rank_schedule.loss_aware_weights`). Asking for a later step first
        folds the statistics of the last step's losses in (summed over the processes of a
        distributed run, a collective: every process asks at the same points).

        Raises:
            ConfigError: a rank curriculum without the run's number of steps.
        """
        rc, weights = self.recipe, self.config.rank_weights
        if not rc.dynamic_weights:
            return weights
        self._fold_losses(step)
        if rc.rank_curriculum > 0:
            if self._total_steps is None:
                raise ConfigError("a rank curriculum needs the run's number of steps: pass total_steps to train_diagonal()", option="rank_curriculum")
            weights = curriculum_weights(len(self.config.train_ranks), step, self._total_steps, rc.rank_curriculum, weights)
        if rc.loss_aware_ranks > 0:
            weights = loss_aware_weights(weights, self.rank_losses, rc.loss_aware_ranks)
        return weights

    def ranks_at(self, step: int, positions: Sequence[int] | range) -> list[int]:
        """``nested-loss``: the train rank of each example at the given global positions of step ``step``."""
        return example_ranks(self.config.train_ranks, positions, seed=self.seed, step=step, weights=self.rank_weights_at(step))

    def _fold_losses(self, step: int) -> None:
        if self._pending is None or self._pending[0] == step:
            return
        import torch.distributed as dist

        _, sums, counts = self._pending
        self._pending = None
        stats = _stats_vector(sums, counts)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(stats)
        n = len(self.config.train_ranks)
        self.rank_losses = update_running_losses(self.rank_losses, stats[:n].tolist(), stats[n:].tolist())

    def loss(self, logits: "torch.Tensor", labels: "torch.Tensor", *, rank_tokens: "torch.Tensor | None" = None) -> "torch.Tensor":
        """The training loss of the forward that produced ``logits`` (a causal LM; ``-100`` labels ignored).

        ``nested-loss``: :func:`~mlora_export.training.recipe.nested_lm_loss` over the ranks the
        forward ran at, per rank when the recipe says so, with ``rank_tokens`` the step's tokens
        per train rank (default: this batch's); the per-rank statistics feed loss-aware sampling.
        Other methods: the mean token loss, as transformers computes it.

        Raises:
            ConfigError: the ranks of the last forward do not match ``logits``.
        """
        per_example, n_tokens = token_losses(logits, labels)
        return self.example_loss(per_example, n_tokens, rank_tokens=rank_tokens)

    def example_loss(self, per_example: "torch.Tensor", n_tokens: "torch.Tensor", *, rank_tokens: "torch.Tensor | None" = None) -> "torch.Tensor":
        """:meth:`loss` from each example's summed token loss and supervised tokens (``[batch]`` each),
        for a caller that computed them its own way (the pipeline's trainer scores the supervised
        positions only: :func:`~mlora_export.training.trainer.supervised_token_losses`).

        Raises:
            ConfigError: the ranks of the last forward do not match the batch.
        """
        self._awaiting_loss = False
        if self.config.method not in PER_EXAMPLE_METHODS:
            return per_example.sum() / max(float(n_tokens.sum()), 1.0)
        loss, sums, counts = nested_rank_loss(per_example, n_tokens, self.last_example_ranks, self.config.train_ranks,
                                              per_rank=self.recipe.per_rank_loss, rank_tokens=rank_tokens)
        if self.recipe.loss_aware_ranks > 0:
            if self._pending is not None and self._pending[0] == self._step:
                sums, counts = self._pending[1] + sums.to(self._pending[1].dtype), self._pending[2] + counts
            self._pending = (self._step, sums.to(counts.dtype), counts)
        return loss

    def forward_loss(self, batch: dict[str, Any]) -> "torch.Tensor":
        """Run ``batch`` (``input_ids``, ``attention_mask``, ``labels``) and return its training loss.

        The model's own loss, unless the recipe computes its own (:meth:`loss`): the one call a
        plain training loop needs.
        """
        if not self.recipe.own_loss:
            return self.model(**batch).loss
        out = self.model(**{k: v for k, v in batch.items() if k != "labels"})
        return self.loss(out.logits, batch["labels"])

    def param_groups(self, lr: float, weight_decay: float = 0.0) -> list[dict[str, Any]]:
        """Optimizer parameter groups of the trainable parameters: ``B`` at ``lr · lora_plus_ratio`` with LoRA+,
        else one group (:func:`~mlora_export.training.recipe.lora_plus_param_groups`)."""
        return lora_plus_param_groups(self.model.named_parameters(), lr, self.recipe.lora_plus_ratio, weight_decay)

    def set_rank(self, k: int) -> None:
        """Run as the rank-``k`` adapter (``ΔW_k = s(k)·B[:, :k]·A[:k, :]``), in place; ``k = 0`` disables it."""
        r = self.config.max_rank
        if not is_int(k) or not 0 <= k <= r:
            raise RankError(f"rank {k!r} is outside [0, {r}]")
        self.set_diagonal(rank_diagonal(r, k, self.config.scaling, self.config.alpha))

    # -- saving ---------------------------------------------------------------------------
    def factors(self, *, main_only: bool = False) -> dict[str, tuple["torch.Tensor", "torch.Tensor"]]:
        """Module name → ``(A [r, in], B [out, r])`` detached on CPU, in model order.

        Whole factors under every engine: under FSDP or DeepSpeed ZeRO-3 they are gathered (only
        the LoRA factors), which is a collective, so call it on every process
        (:func:`~mlora_export.training.distributed.gather_lora_factors`); ``main_only`` leaves the others ``{}``.
        """
        from .distributed import gather_lora_factors

        return gather_lora_factors(self.model, self.adapter_name, main_only=main_only)

    @property
    def fan_in_fan_out(self) -> bool:
        """Whether the targets are transformers ``Conv1D`` layers (weights stored ``[in, out]``)."""
        cfg = self.model.peft_config[self.adapter_name]
        return bool(getattr(cfg, "fan_in_fan_out", False))

    def save(
        self,
        path: str | os.PathLike[str],
        *,
        force: bool = False,
        extra: dict[str, Any] | None = None,
        factors: dict[str, tuple["torch.Tensor", "torch.Tensor"]] | None = None,
    ) -> Path:
        """Write the nested adapter format (docs/design.md §2) atomically; returns the folder.

        Under FSDP or DeepSpeed ZeRO-3 call it on every process: the LoRA factors are gathered
        (a collective) and only the main process writes. Under DDP calling it on the main process
        alone is enough. ``factors`` (from :meth:`factors`) skips the gathering.

        Raises:
            ExportError: the factors are shards, not whole rank-``r`` factors.
        """
        from .distributed import check_full_factors, is_main_process

        if factors is None:
            factors = self.factors(main_only=True)
            if not is_main_process():
                return Path(path)
        check_full_factors(factors, self.config.max_rank)
        cfg = self.config
        if extra:
            cfg = dataclasses.replace(cfg, extra={**cfg.extra, **extra})
        peft_cfg = self.model.peft_config[self.adapter_name]
        task_type = getattr(peft_cfg, "task_type", None)
        task_type = getattr(task_type, "value", task_type)
        targets = peft_cfg.target_modules
        if _narrowed(peft_cfg):
            # layers_to_transform / exclude_modules are not written (minimal adapter_config): name the modules exactly
            targets = sorted(factors)
        with atomic_output_dir(path, force) as tmp:
            save_nested(
                tmp,
                factors,
                cfg,
                fan_in_fan_out=self.fan_in_fan_out,
                task_type=task_type,
                peft_extra={"target_modules": sorted(targets) if isinstance(targets, (set, list, tuple)) else targets},
            )
        return Path(path)

    def remove(self) -> None:
        """Take the nested machinery off: hooks and diagonals go, PEFT's scaling becomes ``s(r)`` again.

        What is left is a plain PEFT LoRA adapter at rank ``r`` (what ``PeftModel.from_pretrained``
        of the saved folder computes), so PEFT's ``merge_and_unload`` is right afterwards.
        """
        s_r = self.config.scale(self.config.max_rank)
        self._per_example = False
        self._pre_hook.remove()
        for layer in self._layers:
            mod = layer.lora_A[self.adapter_name]
            for hook_id, fn in list(mod._forward_hooks.items()):
                if fn is _diag_hook:
                    del mod._forward_hooks[hook_id]
            if hasattr(mod, _BUFFER):
                delattr(mod, _BUFFER)
            if hasattr(mod, _KEY):
                delattr(mod, _KEY)
            layer.scaling[self.adapter_name] = s_r
        self._layers.clear()


def _narrowed(peft_cfg: Any) -> bool:
    """Whether a PEFT config picks modules beyond ``target_modules`` (layer indexes, exclusions)."""
    layers = getattr(peft_cfg, "layers_to_transform", None)
    return bool(getattr(peft_cfg, "exclude_modules", None)) or (layers is not None and layers != [])


def _check_lora_kwargs(lora_kwargs: dict[str, Any]) -> None:
    own = sorted(k for k in lora_kwargs if k in _OWN_LORA_KEYS)
    if own:
        raise ConfigError(f"LoRA option(s) {', '.join(own)} are set by add_nested_adapter itself (rank and scaling come from the MatryoshkaConfig); drop them")
    other = sorted(k for k in lora_kwargs if k not in _PASS_LORA_KEYS)
    if other:
        raise ConfigError(
            f"LoRA option(s) {', '.join(other)} are not supported: the nested adapter format holds plain LoRA factors only "
            f"(no DoRA, LoRA bias, rank/alpha patterns or extra saved modules); supported: {', '.join(sorted(_PASS_LORA_KEYS))}"
        )
    init = lora_kwargs.get("init_lora_weights", True)
    if not (init is True or init is False or init == "gaussian"):
        raise ConfigError(f"init_lora_weights={init!r} is not supported: use True, False or 'gaussian' (other inits change the base weights)")


def add_nested_adapter(
    model: Any,
    config: MatryoshkaConfig,
    *,
    target_modules: str | Sequence[str] = "all-linear",
    dropout: float = 0.0,
    task_type: str | None = "CAUSAL_LM",
    seed: int = 0,
    adapter_name: str = "default",
    recipe: NestedRecipe | None = None,
    **lora_kwargs: Any,
) -> NestedLoraModel:
    """Wrap a transformers ``model`` with a new trainable nested adapter of rank ``config.max_rank``.

    ``target_modules`` is PEFT's: ``"all-linear"`` (every Linear/Conv1D but the output head) or
    module names. ``lora_kwargs`` pass through to :class:`peft.LoraConfig`, for the options that only
    choose modules or initialise ``A``/``B`` (``layers_to_transform``, ``layers_pattern``,
    ``exclude_modules``, ``init_lora_weights``). ``A`` is initialised from ``seed`` without touching
    torch's global random state (and scaled as the paper's with ``recipe.a_init == "paper"``).
    ``recipe`` (:class:`~mlora_export.training.recipe.NestedRecipe`) holds the training options.

    Raises:
        ConfigError: no module matched, a matched module is not ``nn.Linear``/``Conv1D``, targets mix
            the two, or a LoRA option the nested format cannot hold (DoRA, LoRA bias, patterns, …).
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    check_method(config.method, trainable=True)
    recipe = recipe if recipe is not None else NestedRecipe()
    recipe.check_method(config.method)
    targets: str | list[str] = target_modules if isinstance(target_modules, str) else list(target_modules)
    if not targets:
        raise ConfigError("no target modules given: use 'all-linear' or module names like q_proj,v_proj")
    _check_lora_kwargs(lora_kwargs)
    kinds = _target_kinds(model, targets, task_type, lora_kwargs)
    if not kinds:
        raise ConfigError(f"target modules {targets!r} match no Linear or Conv1D layer of the model")
    if len(kinds) > 1:
        raise ConfigError("targets mix nn.Linear and Conv1D layers; PEFT's fan_in_fan_out is one flag: target one kind")
    r = config.max_rank
    lcfg = LoraConfig(
        r=r,
        lora_alpha=r,  # PEFT's scaling = 1; the diagonal carries s(·)
        lora_dropout=dropout,
        target_modules=targets,
        fan_in_fan_out=kinds == {Conv1D},
        task_type=task_type,
        bias="none",
        **lora_kwargs,
    )
    with torch.random.fork_rng(devices=[]), quiet_peft():  # PEFT creates and initialises A on the CPU
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, lcfg, adapter_name=adapter_name)
    saved_elsewhere = getattr(peft_model.peft_config[adapter_name], "modules_to_save", None)
    if saved_elsewhere:
        logger.warning(
            "PEFT also trains %s for task type %s; the nested adapter format holds the LoRA factors only, so save() does not write them",
            sorted(saved_elsewhere), task_type,
        )
    nested = NestedLoraModel(peft_model, config, adapter_name=adapter_name, seed=seed, recipe=recipe)
    if recipe.a_init == "paper":
        scale_a_like_paper(nested._lora_a_modules())
    return nested


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """Hide the transformers 5 deprecation warning that PEFT triggers (``is_gradient_checkpointing``)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _target_kinds(model: Any, targets: str | list[str], task_type: str | None, lora_kwargs: dict[str, Any] | None = None) -> set[type]:
    """The layer classes (``nn.Linear``, ``Conv1D``) PEFT would adapt for ``targets``.

    Raises:
        ConfigError: a matched module is neither (an embedding, a convolution, a whole block): its
            LoRA factors would not be ``[r, in]``/``[out, r]`` matrices, and the diagonal would not apply.
    """
    import torch
    from peft import LoraConfig
    from peft.tuners.tuners_utils import (
        _maybe_include_all_linear_layers,
        check_target_module_exists,
    )
    from transformers.pytorch_utils import Conv1D

    select = {k: v for k, v in (lora_kwargs or {}).items() if k in ("exclude_modules", "layers_to_transform", "layers_pattern")}
    cfg = _maybe_include_all_linear_layers(LoraConfig(target_modules=targets, task_type=task_type, **select), model)
    kinds: set[type] = set()
    other: list[str] = []
    for name, mod in model.named_modules():
        if not name or not check_target_module_exists(cfg, name):
            continue
        if isinstance(mod, (torch.nn.Linear, Conv1D)):
            kinds.add(Conv1D if isinstance(mod, Conv1D) else torch.nn.Linear)
        else:
            other.append(f"{name} ({type(mod).__name__})")
    if other:
        more = f" and {len(other) - 3} more" if len(other) > 3 else ""
        raise ConfigError(
            f"target modules {targets!r} match modules that are not nn.Linear or Conv1D: {', '.join(other[:3])}{more}; "
            "name only linear layers, e.g. q_proj,v_proj, or use 'all-linear'"
        )
    return kinds


def load_nested_adapter(
    model: Any,
    adapter: NestedAdapter | str | os.PathLike[str],
    *,
    is_trainable: bool = False,
    adapter_name: str = "default",
    seed: int = 0,
) -> NestedLoraModel:
    """Put an adapter from disk on ``model`` through PEFT; switch ranks with :meth:`NestedLoraModel.set_rank`.

    Starts at the full rank ``r`` (``set_rank(r)``), i.e. what ``PeftModel.from_pretrained`` computes.
    With ``is_trainable`` it can be trained further; ``seed`` is then DyLoRA's sampling seed.

    Raises:
        InvalidAdapterError: the folder is not a valid nested adapter.
    """
    from peft import PeftModel

    nested = adapter if isinstance(adapter, NestedAdapter) else NestedAdapter.load(adapter)
    if is_trainable:
        check_method(nested.config.method, trainable=True)
    with quiet_peft():
        peft_model = PeftModel.from_pretrained(model, str(nested.path), adapter_name=adapter_name, is_trainable=is_trainable)
    handle = NestedLoraModel(peft_model, nested.config, adapter_name=adapter_name, seed=seed)
    handle.set_rank(nested.max_rank)
    return handle

