"""Running an evaluation: the base loaded once, every adapter put on it and scored at its ranks."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..base import (
    check_base_model_dir,
    resolve_base_model,
    check_device,
    check_dtype,
    check_fits,
    load_base_model,
    load_tokenizer,
)
from ..data import DataSource
from ..errors import (
    BaseModelError,
    ConfigError,
    DataError,
)
from ..io.jsonio import read_json
from ..method import aurac
from ..params import merge_legacy
from ..progress import Progress
from ..validate import is_int
from .data import EvalData, load_eval_data
from .lm_eval_tasks import TaskSuite, metric_aurac
from .options import EvalOptions
from .plan import Curve, plan_curves
from .report import record_results
from .result import EvalResult
from .scoring import RankScore, check_metric, score_model

logger = logging.getLogger(__name__)

# -- the base model ----------------------------------------------------------------------------
def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _max_positions(base_model: str | os.PathLike[str]) -> int | None:
    try:
        cfg = read_json(Path(base_model) / "config.json", BaseModelError, what="model config")
    except BaseModelError:
        return None  # load_base_model reports it
    if not isinstance(cfg, dict):
        return None
    value = cfg.get("max_position_embeddings") or cfg.get("n_positions")
    return value if isinstance(value, int) and is_int(value) and value > 0 else None


# -- evaluate ----------------------------------------------------------------------------------
def evaluate(
    adapters: Sequence[str | os.PathLike[str]],
    base_model: str | os.PathLike[str],
    data_path: "str | os.PathLike[str] | DataSource | None",
    ranks: Sequence[int] | str = "all",
    options: EvalOptions | None = None,
    *,
    progress: Progress | None = None,
    **legacy: Any,
) -> EvalResult:
    """Evaluate every adapter at every rank on ``data_path``; per-rank scores and AURAC v1/v2 per curve.

    ``base_model`` is a local folder or a Hub model id (``options.revision``: its branch, tag or commit;
    :func:`~mlora_export.base.hub.resolve_base_model`); ``data_path`` a local file, a Hub dataset id
    or a :class:`~mlora_export.data.DataSource` (split ``test`` unless it names one), read by
    :func:`~.data.load_eval_data`; ``options`` (:class:`~.options.EvalOptions`) say how to score;
    ``options.chat_template`` (Jinja text) replaces the tokenizer's template. The options passed as
    keywords of this function (``metric="accuracy"``…) still work for one release, with a
    ``DeprecationWarning``.
    ``options.lm_eval`` (:class:`~.lm_eval_tasks.LmEvalTasks`) also (or, with ``data_path=None``,
    only) scores each rank on lm-evaluation-harness tasks: ``metric`` is then the first task's
    headline metric when there is no data file, every task metric gets its AURAC
    (``aurac_by_metric`` of each curve) and ``record`` stores each of them.

    All inputs are validated before the base model is loaded. The base is loaded once; each adapter
    is put on it, evaluated at its ranks by switching the rank in place, and unloaded again.
    ``with_base`` also scores the base model alone (rank 0; not part of AURAC). ``record`` stores
    each nested adapter's curve in its ``matryoshka_config.json`` (``evaluation[<metric>]``, see
    :func:`~.report.record_results`); curves of other adapters are listed in ``not_recorded``.

    Raises:
        ConfigError, RankError, InvalidAdapterError, DataError, BaseModelError,
        BaseModelMismatchError: bad inputs (see the helpers above); ``record`` with no nested
            adapter folder among ``adapters`` (ConfigError).
        HubInputError, HubError: a Hub model or dataset that cannot be read.
        MissingExtraError: ``lm_eval`` given but lm-eval is not installed.
    """
    opts = merge_legacy(options, EvalOptions, legacy, "evaluate")
    _check_scoring_options(opts.metric, opts.batch_size, opts.max_new_tokens)
    if data_path is None and opts.lm_eval is None:
        raise ConfigError("nothing to evaluate on: give a data file, lm-eval tasks, or both", option="data")
    if opts.lm_eval is not None:
        opts.lm_eval.check()
    t0 = time.perf_counter()
    curves = plan_curves(adapters, ranks)
    if opts.record and not any(c.recordable for c in curves):
        raise ConfigError(
            "recording stores results in a nested adapter's matryoshka_config.json, but no adapter given is a nested adapter folder",
            option="record",
        )
    check_dtype(opts.dtype)
    device = check_device(opts.device) if opts.device is not None else None
    base_dir = resolve_base_model(base_model, revision=opts.revision)
    check_base_model_dir(base_dir)
    tokenizer_dir = opts.tokenizer_dir if opts.tokenizer_dir is not None else base_dir
    tokenizer = load_tokenizer(tokenizer_dir, hint="save one there", option="tokenizer_dir")
    data = None if data_path is None else load_eval_data(data_path, tokenizer, max_length=_max_positions(base_dir), max_examples=opts.max_examples,
                                                         chat_template=opts.chat_template)  # before loading weights
    if opts.metric == "exact-match" and data is not None and not data.generates:
        raise DataError(f"{data.source or data.path}: exact-match needs {{\"prompt\", \"completion\"}} or conversation records, the file has "
                        "{\"text\"} records; use metric loss or accuracy", option="metric")
    suite = None if opts.lm_eval is None else TaskSuite.prepare(opts.lm_eval, tokenizer_dir, batch_size=opts.batch_size,
                                                                 chat_template=opts.chat_template)
    model = load_base_model(base_dir, opts.dtype, device=device or _default_device())
    for c in curves:
        for a, _ in c.members:
            check_fits(a, model, base=str(base_model))
    total = sum(len(ks) for c in curves for _, ks in c.members) + int(opts.with_base)
    scoring = {"metric": opts.metric, "batch_size": opts.batch_size, "max_new_tokens": opts.max_new_tokens}
    score = _Scorer(tokenizer, data, scoring, total, progress, suite)
    base_score = score(model, 0) if opts.with_base else None
    for c in curves:
        model = _score_curve(model, c, score)
        if suite is not None:
            c.aurac_by_metric = {**({opts.metric: c.aurac} if data is not None else {}),
                                 **{n: metric_aurac([p.rank for p in c.points], [(p.tasks or {}).get(n, {}).get("value") for p in c.points])
                                    for n in suite.metrics}}
    metric = opts.metric if data is not None or suite is None else suite.primary
    result = EvalResult(metric, curves, data, str(base_model), base_score, time.perf_counter() - t0, tasks=suite)
    if opts.record:
        record_results(result)
    return result


def _check_scoring_options(metric: str, batch_size: int, max_new_tokens: int | None) -> None:
    """Validate how each rank is scored.

    Raises:
        ConfigError: an unknown metric, or a batch size or generation budget that is not a positive integer.
    """
    check_metric(metric)
    if not is_int(batch_size) or batch_size < 1:
        raise ConfigError(f"batch size must be a positive integer, got {batch_size!r}")
    if max_new_tokens is not None and (not is_int(max_new_tokens) or max_new_tokens < 1):
        raise ConfigError(f"max new tokens must be a positive integer, got {max_new_tokens!r}")


class _Scorer:
    """Scores one model at one rank on the evaluation data (:func:`~.scoring.score_model`) and
    reports ``progress(done, total)`` in scored ranks."""

    def __init__(self, tokenizer: Any, data: EvalData | None, options: dict[str, Any], total: int, progress: Progress | None,
                 tasks: TaskSuite | None = None) -> None:
        self.tokenizer, self.data, self.options, self.tasks = tokenizer, data, options, tasks
        self.total, self.done, self.progress = total, 0, progress

    @property
    def metric(self) -> str:
        return self.options["metric"] if self.data is not None or self.tasks is None else self.tasks.primary

    def __call__(self, model: Any, rank: int) -> RankScore:
        t0 = time.perf_counter()
        if self.data is not None:
            point = score_model(model, self.tokenizer, self.data, rank=rank, **self.options)
        else:
            point = RankScore(rank, math.nan, None, None, None, None, None, None, 0.0)
        if self.tasks is not None:
            point.tasks = self.tasks.score(model, rank)
            if self.data is None:
                value = point.tasks[self.tasks.primary]["value"]
                point.score = math.nan if value is None else value
            point.seconds = time.perf_counter() - t0
        self.done += 1
        if self.progress:
            self.progress(self.done, self.total)
        return point


def _score_curve(model: Any, curve: Curve, score: _Scorer) -> Any:
    """Score every member of ``curve`` at its ranks, each put on ``model`` and switched in place,
    then unloaded again; fill the curve's points and AURAC. Returns the bare base model."""
    from ..training import load_nested_adapter

    for adapter, ks in curve.members:
        handle = load_nested_adapter(model, adapter)
        try:
            for k in ks:
                handle.set_rank(k)
                point = score(handle.model, k)
                point.adapter = str(adapter.path)
                curve.points.append(point)
                logger.info("%s rank %d: %s = %.6g", curve.label, k, score.metric, point.score)
        finally:
            handle.remove()
            model = handle.model.unload()
    curve.aurac = aurac([p.rank for p in curve.points], [p.score for p in curve.points])
    return model
