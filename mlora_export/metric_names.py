"""Names of evaluation metrics, shared by ``eval`` (results, ``--record``) and the rank choice of ``pull``.

Two kinds of names:

- our own metrics on a data file: ``loss``, ``accuracy`` (next-token), ``exact-match``;
- lm-evaluation-harness task metrics: ``<task>:<metric>`` or ``<task>:<metric>:<filter>``, plus
  :data:`TASKS_MEAN`. lm-eval reports each metric under a filter (its key is ``metric,filter``,
  e.g. ``exact_match,strict-match``; a task without filters reports under ``none``). The name of
  a metric under the **first** filter the task reports (lm-eval's order: the task's
  ``filter_list``, or ``none``) is ``<task>:<metric>``; under any other filter it is
  ``<task>:<metric>:<filter>``. So ``gsm8k:exact_match`` is GSM8K's strict-match score (the
  number papers report) and ``gsm8k:exact_match:flexible-extract`` the other one;
  ``arc_easy:acc`` and ``arc_easy:acc_norm`` are ARC-Easy's two metrics.

Scores that are fractions (shown and compared in percent by ``pull --min-score/--within``) are
``accuracy``, ``exact-match``, the lm-eval metrics in :data:`LM_EVAL_FRACTION_METRICS` and
:data:`TASKS_MEAN`; every other score is compared in its own units.
"""

from __future__ import annotations

import re

#: Our own metrics whose scores are fractions.
OWN_FRACTION_METRICS: tuple[str, ...] = ("accuracy", "exact-match")
#: lm-eval metrics whose values are fractions in [0, 1] (the accuracy-like ones).
LM_EVAL_FRACTION_METRICS: frozenset[str] = frozenset({"acc", "acc_norm", "acc_mutual_info", "exact_match", "f1"})
#: The mean over the requested tasks of each task's headline score (see :mod:`mlora_export.evaluation.lm_eval_tasks`).
TASKS_MEAN = "tasks:mean"

# task, metric and filter names: anything but ':' and white space
_PART = r"[^:\s]+"
_TASK_METRIC = re.compile(rf"({_PART}):({_PART})(?::({_PART}))?")


def task_metric_name(task: str, metric: str, filter_name: str | None = None) -> str:
    """``<task>:<metric>`` or, with ``filter_name``, ``<task>:<metric>:<filter>``."""
    return f"{task}:{metric}" if filter_name is None else f"{task}:{metric}:{filter_name}"


def parse_task_metric(name: str) -> tuple[str, str, str | None] | None:
    """``(task, metric, filter or None)`` of a task metric name; ``None`` for any other string."""
    m = _TASK_METRIC.fullmatch(name)
    return (m.group(1), m.group(2), m.group(3)) if m else None


def is_task_metric(name: str) -> bool:
    """Whether ``name`` has the form of an lm-eval task metric name (``<task>:<metric>[:<filter>]``)."""
    return parse_task_metric(name) is not None


def is_fraction(name: str) -> bool:
    """Whether the scores of metric ``name`` are fractions (compared in percent)."""
    if name in OWN_FRACTION_METRICS or name == TASKS_MEAN:
        return True
    parsed = parse_task_metric(name)
    return parsed is not None and parsed[1] in LM_EVAL_FRACTION_METRICS


__all__ = [
    "LM_EVAL_FRACTION_METRICS", "OWN_FRACTION_METRICS", "TASKS_MEAN", "is_fraction", "is_task_metric", "parse_task_metric",
    "task_metric_name",
]
