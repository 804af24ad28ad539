"""The rank curve plot: metric vs rank on a log2 axis, one curve per adapter (``rank_curve.png``).

One panel per plotted metric: the evaluation's metric alone for a data file; with lm-eval tasks,
the data file's metric (when one was scored), each task's headline metric and the mean over tasks
(at most :data:`MAX_PANELS`; ``results.json`` has every metric). Uses matplotlib's Agg canvas
directly (no pyplot, no display, no global backend switch).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_METRIC_LABELS = {"loss": "loss (lower is better)", "accuracy": "token accuracy", "exact-match": "exact-match accuracy"}
#: The most panels drawn in one figure.
MAX_PANELS = 9

Getter = Callable[[Mapping[str, Any]], "float | None"]


def _score(point: Mapping[str, Any]) -> float | None:
    return point.get("score")


def _task_value(name: str) -> Getter:
    def get(point: Mapping[str, Any]) -> float | None:
        return ((point.get("tasks") or {}).get(name) or {}).get("value")

    return get


def _panels(results: Mapping[str, Any]) -> list[tuple[str, Getter, str | None]]:
    """``(metric, value of a point, key of its AURAC in aurac_by_metric or None for "aurac")`` per panel."""
    metric = str(results.get("metric", "score"))
    lm = results.get("lm_eval")
    if not isinstance(lm, Mapping):
        return [(metric, _score, None)]
    panels: list[tuple[str, Getter, str | None]] = [(metric, _score, None)] if results.get("data") is not None else []
    names = list(lm.get("headlines") or []) + [n for n in (lm.get("metrics") or {}) if n == "tasks:mean"]
    panels += [(n, _task_value(n), n) for n in names]
    if len(panels) > MAX_PANELS:
        logger.info("plotting the first %d of %d metrics; results.json has all", MAX_PANELS, len(panels))
    return panels[:MAX_PANELS] or [(metric, _score, None)]


def _finite(y: Any) -> bool:
    return isinstance(y, (int, float)) and not isinstance(y, bool) and math.isfinite(y)


def plot_rank_curves(results: Mapping[str, Any], path: str | os.PathLike[str], *, title: str | None = None) -> Path:
    """Draw ``results`` (the ``results.json`` dict of :mod:`mlora_export.evaluation`) to a PNG at ``path``.

    Each entry of ``results["adapters"]`` is one curve per panel (label with AURAC v2 in the
    legend); a ``results["base"]`` score is drawn as a dashed horizontal line. Curves with one point are markers.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = _panels(results)
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    size = (7.0, 4.5) if len(panels) == 1 else (5.2 * cols, 3.9 * rows)
    fig = Figure(figsize=size, dpi=110)
    FigureCanvasAgg(fig)
    for i, (metric, get, aurac_key) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        _draw(ax, results, metric, get, aurac_key, title if len(panels) == 1 else None)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, format="png")
    logger.debug("wrote %s", out)
    return out


def _draw(ax: Any, results: Mapping[str, Any], metric: str, get: Getter, aurac_key: str | None, title: str | None) -> None:
    """One panel: every adapter's curve of ``metric`` and the base line."""
    all_ranks: set[int] = set()
    for curve in results.get("adapters", []):
        pts = [(p["rank"], get(p)) for p in sorted(curve.get("ranks", []), key=lambda p: p["rank"])]
        pts = [(k, y) for k, y in pts if _finite(y)]
        if not pts:
            continue
        xs = [k for k, _ in pts]
        ys = [y for _, y in pts]
        all_ranks.update(xs)
        au = (curve.get("aurac") if aurac_key is None else (curve.get("aurac_by_metric") or {}).get(aurac_key)) or {}
        label = str(curve.get("label", "adapter"))
        if _finite(au.get("v2")):
            label += f" (AURAC v2 {au['v2']:.3g})"
        ax.plot(xs, ys, marker="o", linewidth=1.6, markersize=5, label=label)
    base = results.get("base")
    if base and _finite(get(base)):
        ax.axhline(get(base), color="gray", linestyle="--", linewidth=1, label=f"base model ({get(base):.3g})")
    rank_axis(ax, sorted(all_ranks))
    if all_ranks:
        ax.set_xlim(min(all_ranks) / 1.3, max(all_ranks) * 1.3)
    ax.set_ylabel(_METRIC_LABELS.get(metric, metric))
    ax.set_title(title or f"{metric} vs rank")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def rank_axis(ax: Any, ranks: list[int]) -> None:
    """Make ``ax``'s x axis the rank axis of every rank plot: log2 scale, a tick and label at each of
    ``ranks`` (none between them), titled "rank (log2 scale)"."""
    from matplotlib.ticker import FixedLocator, NullLocator

    ax.set_xscale("log", base=2)
    if ranks:
        ax.xaxis.set_major_locator(FixedLocator(ranks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([str(k) for k in ranks])
    ax.set_xlabel("rank (log2 scale)")


__all__ = ["MAX_PANELS", "plot_rank_curves", "rank_axis"]
