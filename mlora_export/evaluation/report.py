"""The outputs of an evaluation: ``results.json`` with the plot, and the entry ``--record`` stores in an adapter."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from ..adapter import record_in_config, record_many_in_config
from ..errors import ConfigError
from ..fs import atomic_output_dir
from ..metric_names import TASKS_MEAN
from ..io.jsonio import write_json
from ..provenance import created_by
from .plan import Curve
from .result import EvalResult

logger = logging.getLogger(__name__)

RESULTS_NAME = "results.json"
PLOT_NAME = "rank_curve.png"
#: Key under which ``--record`` stores results in ``matryoshka_config.json``.
RECORD_KEY = "evaluation"


# -- output ------------------------------------------------------------------------------------
def write_results(result: EvalResult, output: str | os.PathLike[str], *, force: bool = False) -> Path:
    """Write ``results.json`` and ``rank_curve.png`` into the folder ``output``, atomically.

    Raises:
        OutputPathError: ``output`` is, holds or lies inside an evaluated adapter, the base model
            or the data file.
        OutputExistsError: ``output`` exists and ``force`` is false.
    """
    from .plot import plot_rank_curves

    data_path = result.data.path if result.data is not None else None
    inputs: list[Any] = [result.base_model, *([data_path] if data_path is not None else []), *(c.path for c in result.curves),
              *(m.path for c in result.curves for m, _ in c.members)]
    with atomic_output_dir(output, force, inputs) as tmp:
        write_json(tmp / RESULTS_NAME, result.to_dict(), allow_nan=True)  # a diverged model's loss is NaN: reported as such
        plot_rank_curves(result.to_dict(), tmp / PLOT_NAME)
    return Path(output)


def record_entry(result: EvalResult, curve: Curve) -> dict[str, Any]:
    """The ``evaluation[<metric>]`` entry stored in ``matryoshka_config.json`` by ``--record``, for the data file's metric.

    Raises:
        ConfigError: the evaluation had no data file (its metrics are lm-eval's: :func:`record_entries`).
    """
    if result.data is None:
        raise ConfigError("this evaluation scored no data file; its lm-eval metrics are recorded with record_entries", option="record")
    return {
        "metric": result.metric,
        "higher_is_better": result.higher_is_better,
        "data": result.data.name or (result.data.path.name if result.data.path is not None else result.data.source),
        "data_sha256": result.data.sha256,
        "examples": len(result.data.examples),
        "base_model": result.base_model,
        "ranks": [{"rank": p.rank, "score": p.score} for p in curve.points],
        "aurac": dict(curve.aurac),
        "base_score": result.base.score if result.base else None,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "created_by": created_by(),
    }


def task_record_entries(result: EvalResult, curve: Curve) -> list[dict[str, Any]]:
    """One ``evaluation[<task metric>]`` entry per lm-eval metric of ``curve`` that has a finite value at every rank.

    The entry has the fields of :func:`record_entry`; ``data`` names the task (``lm-eval <task>``)
    and ``lm_eval`` holds lm-eval's own metric key, version and settings.
    """
    suite = result.tasks
    if suite is None:
        return []
    out = []
    for name, m in suite.metrics.items():
        values = [(p.tasks or {}).get(name, {}).get("value") for p in curve.points]
        if not curve.points or any(v is None for v in values):
            logger.warning("%s: not recording %s, which has no finite value at some rank", curve.label, name)
            continue
        base = (result.base.tasks or {}).get(name, {}).get("value") if result.base is not None else None
        out.append({
            "metric": name,
            "higher_is_better": m.higher_is_better,
            "data": f"lm-eval {m.task}" if name != TASKS_MEAN else f"lm-eval mean of {', '.join(suite.headlines)}",
            "data_sha256": None,
            "examples": suite.examples(name),
            "base_model": result.base_model,
            "ranks": [{"rank": p.rank, "score": v} for p, v in zip(curve.points, values)],
            "aurac": curve.aurac_by_metric.get(name) or {},
            "base_score": base,
            "lm_eval": {"metric": m.key or None, "version": suite.version, "num_fewshot": suite.spec.num_fewshot,
                        "limit": suite.spec.limit, "apply_chat_template": suite.spec.apply_chat_template},
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "created_by": created_by(),
        })
    return out


def record_entries(result: EvalResult, curve: Curve) -> list[dict[str, Any]]:
    """Every entry ``--record`` stores for ``curve``: the data file's metric (when a file was scored) and the lm-eval metrics."""
    return ([record_entry(result, curve)] if result.data is not None else []) + task_record_entries(result, curve)


def record_evaluations(adapter_dir: str | os.PathLike[str], entries: list[dict[str, Any]]) -> Path:
    """Store each of ``entries`` under ``evaluation[<its metric>]`` in the adapter's ``matryoshka_config.json``,
    in one atomic rewrite (see :func:`record_evaluation`).

    Raises:
        InvalidAdapterError: the folder has no nested ``matryoshka_config.json``.
    """
    return record_many_in_config(adapter_dir, RECORD_KEY, {e["metric"]: e for e in entries})


def record_results(result: EvalResult) -> None:
    """Store each curve of ``result`` in its nested adapter's ``matryoshka_config.json``
    (:func:`record_entries`, :func:`record_evaluations`), listing the files in ``result.recorded``; the labels of curves that
    are not one nested adapter folder go to ``result.not_recorded``.

    Raises:
        InvalidAdapterError: a recordable folder has no nested ``matryoshka_config.json`` (any more).
    """
    for c in result.curves:
        if c.recordable:
            result.recorded.append(str(record_evaluations(c.path, record_entries(result, c))))
        else:
            result.not_recorded.append(c.label)


def record_evaluation(adapter_dir: str | os.PathLike[str], entry: dict[str, Any]) -> Path:
    """Store ``entry`` under ``evaluation[<metric>]`` in the adapter's ``matryoshka_config.json``, atomically.

    Other fields, and entries for other metrics, are kept; an entry for the same metric is replaced.

    Raises:
        InvalidAdapterError: the folder has no nested ``matryoshka_config.json``.
    """
    return record_in_config(adapter_dir, RECORD_KEY, entry["metric"], entry)
