"""The MatryoshkaLoRA method: scaling ``s(k)``, training diagonals and AURAC (DESIGN.md §1).

Pure functions on plain Python values; no tensors, no I/O.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Literal

from .errors import ConfigError, RankError

Scaling = Literal["none", "rank", "sqrt"]
Method = Literal["matryoshka", "lora", "dylora"]

SCALINGS: tuple[str, ...] = ("none", "rank", "sqrt")
METHODS: tuple[str, ...] = ("matryoshka", "lora", "dylora")


def check_scaling(scaling: str) -> Scaling:
    """Return ``scaling`` if it is one of ``none|rank|sqrt``; raise :class:`ConfigError` otherwise."""
    if scaling not in SCALINGS:
        raise ConfigError(f"unknown scaling {scaling!r}: expected one of {', '.join(SCALINGS)}")
    return scaling  # type: ignore[return-value]


def check_method(method: str) -> Method:
    """Return ``method`` if it is one of ``matryoshka|lora|dylora``; raise :class:`ConfigError` otherwise."""
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}: expected one of {', '.join(METHODS)}")
    return method  # type: ignore[return-value]


def scale(k: int, scaling: str = "sqrt", alpha: float = 1.0) -> float:
    """The scale ``s(k)`` of a rank-``k`` adapter: ``alpha``, ``alpha/k`` or ``alpha/sqrt(k)``.

    Raises:
        RankError: ``k`` is not a positive integer.
        ConfigError: ``scaling`` is unknown.
    """
    check_scaling(scaling)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise RankError(f"rank must be a positive integer, got {k!r}")
    if scaling == "none":
        return float(alpha)
    if scaling == "rank":
        return float(alpha) / k
    return float(alpha) / math.sqrt(k)


def check_train_ranks(train_ranks: Iterable[int], max_rank: int) -> tuple[int, ...]:
    """Validate and sort the train ranks ``T``: integers in ``[1, max_rank]`` that include ``max_rank``.

    Components above ``max(T)`` would receive no gradient, so ``max_rank`` must be in ``T``.

    Raises:
        RankError: ``T`` is empty, has duplicates or non-integers, leaves ``[1, r]``, or lacks ``r``.
    """
    if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1:
        raise RankError(f"max rank must be a positive integer, got {max_rank!r}")
    ranks = list(train_ranks)
    if not ranks:
        raise RankError("train ranks are empty: give at least the max rank, e.g. --ranks 1,2,4,8")
    for t in ranks:
        if isinstance(t, bool) or not isinstance(t, int):
            raise RankError(f"train rank {t!r} is not an integer")
    if len(set(ranks)) != len(ranks):
        raise RankError(f"train ranks {ranks} contain duplicates")
    out = tuple(sorted(ranks))
    bad = [t for t in out if t < 1 or t > max_rank]
    if bad:
        raise RankError(f"train ranks {bad} are outside [1, {max_rank}] (max rank {max_rank})")
    if out[-1] != max_rank:
        raise RankError(
            f"max rank {max_rank} is not among the train ranks {list(out)}: components above "
            f"{out[-1]} would get no gradient; add {max_rank} to the train ranks or lower the max rank to {out[-1]}"
        )
    return out


def matryoshka_diagonal(
    max_rank: int, train_ranks: Iterable[int], scaling: str = "sqrt", alpha: float = 1.0
) -> list[float]:
    """The training diagonal ``p`` of Algorithm 1: ``p_i = Σ_{t ∈ T, t ≥ i} s(t)`` for ``i = 1..r``.

    One forward pass with ``B · diag(p) · A`` trains every nested rank ``t ∈ T`` at once.
    """
    ranks = check_train_ranks(train_ranks, max_rank)
    scales = [scale(t, scaling, alpha) for t in ranks]
    return [sum(s for t, s in zip(ranks, scales) if t >= i) for i in range(1, max_rank + 1)]


def lora_diagonal(max_rank: int, scaling: str = "sqrt", alpha: float = 1.0) -> list[float]:
    """The diagonal of plain LoRA at rank ``r``: ``s(r)`` for every component."""
    return [scale(max_rank, scaling, alpha)] * max_rank


def dylora_diagonal(max_rank: int, b: int, scaling: str = "sqrt", alpha: float = 1.0) -> list[float]:
    """The DyLoRA diagonal for a sampled rank ``b``: ``s(b)`` on the first ``b`` components, 0 after."""
    if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= max_rank:
        raise RankError(f"sampled rank {b!r} is outside [1, {max_rank}]")
    s = scale(b, scaling, alpha)
    return [s] * b + [0.0] * (max_rank - b)


def training_diagonal(
    method: str,
    max_rank: int,
    train_ranks: Iterable[int],
    scaling: str = "sqrt",
    alpha: float = 1.0,
    sampled_rank: int | None = None,
) -> list[float]:
    """The diagonal ``d`` that ``method`` applies to ``A·x`` during training (DESIGN.md §1).

    ``dylora`` needs ``sampled_rank`` (the ``b`` of the current step), the others ignore it.
    """
    check_method(method)
    ranks = check_train_ranks(train_ranks, max_rank)
    if method == "matryoshka":
        return matryoshka_diagonal(max_rank, ranks, scaling, alpha)
    if method == "lora":
        return lora_diagonal(max_rank, scaling, alpha)
    if sampled_rank is None:
        raise ConfigError("method 'dylora' needs the sampled rank b of the current step")
    if sampled_rank not in ranks:
        raise RankError(f"sampled rank {sampled_rank} is not one of the train ranks {list(ranks)}")
    return dylora_diagonal(max_rank, sampled_rank, scaling, alpha)


def aurac(ranks: Sequence[int], scores: Sequence[float]) -> dict[str, float]:
    """Area under the rank-accuracy curve, ``{"v1": …, "v2": …}`` (DESIGN.md §1).

    ``v1`` integrates with trapezoids over ``k``, ``v2`` over ``log2 k``; each is divided by the
    span of its axis, so both are mean scores in the units of ``scores``. With one rank both equal
    that rank's score.

    Raises:
        RankError: ranks are empty, not strictly increasing, or not positive; lengths differ.
    """
    ks = list(ranks)
    ys = [float(y) for y in scores]
    if not ks:
        raise RankError("AURAC needs at least one evaluated rank")
    if len(ks) != len(ys):
        raise RankError(f"AURAC got {len(ks)} ranks but {len(ys)} scores")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise RankError(f"AURAC rank {k!r} is not a positive integer")
    ks = [int(k) for k in ks]
    if any(b <= a for a, b in zip(ks, ks[1:])):
        raise RankError(f"AURAC ranks must be strictly increasing, got {ks}: sort them with their scores")
    if len(ks) == 1:
        return {"v1": ys[0], "v2": ys[0]}

    def area(xs: list[float]) -> float:
        total = sum((x1 - x0) * (y0 + y1) / 2 for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:]))
        return total / (xs[-1] - xs[0])

    return {"v1": area([float(k) for k in ks]), "v2": area([math.log2(k) for k in ks])}


def peft_alpha_for(k: int, scaling: str, alpha: float = 1.0) -> tuple[float, bool]:
    """``(lora_alpha, use_rslora)`` that make PEFT's own scaling equal ``s(k)`` at ``r = k``.

    PEFT scales by ``lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` with ``use_rslora``).
    """
    check_scaling(scaling)
    if scaling == "none":
        return float(alpha) * k, False
    if scaling == "rank":
        return float(alpha), False
    return float(alpha), True
