"""Choosing a bundle's rank by a budget: size, parameters, latency, and the recorded score.

The limits on cost (``max_bytes``, ``max_params``, ``max_latency_ms``) keep the ranks that fit;
a demand on quality (``min_score``, or ``within`` points of the best recorded score) then takes
the *smallest* rank that meets it; with no demand on quality the *largest* rank that fits is
taken. The choice comes with the reason, in words, so that a user sees why a rank was picked.

Sizes are those the manifest lists (a rank's ``bytes`` is what its listed files add up to, each
file's size checked on download; its ``params`` is checked against the downloaded tensors).
Scores are those the bundle's manifest records from ``mlora-export eval --record``, checked
against the evaluation recorded in the bundle's own ``matryoshka_config.json``. A metric is
``loss``, ``accuracy``, ``exact-match`` or an lm-eval task metric (``gsm8k:exact_match``, see
:mod:`mlora_export.metric_names`). For fractions (``accuracy``, ``exact-match``, lm-eval's
``acc``, ``acc_norm``, ``exact_match``…: :func:`~mlora_export.metric_names.is_fraction`),
``min_score`` and ``within`` are in percent (``within=2``: at most 2 percentage points below the
best); otherwise in the metric's own units, e.g. for ``loss`` (lower is better) ``within=0.05``:
at most 0.05 above the lowest.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ...adapter.config import RecordedEvaluation
from ...errors import ConfigError, InvalidAdapterError, RankError
from ...metric_names import OWN_FRACTION_METRICS, is_fraction
from ...params import param
from ...validate import ascii_int, is_finite_real, is_int
from .bundle import BundleRank

#: Our own metrics whose recorded scores are fractions, shown and compared in percent (lm-eval's: :func:`is_fraction`).
PERCENT_METRICS = OWN_FRACTION_METRICS


@dataclass(frozen=True)
class RankBudget:
    """What the chosen rank must satisfy (``None``: no limit)."""

    max_bytes: int | None = param(None, flag="--max-bytes", hint="see --max-bytes / --max-params",
                                  help="With --rank auto: the download size limit (e.g. 50MB, 1GiB).")
    max_params: int | None = param(None, flag="--max-params", min=1, help="With --rank auto: the parameter count limit.")
    max_latency_ms: float | None = param(
        None, flag="--max-latency-ms", min=0, min_open=True,
        help="With --rank auto: the per-forward latency limit, as the bundle recorded it (bundle --measure-latency).")
    min_score: float | None = param(
        None, flag="--min-score",
        help="With --rank auto: the smallest rank whose recorded score reaches this (percent for accuracy, exact-match "
             "and lm-eval's acc, acc_norm, exact_match, f1).")
    within: float | None = param(None, flag="--within", min=0,
                                 help="With --rank auto: the smallest rank within this many points of the best recorded score.")
    metric: str | None = param(None, flag="--metric",
                               help="The recorded evaluation --min-score/--within judge by: loss, accuracy, exact-match, or an lm-eval "
                                    "task metric task:metric[:filter] such as gsm8k:exact_match (default: the first recorded).")

    def check(self) -> "RankBudget":
        """Raise :class:`ConfigError` for a limit that is not a positive number, or for both quality demands at once."""
        for name in ("max_bytes", "max_params"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or value < 1):
                raise ConfigError(f"{name.replace('_', ' ')} must be a positive integer, got {value!r}", option=name)
        if self.max_latency_ms is not None and (not is_finite_real(self.max_latency_ms) or self.max_latency_ms <= 0):
            raise ConfigError(f"max latency must be a positive number of milliseconds, got {self.max_latency_ms!r}", option="max_latency_ms")
        for name in ("min_score", "within"):
            value = getattr(self, name)
            if value is not None and (not is_finite_real(value) or (name == "within" and value < 0)):
                raise ConfigError(f"{name.replace('_', ' ')} must be a finite{' non-negative' if name == 'within' else ''} number, got {value!r}", option=name)
        if self.min_score is not None and self.within is not None:
            raise ConfigError("give a minimum score or a distance from the best score, not both", option="min_score")
        return self

    @property
    def empty(self) -> bool:
        return all(v is None for v in (self.max_bytes, self.max_params, self.max_latency_ms, self.min_score, self.within))


@dataclass(frozen=True)
class RankChoice:
    """The chosen rank and why it was chosen."""

    rank: BundleRank
    reason: str


def _pick_metric(evaluation: Mapping[str, Any], wanted: str | None) -> tuple[str, bool]:
    """``(metric, higher_is_better)`` of the recorded evaluation to judge scores by."""
    recorded = [m for m, e in evaluation.items() if isinstance(e, Mapping)]
    if not recorded:
        raise ConfigError("the bundle records no evaluation, so no rank can be chosen by score; "
                          "record one with eval's record option and rebuild the bundle", option="min_score")
    if wanted is not None and wanted not in recorded:
        raise ConfigError(f"the bundle records no {wanted!r} evaluation; it has {', '.join(recorded)}", option="metric")
    metric = wanted or recorded[0]
    higher = evaluation[metric].get("higher_is_better")
    return metric, higher if isinstance(higher, bool) else metric != "loss"


def _unit(metric: str) -> tuple[float, str]:
    """Factor from a recorded score to the unit of ``min_score``/``within``, and that unit's name."""
    return (100.0, " points") if is_fraction(metric) else (1.0, "")


def _fmt(metric: str, score: float) -> str:
    return f"{score * 100:.1f}%" if is_fraction(metric) else f"{score:.4g}"


def check_recorded_scores(ranks: Sequence[BundleRank], metric: str, higher: bool, recorded: Mapping[str, RecordedEvaluation], source: str) -> None:
    """The manifest's ``metric`` scores must be the ones the adapter's own recorded evaluation holds
    for the bundle's ranks (and its direction the same): a manifest whose scores were edited, or
    that copies another evaluation, would choose a rank by numbers nothing measured.

    Raises:
        InvalidAdapterError: a rank whose score differs from (or is missing in) the recorded
            evaluation, or another ``higher_is_better``; naming ``source``.
    """
    rec = recorded.get(metric)
    if rec is None:
        raise InvalidAdapterError(f"{source}: the manifest scores {metric} but the bundle's adapter records no {metric} evaluation; the bundle is broken")
    if (rec.higher_is_better if rec.higher_is_better is not None else metric != "loss") != higher:
        raise InvalidAdapterError(f"{source}: the manifest and the adapter's recorded {metric} evaluation disagree on whether higher is better; the bundle is broken")
    for r in ranks:
        listed, measured = r.metrics.get(metric), rec.scores.get(r.rank)
        if listed != measured:
            raise InvalidAdapterError(
                f"{source}: rank {r.rank} is listed with {metric} {listed!r} but the adapter's recorded evaluation has "
                f"{measured!r} at that rank; the evaluation does not match the bundle's ranks, the bundle is broken")


def choose_rank_by_budget(
    ranks: Sequence[BundleRank], budget: RankBudget, manifest: Mapping[str, Any],
    recorded: Mapping[str, RecordedEvaluation] | None = None, source: str = "manifest.json",
) -> RankChoice:
    """The bundle rank that ``budget`` selects (see the module docstring), with the reason.

    ``recorded`` (the evaluations of the bundle's ``matryoshka_config.json``): when given, the
    scores a choice by score relies on are checked against it (:func:`check_recorded_scores`).

    Raises:
        ConfigError: an invalid budget, a latency limit for a bundle that records no latency, or
            a score demand for a bundle that records no evaluation (or not the metric named).
        RankError: no rank fits the limits, or none that fits meets the score.
        InvalidAdapterError: the manifest's scores disagree with the recorded evaluation.
    """
    budget.check()
    if budget.empty:
        raise ConfigError("choosing a rank automatically needs a limit (bytes, parameters, latency) or a score to reach", option="budget")
    fits, within = _fits_by_cost(ranks, budget, manifest)
    if budget.min_score is None and budget.within is None:
        chosen = fits[-1]
        return RankChoice(chosen, f"rank {chosen.rank}: the largest rank {within}")
    return _smallest_by_score(ranks, fits, within, budget, manifest, recorded, source)


def _fits_by_cost(ranks: Sequence[BundleRank], budget: RankBudget, manifest: Mapping[str, Any]) -> tuple[list[BundleRank], str]:
    """``(fits, within)``: the ranks that fit the budget's limits on cost (size, parameters, latency),
    smallest first, and those limits in words.

    Raises:
        ConfigError: a latency limit for a bundle that records no latency.
        RankError: no rank fits.
    """
    latency = manifest.get("latency") if isinstance(manifest.get("latency"), Mapping) else None
    ms: dict[int, float] = {}
    if budget.max_latency_ms is not None:
        if latency is None or not isinstance(latency.get("ms"), Mapping):
            raise ConfigError("the bundle records no per-rank latency; rebuild it with an ONNX export and latency measurement", option="max_latency_ms")
        ms = {k: float(v) for key, v in latency["ms"].items() if (k := ascii_int(key)) is not None and is_finite_real(v)}

    fits: list[BundleRank] = []
    limits: list[str] = []
    for r in sorted(ranks, key=lambda r: r.rank):
        if budget.max_bytes is not None and r.bytes > budget.max_bytes:
            continue
        if budget.max_params is not None and r.params > budget.max_params:
            continue
        if budget.max_latency_ms is not None and (r.rank not in ms or ms[r.rank] > budget.max_latency_ms):
            continue
        fits.append(r)
    if budget.max_bytes is not None:
        limits.append(f"{budget.max_bytes:,} bytes")
    if budget.max_params is not None:
        limits.append(f"{budget.max_params:,} parameters")
    if budget.max_latency_ms is not None:
        machine = (latency or {}).get("machine")
        cpu = machine.get("cpu") if isinstance(machine, Mapping) else None
        limits.append(f"{budget.max_latency_ms:g} ms per forward (as measured on {cpu if isinstance(cpu, str) and cpu else 'the bundling machine'})")
    if not fits:
        smallest = min(ranks, key=lambda r: r.rank) if ranks else None
        detail = ""
        if smallest is not None:
            detail = f"; the smallest, rank {smallest.rank}, has {smallest.bytes:,} bytes, {smallest.params:,} parameters"
            if smallest.rank in ms:
                detail += f", {ms[smallest.rank]:.3g} ms"
        raise RankError(f"no rank fits {' and '.join(limits)}{detail}; raise the limit",
                        option="max_latency_ms" if budget.max_latency_ms is not None else "max_bytes")
    return fits, f"within {' and '.join(limits)}" if limits else "with no limit on cost"


def _smallest_by_score(
    ranks: Sequence[BundleRank], fits: list[BundleRank], within: str, budget: RankBudget, manifest: Mapping[str, Any],
    recorded: Mapping[str, RecordedEvaluation] | None, source: str,
) -> RankChoice:
    """The smallest of ``fits`` whose recorded score meets the budget's ``min_score`` or ``within``.

    Raises:
        ConfigError: the bundle records no evaluation (or not the metric named), or no score of it.
        RankError: no rank that fits meets the score.
        InvalidAdapterError: the manifest's scores disagree with ``recorded``.
    """
    evaluation: Mapping[str, Any] = manifest["evaluation"] if isinstance(manifest.get("evaluation"), Mapping) else {}
    metric, higher = _pick_metric(evaluation, budget.metric)
    if recorded is not None:
        check_recorded_scores(ranks, metric, higher, recorded, source)
    scores = {r.rank: r.metrics[metric] for r in ranks if metric in r.metrics and is_finite_real(r.metrics[metric])}
    if not scores:
        raise ConfigError(f"the bundle's ranks record no {metric} score; rebuild it from an adapter with a recorded evaluation", option="metric")
    factor, unit = _unit(metric)
    best_rank = max(scores, key=lambda k: (scores[k] if higher else -scores[k], -k))  # the best score; ties: the smaller rank
    best = scores[best_rank]
    if budget.min_score is not None:
        threshold = budget.min_score / factor
        goal = f"{metric} {'≥' if higher else '≤'} {_fmt(metric, threshold)}"
    else:
        margin = float(budget.within) / factor  # type: ignore[arg-type]
        threshold = best - margin if higher else best + margin
        goal = f"{metric} within {budget.within:g}{unit} of the best ({_fmt(metric, best)} at rank {best_rank})"

    def meets(k: int) -> bool:
        s = scores.get(k)
        return s is not None and (s >= threshold - 1e-12 if higher else s <= threshold + 1e-12)

    good = [r for r in fits if meets(r.rank)]
    if not good:
        shown = ", ".join(f"r{r.rank} {_fmt(metric, scores[r.rank])}" for r in fits if r.rank in scores) or "none scored"
        raise RankError(f"no rank {within} reaches {goal} (recorded: {shown}); relax the score or raise the limit",
                        option="min_score" if budget.min_score is not None else "within")
    chosen = good[0]
    return RankChoice(chosen, f"rank {chosen.rank}: the smallest rank {within} with {goal} "
                              f"(it scored {_fmt(metric, scores[chosen.rank])})")
