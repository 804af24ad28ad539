"""The MatryoshkaLoRA method: scaling ``s(k)``, training diagonals and AURAC (docs/design.md §1).

Pure functions on plain Python values; no tensors, no I/O.
"""

from __future__ import annotations

import math
import numbers
import random
from collections.abc import Iterable, Sequence
from typing import Literal

from .errors import ConfigError, RankError
from .validate import is_finite_real, is_int

Scaling = Literal["none", "rank", "sqrt"]
Method = Literal["nested-loss", "matryoshka", "lora", "dylora", "svd"]

SCALINGS: tuple[str, ...] = ("none", "rank", "sqrt")
#: Every method a nested adapter may record; ``svd`` is written by re-nesting, never trained.
METHODS: tuple[str, ...] = ("nested-loss", "matryoshka", "lora", "dylora", "svd")
#: The methods :func:`mlora_export.training.add_nested_adapter` can train.
TRAIN_METHODS: tuple[str, ...] = ("nested-loss", "matryoshka", "lora", "dylora")
#: Methods whose training diagonal is one vector per example, not per batch.
PER_EXAMPLE_METHODS: tuple[str, ...] = ("nested-loss",)


#: The largest scale ``s(k)`` (and PEFT ``lora_alpha / r``) accepted. Scales in use are between
#: about 0.01 and a few hundred; a larger one is a corrupt or hostile config, and multiplies
#: weights towards infinity (float16 overflows at 65504).
MAX_SCALE = 1e6


def check_alpha(alpha: object, what: str = "alpha") -> float:
    """Return ``alpha`` as a float if it is a positive finite number of at most :data:`MAX_SCALE`.

    ``alpha`` is ``s(1)``, the largest ``s(k)`` of every scaling (``alpha``, ``alpha/k``,
    ``alpha/sqrt(k)``), so this bounds every scale of the adapter.

    Raises:
        ConfigError: not a number, not positive, not finite, or above :data:`MAX_SCALE`.
    """
    if not is_finite_real(alpha) or alpha <= 0:  # type: ignore[operator]
        raise ConfigError(f"{what} must be a positive finite number, got {str(alpha)[:40]}")
    if alpha > MAX_SCALE:  # type: ignore[operator]
        raise ConfigError(f"{what} = {float(alpha):g} is above {MAX_SCALE:g}, the largest scale supported; "  # type: ignore[arg-type]
                          "no LoRA scales its delta by that much: fix the config")
    return float(alpha)  # type: ignore[arg-type]


def check_scaling(scaling: str) -> Scaling:
    """Return ``scaling`` if it is one of ``none|rank|sqrt``; raise :class:`ConfigError` otherwise."""
    if scaling not in SCALINGS:
        raise ConfigError(f"unknown scaling {scaling!r}: expected one of {', '.join(SCALINGS)}")
    return scaling  # type: ignore[return-value]


def check_method(method: str, *, trainable: bool = False) -> Method:
    """Return ``method`` if it is one of :data:`METHODS` (of :data:`TRAIN_METHODS` with ``trainable``).

    Raises:
        ConfigError: an unknown method, or ``svd`` where a trainable method is needed.
    """
    allowed = TRAIN_METHODS if trainable else METHODS
    if method not in allowed:
        if method in METHODS:
            raise ConfigError(f"method {method!r} is not trained: it is what re-nesting an ordinary LoRA adapter writes; train one of {', '.join(allowed)}")
        raise ConfigError(f"unknown method {method!r}: expected one of {', '.join(allowed)}")
    return method  # type: ignore[return-value]


def scale(k: int, scaling: str = "sqrt", alpha: float = 1.0) -> float:
    """The scale ``s(k)`` of a rank-``k`` adapter: ``alpha``, ``alpha/k`` or ``alpha/sqrt(k)``.

    Raises:
        RankError: ``k`` is not a positive integer.
        ConfigError: ``scaling`` is unknown.
    """
    check_scaling(scaling)
    if not is_int(k) or k < 1:
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
    if not is_int(max_rank) or max_rank < 1:
        raise RankError(f"max rank must be a positive integer, got {max_rank!r}")
    ranks = list(train_ranks)
    if not ranks:
        raise RankError("train ranks are empty: give at least the max rank, e.g. 1,2,4,8", option="ranks")
    for t in ranks:
        if not is_int(t):
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


def rank_diagonal(max_rank: int, k: int, scaling: str = "sqrt", alpha: float = 1.0) -> list[float]:
    """The inference form of rank ``k`` as a diagonal: ``s(k)`` on the first ``k`` components, 0 after.

    ``B · diag(d) · A = s(k)·B[:, :k]·A[:k, :]``; ``k = 0`` gives all zeros (the base model).
    """
    if not is_int(k) or not 0 <= k <= max_rank:
        raise RankError(f"rank {k!r} is outside [0, {max_rank}]")
    s = scale(k, scaling, alpha) if k else 0.0
    return [s] * k + [0.0] * (max_rank - k)


def dylora_diagonal(max_rank: int, b: int, scaling: str = "sqrt", alpha: float = 1.0) -> list[float]:
    """The DyLoRA diagonal for a sampled rank ``b``: ``s(b)`` on the first ``b`` components, 0 after."""
    if not is_int(b) or not 1 <= b <= max_rank:
        raise RankError(f"sampled rank {b!r} is outside [1, {max_rank}]")
    return rank_diagonal(max_rank, b, scaling, alpha)


def check_rank_weights(weights: Iterable[float] | None, train_ranks: Sequence[int]) -> tuple[float, ...] | None:
    """Validate weights over the train ranks ``T`` (one per rank, finite, >= 0, not all 0); normalise to sum 1.

    ``None`` (uniform) stays ``None``.

    Raises:
        ConfigError: wrong count, a non-number, a negative or non-finite weight, or all zero.
    """
    if weights is None:
        return None
    ws = list(weights)
    if len(ws) != len(train_ranks):
        raise ConfigError(f"{len(ws)} rank weights for {len(train_ranks)} train ranks {list(train_ranks)}: give one weight per train rank")
    for w in ws:
        if not is_finite_real(w) or w < 0:
            raise ConfigError(f"rank weight {str(w)[:40]} is not a finite non-negative number")
    total = float(sum(ws))
    if total <= 0:
        raise ConfigError("rank weights are all zero: at least one train rank needs a positive weight")
    return tuple(float(w) / total for w in ws)


#: Positions per block of the weighted assignment (systematic sampling within each block).
WEIGHTED_BLOCK = 64


def example_ranks(
    train_ranks: Sequence[int],
    positions: Iterable[int],
    *,
    seed: int,
    step: int,
    weights: Sequence[float] | None = None,
) -> list[int]:
    """``nested-loss``: the train rank of each example at the given global positions of step ``step``.

    The positions ``0, 1, 2, …`` of a step's global batch (all processes, all micro-batches) are
    cut into blocks. Uniform (``weights`` is None): each block of ``|T|`` positions is a random
    permutation of ``T``, so any batch of ``n`` examples holds every rank ``⌊n/|T|⌋`` or
    ``⌈n/|T|⌉`` times, in shuffled order. Weighted (normalised weights, see
    :func:`check_rank_weights`): each block of :data:`WEIGHTED_BLOCK` positions is filled by
    systematic sampling with a random offset and then shuffled, so rank ``t`` appears
    ``⌊64·w_t⌋`` or ``⌈64·w_t⌉`` times per block and ``64·w_t`` times in expectation.

    A function of ``(seed, step, position)`` only (never of the process or batch layout): a
    distributed run assigns exactly the ranks of one process with the same global batch.
    """
    ranks = list(train_ranks)
    block = len(ranks) if weights is None else WEIGHTED_BLOCK
    cache: dict[int, list[int]] = {}
    out = []
    for pos in positions:
        if not is_int(pos) or pos < 0:
            raise RankError(f"example position {pos!r} is not a non-negative integer")
        q, i = divmod(pos, block)
        order = cache.get(q)
        if order is None:
            order = cache[q] = _block_ranks(ranks, block, weights, random.Random(f"mlora-nested-loss:{seed}:{step}:{q}"))
        out.append(order[i])
    return out


def _block_ranks(ranks: list[int], block: int, weights: Sequence[float] | None, rnd: random.Random) -> list[int]:
    if weights is None:
        order = list(ranks)
    else:  # systematic sampling: points (u + i) / block on the cumulative weights
        u = rnd.random()
        order, cum, j = [], 0.0, 0
        bounds = []
        for w in weights:
            cum += w
            bounds.append(cum)
        bounds[-1] = 1.0 + 1e-12
        for i in range(block):
            x = (u + i) / block
            while x >= bounds[j]:
                j += 1
            order.append(ranks[j])
    rnd.shuffle(order)
    return order


def training_diagonal(
    method: str,
    max_rank: int,
    train_ranks: Iterable[int],
    scaling: str = "sqrt",
    alpha: float = 1.0,
    sampled_rank: int | None = None,
) -> list[float]:
    """The diagonal ``d`` that ``method`` applies to ``A·x`` during training (docs/design.md §1).

    ``dylora`` needs ``sampled_rank`` (the ``b`` of the current step), the others ignore it.
    ``nested-loss`` has one diagonal per example: see :func:`example_ranks` and :func:`rank_diagonal`.

    Raises:
        ConfigError: an unknown or untrainable method, or a per-example one.
    """
    check_method(method, trainable=True)
    if method in PER_EXAMPLE_METHODS:
        raise ConfigError(f"method {method!r} trains one rank per example, not one diagonal per batch: use example_ranks()")
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
    """Area under the rank-accuracy curve, ``{"v1": …, "v2": …}`` (docs/design.md §1).

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
    """``(lora_alpha, use_rslora)`` that make PEFT's own scaling equal ``s(k)`` at ``r = k``: ``(s(k)·k, False)``.

    PEFT scales by ``lora_alpha / r``; ``use_rslora`` (``lora_alpha / sqrt(r)``) is never used,
    because llama.cpp's converter and other runtimes ignore it and would apply ``lora_alpha / r``
    (docs/design.md §2): ``none`` → ``alpha·k``, ``rank`` → ``alpha``, ``sqrt`` → ``alpha·sqrt(k)``.
    Folders written earlier with ``use_rslora`` still load (:func:`mlora_export.adapter.peft_scaling`).
    """
    return scale(k, scaling, alpha) * k, False
