"""What an evaluation produced (:class:`EvalResult`): the curves with their per-rank scores and
AURAC, the data, the lm-eval tasks, the base; :meth:`EvalResult.to_dict` is the content of ``results.json``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..provenance import created_by
from .data import EvalData
from .lm_eval_tasks import TaskSuite
from .plan import Curve
from .scoring import RankScore

#: The ``format`` of ``results.json`` (:meth:`EvalResult.to_dict`).
RESULTS_FORMAT = "mlora-eval/1"


@dataclass
class EvalResult:
    """Everything one evaluation produced; :meth:`to_dict` is the ``results.json`` content."""

    metric: str
    curves: list[Curve]
    data: EvalData | None
    base_model: str
    base: RankScore | None = None
    seconds: float = 0.0
    #: the lm-eval tasks scored (``None``: none), with their metric names and settings
    tasks: TaskSuite | None = None
    #: ``matryoshka_config.json`` files the results were recorded in (``record=True``), and the
    #: labels of curves that could not carry them (not one nested adapter folder).
    recorded: list[str] = field(default_factory=list)
    not_recorded: list[str] = field(default_factory=list)

    @property
    def higher_is_better(self) -> bool:
        if self.tasks is not None and self.metric in self.tasks.metrics:
            return self.tasks.metrics[self.metric].higher_is_better
        return self.metric != "loss"

    def to_dict(self) -> dict[str, Any]:
        out = {
            "format": RESULTS_FORMAT,
            "metric": self.metric,
            "higher_is_better": self.higher_is_better,
            "data": self.data.describe() if self.data is not None else None,
            "base_model": self.base_model,
            "base": self.base.to_dict() if self.base else None,
            "adapters": [c.to_dict() for c in self.curves],
            "seconds": self.seconds,
            "created_by": created_by(),
        }
        if self.tasks is not None:
            out["lm_eval"] = self.tasks.describe()
        return out


__all__ = ["RESULTS_FORMAT", "EvalResult"]
