"""What an evaluation produced (:class:`EvalResult`): the curves with their per-rank scores and
AURAC, the data, the base; :meth:`EvalResult.to_dict` is the content of ``results.json``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..provenance import created_by
from .data import EvalData
from .plan import Curve
from .scoring import RankScore

#: The ``format`` of ``results.json`` (:meth:`EvalResult.to_dict`).
RESULTS_FORMAT = "mlora-eval/1"


@dataclass
class EvalResult:
    """Everything one evaluation produced; :meth:`to_dict` is the ``results.json`` content."""

    metric: str
    curves: list[Curve]
    data: EvalData
    base_model: str
    base: RankScore | None = None
    seconds: float = 0.0
    #: ``matryoshka_config.json`` files the results were recorded in (``record=True``), and the
    #: labels of curves that could not carry them (not one nested adapter folder).
    recorded: list[str] = field(default_factory=list)
    not_recorded: list[str] = field(default_factory=list)

    @property
    def higher_is_better(self) -> bool:
        return self.metric != "loss"

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": RESULTS_FORMAT,
            "metric": self.metric,
            "higher_is_better": self.higher_is_better,
            "data": self.data.describe(),
            "base_model": self.base_model,
            "base": self.base.to_dict() if self.base else None,
            "adapters": [c.to_dict() for c in self.curves],
            "seconds": self.seconds,
            "created_by": created_by(),
        }


__all__ = ["RESULTS_FORMAT", "EvalResult"]
