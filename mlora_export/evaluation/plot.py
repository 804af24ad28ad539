"""The rank curve plot: metric vs rank on a log2 axis, one curve per adapter (``rank_curve.png``).

Uses matplotlib's Agg canvas directly (no pyplot, no display, no global backend switch).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_METRIC_LABELS = {"loss": "loss (lower is better)", "accuracy": "token accuracy", "exact-match": "exact-match accuracy"}


def plot_rank_curves(results: Mapping[str, Any], path: str | os.PathLike[str], *, title: str | None = None) -> Path:
    """Draw ``results`` (the ``results.json`` dict of :mod:`mlora_export.evaluation`) to a PNG at ``path``.

    Each entry of ``results["adapters"]`` is one curve (label with AURAC v2 in the legend); a
    ``results["base"]`` score is drawn as a dashed horizontal line. Curves with one point are markers.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, NullLocator

    metric = str(results.get("metric", "score"))
    fig = Figure(figsize=(7.0, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    all_ranks: set[int] = set()
    for curve in results.get("adapters", []):
        pts = sorted(curve.get("ranks", []), key=lambda p: p["rank"])
        if not pts:
            continue
        xs = [p["rank"] for p in pts]
        ys = [p["score"] for p in pts]
        all_ranks.update(xs)
        au = curve.get("aurac") or {}
        label = str(curve.get("label", "adapter"))
        if "v2" in au:
            label += f" (AURAC v2 {au['v2']:.3g})"
        ax.plot(xs, ys, marker="o", linewidth=1.6, markersize=5, label=label)
    base = results.get("base")
    if base:
        ax.axhline(base["score"], color="gray", linestyle="--", linewidth=1, label=f"base model ({base['score']:.3g})")
    ax.set_xscale("log", base=2)
    if all_ranks:
        ticks = sorted(all_ranks)
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([str(t) for t in ticks])
        lo, hi = min(ticks), max(ticks)
        ax.set_xlim(lo / 1.3, hi * 1.3)
    ax.set_xlabel("rank (log2 scale)")
    ax.set_ylabel(_METRIC_LABELS.get(metric, metric))
    ax.set_title(title or f"{metric} vs rank")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, format="png")
    logger.debug("wrote %s", out)
    return out


__all__ = ["plot_rank_curves"]
