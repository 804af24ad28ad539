"""Running an evaluation: the base loaded once, every adapter put on it and scored at its ranks."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
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
from ..fs import read_json
from ..method import aurac
from ..progress import Progress
from ..provenance import created_by
from ..validate import is_int
from .data import EvalData, load_eval_data
from .plan import Curve, plan_curves
from .scoring import RankScore, check_metric, score_model

logger = logging.getLogger(__name__)

#: The ``format`` of ``results.json`` (:meth:`EvalResult.to_dict`).
RESULTS_FORMAT = "mlora-eval/1"

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
    return value if is_int(value) and value > 0 else None


# -- evaluate ----------------------------------------------------------------------------------
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


def evaluate(
    adapters: Sequence[str | os.PathLike[str]],
    base_model: str | os.PathLike[str],
    data_path: "str | os.PathLike[str] | DataSource",
    ranks: Sequence[int] | str = "all",
    *,
    metric: str = "loss",
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    tokenizer_dir: str | os.PathLike[str] | None = None,
    dtype: str = "auto",
    device: str | None = None,
    with_base: bool = False,
    max_examples: int | None = None,
    record: bool = False,
    progress: Progress | None = None,
    chat_template: str | None = None,
    revision: str | None = None,
) -> EvalResult:
    """Evaluate every adapter at every rank on ``data_path``; per-rank scores and AURAC v1/v2 per curve.

    ``base_model`` is a local folder or a Hub model id (``revision``: its branch, tag or commit;
    :func:`~mlora_export.base.hub.resolve_base_model`); ``data_path`` a local file, a Hub dataset id
    or a :class:`~mlora_export.data.DataSource` (split ``test`` unless it names one), read by
    :func:`~.data.load_eval_data`; ``chat_template`` (Jinja text) replaces the tokenizer's template.

    All inputs are validated before the base model is loaded. The base is loaded once; each adapter
    is put on it, evaluated at its ranks by switching the rank in place, and unloaded again.
    ``with_base`` also scores the base model alone (rank 0; not part of AURAC). ``record`` stores
    each nested adapter's curve in its ``matryoshka_config.json`` (``evaluation[<metric>]``, see
    :func:`~.report.record_evaluation`); curves of other adapters are listed in ``not_recorded``.

    Raises:
        ConfigError, RankError, InvalidAdapterError, DataError, BaseModelError,
        BaseModelMismatchError: bad inputs (see the helpers above); ``record`` with no nested
            adapter folder among ``adapters`` (ConfigError).
        HubInputError, HubError: a Hub model or dataset that cannot be read.
    """
    from .report import record_entry, record_evaluation

    _check_scoring_options(metric, batch_size, max_new_tokens)
    t0 = time.perf_counter()
    curves = plan_curves(adapters, ranks)
    if record and not any(c.recordable for c in curves):
        raise ConfigError(
            "recording stores results in a nested adapter's matryoshka_config.json, but no adapter given is a nested adapter folder",
            option="record",
        )
    check_dtype(dtype)
    device = check_device(device) if device is not None else None
    base_dir = resolve_base_model(base_model, revision=revision)
    check_base_model_dir(base_dir)
    tokenizer = load_tokenizer(tokenizer_dir if tokenizer_dir is not None else base_dir, hint="save one there", option="tokenizer_dir")
    max_len = _max_positions(base_dir)
    data = load_eval_data(data_path, tokenizer, max_length=max_len, max_examples=max_examples, chat_template=chat_template)  # before loading weights
    if metric == "exact-match" and not data.generates:
        raise DataError(f"{data.source or data.path}: exact-match needs {{\"prompt\", \"completion\"}} or conversation records, the file has "
                        "{\"text\"} records; use metric loss or accuracy", option="metric")
    model = load_base_model(base_dir, dtype, device=device or _default_device())
    for c in curves:
        for a, _ in c.members:
            check_fits(a, model, base=str(base_model))
    total = sum(len(ks) for c in curves for _, ks in c.members) + int(with_base)
    score = _Scorer(tokenizer, data, {"metric": metric, "batch_size": batch_size, "max_new_tokens": max_new_tokens}, total, progress)
    base_score = score(model, 0) if with_base else None
    for c in curves:
        model = _score_curve(model, c, score)
    result = EvalResult(metric, curves, data, str(base_model), base_score, time.perf_counter() - t0)
    if record:
        for c in curves:
            if c.recordable:
                result.recorded.append(str(record_evaluation(c.path, record_entry(result, c))))
            else:
                result.not_recorded.append(c.label)
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

    def __init__(self, tokenizer: Any, data: EvalData, options: dict[str, Any], total: int, progress: Progress | None) -> None:
        self.tokenizer, self.data, self.options = tokenizer, data, options
        self.total, self.done, self.progress = total, 0, progress

    def __call__(self, model: Any, rank: int) -> RankScore:
        point = score_model(model, self.tokenizer, self.data, rank=rank, **self.options)
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
                logger.info("%s rank %d: %s = %.6g", curve.label, k, score.options["metric"], point.score)
        finally:
            handle.remove()
            model = handle.model.unload()
    curve.aurac = aurac([p.rank for p in curve.points], [p.score for p in curve.points])
    return model
