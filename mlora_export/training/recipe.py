"""Training-time options of a nested adapter (issue 26), shared by the Trainer path and plain loops.

:class:`NestedRecipe` holds five options, each off by default; the functions here are their
mechanisms, used both by :class:`~mlora_export.training.model.NestedLoraModel` (plain PyTorch
loops, the reproduction harness) and by ``mlora-export train`` (:mod:`.trainer`):

- ``lora_plus_ratio`` (LoRA+, Hayou et al. 2024): ``B`` learns ``ratio`` times faster than ``A``
  (:func:`lora_plus_param_groups`); any method;
- ``rank_curriculum``: the rank weights move from the low ranks to the target weights over that
  fraction of the steps (:func:`mlora_export.training.rank_schedule.curriculum_weights`); ``nested-loss``;
- ``per_rank_loss``: each train rank's examples weigh the same in the loss whatever their share
  of the step's tokens (:func:`nested_lm_loss`); ``nested-loss``;
- ``a_init="paper"``: ``A`` initialised as the paper's ``[in, r]`` parameter, ``sqrt(in/r)``
  times PEFT's scale (:func:`scale_a_like_paper`); any method;
- ``loss_aware_ranks``: a share of the rank assignment follows each rank's running training loss
  (:func:`mlora_export.training.rank_schedule.loss_aware_weights`); ``nested-loss``.

They change how the adapter is trained, never what it is: the saved format and the rank slices
are those of docs/design.md §2 whatever the recipe.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from ..params import param
from ..validate import is_finite_real

if TYPE_CHECKING:
    import torch

#: Initialisations of ``A``: PEFT's own (Kaiming-uniform on ``[r, in]``) or the paper's ``[in, r]`` layout.
A_INITS: tuple[str, ...] = ("peft", "paper")
#: Options that only make sense with per-example ranks (``nested-loss``).
_NESTED_LOSS_ONLY = ("rank_curriculum", "per_rank_loss", "loss_aware_ranks")


@dataclass(frozen=True)
class NestedRecipe:
    """How a nested adapter is trained, beyond the method and the loop (all off by default).

    Raises:
        ConfigError: a value out of range (``option`` names the field).
    """

    #: LoRA+: ``B``'s learning rate over ``A``'s (``None``: one learning rate); Hayou et al. suggest 16.
    lora_plus_ratio: float | None = param(
        None, flag="--lora-plus-ratio", min=0, min_open=True,
        help="LoRA+ (Hayou et al. 2024): B's learning rate is this many times A's, e.g. 16.  [default: one learning rate]")
    #: Fraction of the steps over which the rank weights move from the low ranks to the target (0: off).
    rank_curriculum: float = param(
        0.0, flag="--rank-curriculum", min=0, max=1, show_default=True,
        help="nested-loss only: over this fraction of the steps the rank weights move from the low ranks "
             "(weights ∝ 1, 1/2, 1/4, ... over the sorted train ranks) to --rank-weights; 0 is off.")
    #: Mean token loss per train rank, then the mean over ranks (instead of one mean over all tokens).
    per_rank_loss: bool = param(
        False, flag="--per-rank-loss",
        help="nested-loss only: mean token loss per train rank, then the mean over ranks (every rank weighs the same "
             "in each step, whatever its examples' tokens).  [default: one mean over all tokens]")
    #: ``peft`` or ``paper`` (``A`` scaled by ``sqrt(in_features / r)``).
    a_init: str = param(
        "peft", flag="--a-init", choices=A_INITS, show_default=True,
        help="Initial scale of A: peft (Kaiming on [r, in]) or paper (the paper's [in, r] layout: sqrt(in/r) times larger).")
    #: Share of the rank assignment that follows the ranks' running training losses (0: off).
    loss_aware_ranks: float = param(
        0.0, flag="--loss-aware-ranks", min=0, max=1, show_default=True,
        help="nested-loss only: share (0-1) of the rank assignment that follows each rank's running training loss, "
             "so lagging ranks get more examples; 0 is off.")

    def __post_init__(self) -> None:
        r = self.lora_plus_ratio
        if r is not None and (not is_finite_real(r) or r <= 0):
            raise ConfigError(f"LoRA+ ratio must be a positive number (B's learning rate over A's), got {r!r}", option="lora_plus_ratio")
        c = self.rank_curriculum
        if not is_finite_real(c) or not 0.0 <= c <= 1.0:
            raise ConfigError(f"rank curriculum must be a fraction of the steps in [0, 1], got {c!r}", option="rank_curriculum")
        if not isinstance(self.per_rank_loss, bool):
            raise ConfigError(f"per-rank loss must be true or false, got {self.per_rank_loss!r}", option="per_rank_loss")
        if self.a_init not in A_INITS:
            raise ConfigError(f"unknown A initialisation {self.a_init!r}: expected one of {', '.join(A_INITS)}", option="a_init")
        b = self.loss_aware_ranks
        if not is_finite_real(b) or not 0.0 <= b <= 1.0:
            raise ConfigError(f"loss-aware rank share must be in [0, 1], got {b!r}", option="loss_aware_ranks")

    @property
    def own_loss(self) -> bool:
        """Whether the loss is computed by :func:`nested_lm_loss` (per-rank loss, or loss-aware sampling's statistics)."""
        return self.per_rank_loss or self.loss_aware_ranks > 0

    @property
    def dynamic_weights(self) -> bool:
        """Whether the rank weights change during the run."""
        return self.rank_curriculum > 0 or self.loss_aware_ranks > 0

    def check_method(self, method: str) -> None:
        """Raise :class:`ConfigError` when an option needs per-example ranks and ``method`` has none."""
        if method == "nested-loss":
            return
        on = [name for name in _NESTED_LOSS_ONLY if getattr(self, name) not in (0.0, False)]
        if on:
            raise ConfigError(f"{', '.join(on)} apply to method 'nested-loss' only (per-example ranks), not {method!r}", option=on[0])

    def changed(self) -> dict[str, Any]:
        """The options that differ from the defaults (what an adapter records of its recipe)."""
        default = NestedRecipe()
        return {k: v for k, v in asdict(self).items() if getattr(default, k) != v}


def lora_plus_param_groups(named_parameters: Iterable[tuple[str, "torch.nn.Parameter"]], lr: float, ratio: float | None,
                           weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """Optimizer parameter groups: ``lora_B`` weights at ``lr · ratio``, every other trainable parameter at ``lr``.

    ``ratio=None`` gives one group at ``lr``. A parameter is ``B``'s when its name has a ``lora_B``
    component (PEFT's naming, kept under DDP, FSDP with original parameters and DeepSpeed). A
    learning-rate scheduler multiplies each group's own rate, so the ratio holds all along.
    """
    a: list[Any] = []
    b: list[Any] = []
    for name, p in named_parameters:
        if not p.requires_grad:
            continue
        (b if ratio is not None and "lora_B" in name.split(".") else a).append(p)
    groups = [{"params": a, "lr": lr, "weight_decay": weight_decay}]
    if b:
        groups.append({"params": b, "lr": lr * float(ratio), "weight_decay": weight_decay})  # type: ignore[arg-type]
    return groups


def scale_a_like_paper(lora_a_modules: Sequence[Any]) -> None:
    """Scale each ``A`` (``[r, in]``, PEFT's Kaiming-uniform ``U(±1/sqrt(in))``) by ``sqrt(in / r)``, in place.

    The result is distributed as the paper's ``A`` of shape ``[in, r]`` under the same
    initialiser, ``U(±1/sqrt(r))``: the fan-in Kaiming sees is ``r`` there, not ``in``.
    """
    import torch

    with torch.no_grad():
        for mod in lora_a_modules:
            r, fan_in = mod.weight.shape
            mod.weight.mul_(math.sqrt(fan_in / r))


def token_losses(logits: "torch.Tensor", labels: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
    """Per-example ``(sum of token cross-entropies, supervised tokens)`` of a causal LM, shifted as
    transformers shifts (``logits[:, :-1]`` predicts ``labels[:, 1:]``; ``-100`` is ignored)."""
    import torch

    from ..data import IGNORE_INDEX

    lg = logits[:, :-1].float()
    lb = labels[:, 1:].to(lg.device)
    tok = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), lb.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
    return tok.view(lb.shape).sum(dim=1), (lb != IGNORE_INDEX).sum(dim=1)


def rank_token_counts(labels: "torch.Tensor", ranks: Sequence[int], train_ranks: Sequence[int]) -> "torch.Tensor":
    """Supervised tokens (after the causal shift) per train rank, as float64 ``[|T|]``."""
    import torch

    from ..data import IGNORE_INDEX

    per_example = (labels[:, 1:] != IGNORE_INDEX).sum(dim=1).to("cpu", torch.float64)
    idx = torch.tensor([list(train_ranks).index(t) for t in ranks], dtype=torch.long)
    return torch.zeros(len(train_ranks), dtype=torch.float64).index_add_(0, idx, per_example)


def nested_lm_loss(
    logits: "torch.Tensor",
    labels: "torch.Tensor",
    ranks: Sequence[int],
    train_ranks: Sequence[int],
    *,
    per_rank: bool,
    rank_tokens: "torch.Tensor | None" = None,
) -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]:
    """``(loss, sums, counts)`` of a ``nested-loss`` forward whose example ``j`` ran at rank ``ranks[j]``:
    :func:`nested_rank_loss` of the causal LM's per-example token losses (:func:`token_losses`).

    Raises:
        ConfigError: a rank is not a train rank, or ``ranks`` does not match the batch.
    """
    per_example, n_tokens = token_losses(logits, labels)
    return nested_rank_loss(per_example, n_tokens, ranks, train_ranks, per_rank=per_rank, rank_tokens=rank_tokens)


def nested_rank_loss(
    per_example: "torch.Tensor",
    n_tokens: "torch.Tensor",
    ranks: Sequence[int],
    train_ranks: Sequence[int],
    *,
    per_rank: bool,
    rank_tokens: "torch.Tensor | None" = None,
) -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]:
    """``(loss, sums, counts)`` from each example's summed token loss ``per_example`` and supervised
    tokens ``n_tokens`` (``[batch]``), example ``j`` having run at rank ``ranks[j]``.

    ``sums``/``counts`` (detached, ``[|T|]``) are this forward's token-loss sums and supervised
    tokens per train rank. ``rank_tokens`` are the tokens per train rank of the whole
    optimisation step (every micro-batch and process; default: this forward's). With ``S_t`` the
    summed token loss of rank ``t``'s examples here and ``N_t`` its step total:

    - ``per_rank=False``: ``Σ_t S_t / Σ_t N_t``, the usual mean over the step's tokens (each rank
      weighs as its share of the tokens);
    - ``per_rank=True``: ``(1/|P|) Σ_{t ∈ P} S_t / N_t`` with ``P`` the ranks that have tokens in
      the step: every rank's examples weigh ``1/|P|`` in the loss, so in the gradient of component
      ``i`` the ranks ``t ≥ i`` that use it weigh equally, whatever their number of examples and
      tokens in the step.

    Summed over the micro-batches (and processes) of a step, either is the step's loss exactly.

    Raises:
        ConfigError: a rank is not a train rank, or ``ranks`` does not match the batch.
    """
    import torch

    ts = list(train_ranks)
    if len(ranks) != per_example.shape[0]:
        raise ConfigError(f"{len(ranks)} example ranks for a batch of {per_example.shape[0]}: run the forward through the nested model's hook first")
    bad = sorted(set(ranks) - set(ts))
    if bad:
        raise ConfigError(f"example ranks {bad} are not train ranks {ts}")
    idx = torch.tensor([ts.index(t) for t in ranks], dtype=torch.long, device=per_example.device)
    sums = torch.zeros(len(ts), dtype=per_example.dtype, device=per_example.device).index_add(0, idx, per_example)
    counts = torch.zeros(len(ts), dtype=torch.float64, device=per_example.device).index_add(0, idx, n_tokens.to(per_example.device, torch.float64))
    step_tokens = (counts if rank_tokens is None else rank_tokens.to(per_example.device, torch.float64))
    if per_rank:
        present = step_tokens > 0
        n_present = int(present.sum())
        denom = torch.where(present, step_tokens, torch.ones_like(step_tokens)).to(sums.dtype)
        loss = (sums / denom * present.to(sums.dtype)).sum() / max(n_present, 1)
    else:
        loss = sums.sum() / max(float(step_tokens.sum()), 1.0)
    return loss, sums.detach(), counts.detach()


__all__ = [
    "A_INITS", "NestedRecipe", "lora_plus_param_groups", "nested_lm_loss", "nested_rank_loss", "rank_token_counts",
    "scale_a_like_paper", "token_losses",
]
