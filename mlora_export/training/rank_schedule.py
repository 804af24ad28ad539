"""Weights over the train ranks ``T`` that change during a ``nested-loss`` run (pure functions).

The per-example rank assignment (:func:`mlora_export.method.example_ranks`) takes weights over
``T``; these functions say what those weights are at a given step:

- :func:`curriculum_weights`, a rank curriculum: the run starts on the low ranks (geometric
  weights ``∝ 2^-i`` over the sorted ranks, :func:`curriculum_start`) and moves linearly to the
  target weights (uniform, or the user's) over the first ``fraction`` of the steps;
- :func:`loss_aware_weights`, loss-aware rank sampling (after AttentiveNAS's "worst-up"
  sampling of sub-networks): a share ``beta`` of the assignment follows each rank's running
  training loss, so the ranks that lag get more examples.

``None`` stands for the uniform weights (the stratified assignment, exactly ``⌊n/|T|⌋`` or
``⌈n/|T|⌉`` examples per rank), as everywhere in :mod:`mlora_export.method`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..errors import ConfigError

#: Decay of the per-rank running training loss of loss-aware sampling (an average over about 10 steps).
LOSS_EMA_DECAY = 0.9


def curriculum_start(n_ranks: int) -> tuple[float, ...]:
    """The curriculum's first weights over ``n_ranks`` sorted train ranks: ``∝ 2^-i``, summing to 1.

    With 6 ranks: 0.51, 0.25, 0.13, 0.06, 0.03, 0.02 (the two lowest ranks hold three quarters).
    """
    raw = [2.0 ** -i for i in range(n_ranks)]
    total = sum(raw)
    return tuple(w / total for w in raw)


def curriculum_weights(
    n_ranks: int, step: int, total_steps: int, fraction: float, target: Sequence[float] | None = None
) -> tuple[float, ...] | None:
    """The curriculum's weights at optimisation step ``step`` of ``total_steps``.

    ``λ = min(1, step / (fraction · total_steps))``; the weights are
    ``(1 - λ)·curriculum_start + λ·target`` until ``λ`` reaches 1, then ``target`` itself (``None``:
    uniform). ``fraction = 0`` is no curriculum.

    Raises:
        ConfigError: ``fraction`` outside ``[0, 1]`` or ``total_steps`` < 1 with a curriculum.
    """
    if not math.isfinite(fraction) or not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"rank curriculum must be a fraction of the steps in [0, 1], got {fraction!r}", option="rank_curriculum")
    if fraction == 0.0:
        return None if target is None else tuple(target)
    if total_steps < 1:
        raise ConfigError(f"a rank curriculum needs the run's number of steps, got {total_steps!r}", option="rank_curriculum")
    lam = min(1.0, max(0, step) / (fraction * total_steps))
    if lam >= 1.0:
        return None if target is None else tuple(target)
    goal = [1.0 / n_ranks] * n_ranks if target is None else list(target)
    start = curriculum_start(n_ranks)
    return tuple((1.0 - lam) * s + lam * g for s, g in zip(start, goal))


def loss_aware_weights(weights: Sequence[float] | None, rank_losses: Sequence[float | None], beta: float) -> tuple[float, ...] | None:
    """``(1 - beta)·weights + beta·ℓ_t / Σℓ``: a share ``beta`` of the assignment follows the ranks' losses.

    ``rank_losses`` holds each train rank's running mean token loss, ``None`` while a rank has not
    been seen; until every rank has been seen (and for ``beta = 0``) ``weights`` is returned as is.

    Raises:
        ConfigError: ``beta`` outside ``[0, 1]``.
    """
    if not math.isfinite(beta) or not 0.0 <= beta <= 1.0:
        raise ConfigError(f"loss-aware rank share must be in [0, 1], got {beta!r}", option="loss_aware_ranks")
    if beta == 0.0 or any(x is None for x in rank_losses):
        return None if weights is None else tuple(weights)
    losses = [max(0.0, float(x)) for x in rank_losses]  # type: ignore[arg-type]
    total = sum(losses)
    if not math.isfinite(total) or total <= 0.0:
        return None if weights is None else tuple(weights)
    n = len(losses)
    base = [1.0 / n] * n if weights is None else list(weights)
    return tuple((1.0 - beta) * b + beta * x / total for b, x in zip(base, losses))


def update_running_losses(running: Sequence[float | None], sums: Sequence[float], counts: Sequence[float], decay: float = LOSS_EMA_DECAY) -> list[float | None]:
    """Fold one step's per-rank token-loss ``sums`` and token ``counts`` into the running means.

    A rank's first observation starts its mean; ranks without tokens this step keep theirs.
    """
    out: list[float | None] = []
    for old, s, c in zip(running, sums, counts):
        if c <= 0:
            out.append(old)
        else:
            mean = float(s) / float(c)
            out.append(mean if old is None else decay * old + (1.0 - decay) * mean)
    return out


__all__ = ["LOSS_EMA_DECAY", "curriculum_start", "curriculum_weights", "loss_aware_weights", "update_running_losses"]
