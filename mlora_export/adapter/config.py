"""``matryoshka_config.json``: the nested adapter's own settings (docs/design.md §2), validated on load."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError, InvalidAdapterError, RankError
from ..method import (
    Method,
    check_alpha,
    Scaling,
    check_method,
    check_rank_weights,
    check_scaling,
    check_train_ranks,
    lora_diagonal,
    matryoshka_diagonal,
    scale,
)
from ..provenance import created_by
from ..validate import is_finite_real, is_int
from .files import CONFIG_NAME, NESTED_FORMAT

logger = logging.getLogger(__name__)

REQUIRED_FIELDS = ("format", "method", "max_rank", "train_ranks", "scaling", "alpha")


@dataclass(frozen=True)
class MatryoshkaConfig:
    """The contents of ``matryoshka_config.json`` (required fields plus kept optional ones).

    ``extra`` holds every other field found on disk (``base_model``, ``created_by``, evaluation
    results…) so that a load/save round trip keeps them. ``rank_weights`` (``nested-loss`` only)
    are the weights over ``train_ranks`` of the per-example rank assignment, normalised to sum 1;
    ``None`` is uniform. Every field has a default but ``train_ranks``; ``max_rank`` defaults to
    the largest of them: ``MatryoshkaConfig(train_ranks=(1, 2, 4, 8, 16))`` is a nested-loss
    adapter of rank 16 with ``s(k) = 1/sqrt(k)``.
    """

    method: Method = "nested-loss"
    max_rank: int = None  # type: ignore[assignment]  # None: the largest train rank, set in __post_init__
    train_ranks: tuple[int, ...] = ()
    scaling: Scaling = "sqrt"
    alpha: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)
    rank_weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        check_method(self.method)
        if self.max_rank is None:  # the largest train rank, as `mlora-export train` defaults it
            ranks = [k for k in self.train_ranks if is_int(k)]
            if not ranks:
                raise RankError("give the train ranks (train_ranks=(1, 2, 4, 8), say); max_rank defaults to the largest", option="ranks")
            object.__setattr__(self, "max_rank", max(ranks))
        check_scaling(self.scaling)
        object.__setattr__(self, "train_ranks", check_train_ranks(self.train_ranks, self.max_rank))
        object.__setattr__(self, "alpha", check_alpha(self.alpha))
        if self.rank_weights is not None and self.method != "nested-loss":
            raise ConfigError(f"rank weights apply to method 'nested-loss' only, not {self.method!r}")
        object.__setattr__(self, "rank_weights", check_rank_weights(self.rank_weights, self.train_ranks))

    @property
    def p(self) -> list[float] | None:
        """The fixed training diagonal (``None`` for ``dylora``, whose diagonal is sampled per step)."""
        if self.method == "matryoshka":
            return matryoshka_diagonal(self.max_rank, self.train_ranks, self.scaling, self.alpha)
        if self.method == "lora":
            return lora_diagonal(self.max_rank, self.scaling, self.alpha)
        return None

    def scale(self, k: int) -> float:
        """``s(k)`` for this adapter's scaling and alpha."""
        return scale(k, self.scaling, self.alpha)

    @property
    def base_model(self) -> str | None:
        value = self.extra.get("base_model")
        return str(value) if value is not None else None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: required fields, ``p`` recomputed, then the kept optional fields."""
        out: dict[str, Any] = {
            "format": NESTED_FORMAT,
            "method": self.method,
            "max_rank": self.max_rank,
            "train_ranks": list(self.train_ranks),
            "scaling": self.scaling,
            "alpha": self.alpha,
        }
        if self.p is not None:
            out["p"] = self.p
        if self.rank_weights is not None:
            out["rank_weights"] = list(self.rank_weights)
        for k, v in self.extra.items():
            if k not in out and k not in ("p", "format", "rank_weights"):
                out[k] = v
        out.setdefault("created_by", created_by())
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = CONFIG_NAME) -> "MatryoshkaConfig":
        """Validate a parsed ``matryoshka_config.json``; raise :class:`InvalidAdapterError` naming ``source``."""
        if not isinstance(data, Mapping):
            raise InvalidAdapterError(f"{source}: expected a JSON object, found {type(data).__name__}")
        missing = [k for k in REQUIRED_FIELDS if k not in data]
        if missing:
            raise InvalidAdapterError(f"{source}: missing required field(s) {', '.join(missing)} (see docs/design.md §2)")
        if data["format"] != NESTED_FORMAT:
            raise InvalidAdapterError(f"{source}: format is {data['format']!r}, expected {NESTED_FORMAT!r}")
        max_rank, train_ranks = data["max_rank"], data["train_ranks"]
        if not is_int(max_rank):
            raise InvalidAdapterError(f"{source}: max_rank must be an integer, found {max_rank!r}")
        if not isinstance(train_ranks, list):
            raise InvalidAdapterError(f"{source}: train_ranks must be a list of integers, found {train_ranks!r}")
        extra = {k: v for k, v in data.items() if k not in REQUIRED_FIELDS and k not in ("p", "rank_weights")}
        weights = data.get("rank_weights")
        if weights is not None and not isinstance(weights, list):
            raise InvalidAdapterError(f"{source}: rank_weights must be a list of numbers, found {weights!r}")
        try:
            cfg = cls(
                method=data["method"],
                max_rank=max_rank,
                train_ranks=tuple(train_ranks),
                scaling=data["scaling"],
                alpha=data["alpha"],
                extra=extra,
                rank_weights=tuple(weights) if weights is not None else None,
            )
        except (ConfigError, RankError) as e:
            raise InvalidAdapterError(f"{source}: {e}") from e
        stored_p = data.get("p")
        if stored_p is not None and cfg.method in ("matryoshka", "lora") and (not isinstance(stored_p, list) or len(stored_p) != max_rank):
            # cheap, before the recomputation below, which costs O(max_rank · |T|)
            raise InvalidAdapterError(f"{source}: stored p must be a list of max_rank = {max_rank} numbers; remove 'p' or fix it")
        if stored_p is not None:
            expected = cfg.p
            if expected is None:
                logger.warning("%s: ignoring stored p for method %r (its diagonal is sampled per step)", source, cfg.method)
            elif (
                not isinstance(stored_p, list)
                or len(stored_p) != len(expected)
                or not all(is_finite_real(a) and math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9) for a, b in zip(stored_p, expected))
            ):
                raise InvalidAdapterError(
                    f"{source}: stored p does not match the value recomputed from method, max_rank, train_ranks, "
                    f"scaling and alpha ({expected[:8]}{'…' if len(expected) > 8 else ''}); the file was edited or "
                    "written by another tool: remove 'p' or fix the other fields"
                )
        return cfg


#: Key of ``matryoshka_config.json`` under which ``eval --record`` stores results (one entry per metric).
EVALUATION_KEY = "evaluation"


@dataclass(frozen=True)
class RecordedEvaluation:
    """One metric's entry of the ``evaluation`` section ``eval --record`` writes: the score at
    each evaluated rank, and whether higher is better (``None``: not recorded)."""

    metric: str
    higher_is_better: bool | None
    scores: dict[int, float]


def recorded_evaluations(evaluation: Any, source: str) -> dict[str, RecordedEvaluation]:
    """The ``evaluation`` section of a ``matryoshka_config.json``, typed: ``{}`` when absent.

    Every entry must be an object whose ``ranks`` is a list of ``{"rank": positive integer,
    "score": finite number}`` with each rank once, and whose ``higher_is_better`` is ``true``,
    ``false`` or absent/null (``"false"`` is not false).

    Raises:
        InvalidAdapterError: naming ``source``, the metric and what is wrong.
    """
    if evaluation is None:
        return {}
    if not isinstance(evaluation, Mapping):
        raise InvalidAdapterError(f"{source}: {EVALUATION_KEY} must be an object of recorded evaluations, found {type(evaluation).__name__}; re-record it with eval")
    out: dict[str, RecordedEvaluation] = {}
    for metric, entry in evaluation.items():
        where = f"{source}: {EVALUATION_KEY}[{str(metric)[:40]!r}]"
        if not isinstance(entry, Mapping):
            raise InvalidAdapterError(f"{where} must be an object, found {type(entry).__name__}; re-record it with eval")
        higher = entry.get("higher_is_better")
        if higher is not None and not isinstance(higher, bool):
            raise InvalidAdapterError(f"{where}: higher_is_better must be true or false, found {str(higher)[:40]!r}; fix the file")
        points = entry.get("ranks", [])
        if not isinstance(points, list):
            raise InvalidAdapterError(f"{where}: ranks must be a list of {{rank, score}}, found {type(points).__name__}; re-record it with eval")
        scores: dict[int, float] = {}
        for point in points:
            if not (isinstance(point, Mapping) and is_int(point.get("rank")) and point["rank"] >= 1 and is_finite_real(point.get("score"))):
                raise InvalidAdapterError(f"{where}: rank entry {str(point)[:80]} needs rank (a positive integer) and score (a finite number)")
            if point["rank"] in scores:
                raise InvalidAdapterError(f"{where}: rank {point['rank']} is recorded twice; re-record it with eval")
            scores[point["rank"]] = float(point["score"])
        out[str(metric)] = RecordedEvaluation(str(metric), higher, scores)
    return out

