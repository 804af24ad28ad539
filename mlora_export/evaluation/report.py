"""The outputs of an evaluation: ``results.json`` with the plot, and the entry ``--record`` stores in an adapter."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from ..adapter import record_in_config
from ..fs import atomic_output_dir
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

    inputs: list[Any] = [result.base_model, *([result.data.path] if result.data.path is not None else []), *(c.path for c in result.curves),
              *(m.path for c in result.curves for m, _ in c.members)]
    with atomic_output_dir(output, force, inputs) as tmp:
        write_json(tmp / RESULTS_NAME, result.to_dict(), allow_nan=True)  # a diverged model's loss is NaN: reported as such
        plot_rank_curves(result.to_dict(), tmp / PLOT_NAME)
    return Path(output)


def record_entry(result: EvalResult, curve: Curve) -> dict[str, Any]:
    """The ``evaluation[<metric>]`` entry stored in ``matryoshka_config.json`` by ``--record``."""
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


def record_results(result: EvalResult) -> None:
    """Store each curve of ``result`` in its nested adapter's ``matryoshka_config.json``
    (:func:`record_evaluation`), listing the files in ``result.recorded``; the labels of curves that
    are not one nested adapter folder go to ``result.not_recorded``.

    Raises:
        InvalidAdapterError: a recordable folder has no nested ``matryoshka_config.json`` (any more).
    """
    for c in result.curves:
        if c.recordable:
            result.recorded.append(str(record_evaluation(c.path, record_entry(result, c))))
        else:
            result.not_recorded.append(c.label)


def record_evaluation(adapter_dir: str | os.PathLike[str], entry: dict[str, Any]) -> Path:
    """Store ``entry`` under ``evaluation[<metric>]`` in the adapter's ``matryoshka_config.json``, atomically.

    Other fields, and entries for other metrics, are kept; an entry for the same metric is replaced.

    Raises:
        InvalidAdapterError: the folder has no nested ``matryoshka_config.json``.
    """
    return record_in_config(adapter_dir, RECORD_KEY, entry["metric"], entry)
