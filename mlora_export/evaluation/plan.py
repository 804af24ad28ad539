"""Which curves and ranks an evaluation covers: nested adapters, single-rank adapters, collection folders."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..adapter import PEFT_CONFIG_NAME, NestedAdapter
from ..errors import (
    ConfigError,
    InvalidAdapterError,
    RankError,
)
from ..validate import is_int
from .scoring import RankScore

logger = logging.getLogger(__name__)

SINGLE_RANK_LABEL = "single-rank adapters"


# -- what to evaluate --------------------------------------------------------------------------
@dataclass
class Curve:
    """One curve of the plot: one multi-rank adapter at several ranks, or several single-rank adapters."""

    label: str
    path: str
    kind: str  # "adapter" | "collection" | "single-rank adapters"
    method: str
    max_rank: int
    members: list[tuple[NestedAdapter, tuple[int, ...]]]
    points: list[RankScore] = field(default_factory=list)
    aurac: dict[str, float] = field(default_factory=dict)
    #: with lm-eval tasks: AURAC of every metric by name (``None`` where a rank has no finite value)
    aurac_by_metric: dict[str, dict[str, float] | None] = field(default_factory=dict)

    @property
    def recordable(self) -> bool:
        """True when this curve is one nested adapter folder (whose ``matryoshka_config.json`` can carry results)."""
        return self.kind == "adapter" and self.members[0][0].is_nested

    @property
    def ranks(self) -> list[int]:
        return [k for _, ks in self.members for k in ks]

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "path": self.path,
            "kind": self.kind,
            "method": self.method,
            "max_rank": self.max_rank,
            "ranks": [p.to_dict() for p in self.points],
            "aurac": self.aurac,
            **({"aurac_by_metric": self.aurac_by_metric} if self.aurac_by_metric else {}),
        }


def _is_adapter_dir(p: Path) -> bool:
    return (p / PEFT_CONFIG_NAME).is_file()


def _ranks_for(adapter: NestedAdapter, ranks: Sequence[int] | str) -> tuple[int, ...]:
    if len(adapter.config.train_ranks) == 1:
        return (adapter.max_rank,)
    if isinstance(ranks, str):
        if ranks != "all":
            raise RankError(f"ranks must be a list of integers or 'all', got {ranks!r}")
        return tuple(adapter.config.train_ranks)
    fit = tuple(k for k in sorted(set(ranks)) if k <= adapter.max_rank)
    skipped = sorted(set(ranks) - set(fit))
    if skipped:
        logger.warning("adapter %s has max rank %d: skipping rank(s) %s", adapter.path, adapter.max_rank, skipped)
    if not fit:
        raise RankError(
            f"none of the ranks {sorted(set(ranks))} fits adapter {str(adapter.path)!r} (max rank {adapter.max_rank}); "
            f"give ranks up to {adapter.max_rank}, or 'all' for its train ranks {list(adapter.config.train_ranks)}"
        )
    for k in fit:
        adapter.check_rank(k)
    return fit


def _check_distinct(members: list[NestedAdapter], where: str) -> None:
    seen: dict[int, Path] = {}
    for a in members:
        if a.max_rank in seen:
            raise RankError(
                f"{where} holds two adapters of rank {a.max_rank} ({str(seen[a.max_rank])!r} and {str(a.path)!r}); "
                "one curve needs one adapter per rank: put them in separate collection folders"
            )
        seen[a.max_rank] = a.path


def plan_curves(adapters: Sequence[str | os.PathLike[str]], ranks: Sequence[int] | str = "all") -> list[Curve]:
    """Validate every adapter path and decide which ranks each is evaluated at (no model is loaded).

    Raises:
        InvalidAdapterError: a path is not an adapter folder nor a folder of adapter folders.
        RankError: no requested rank fits an adapter, a requested rank is above the max rank of every
            multi-rank adapter given, or one curve has two adapters of one rank.
    """
    if not adapters:
        raise ConfigError("no adapter given: pass at least one adapter folder")
    if not isinstance(ranks, str):
        bad = [k for k in ranks if not is_int(k) or k < 1]
        if bad or not ranks:
            raise RankError(f"ranks must be positive integers, got {list(ranks)}")
    curves: list[Curve] = []
    singles: list[NestedAdapter] = []
    for raw in adapters:
        p = Path(raw)
        if p.is_dir() and not _is_adapter_dir(p) and not (p / "adapter_model.safetensors").exists():
            subs = sorted(d for d in p.iterdir() if d.is_dir() and _is_adapter_dir(d))
            if not subs:
                raise InvalidAdapterError(
                    f"{str(p)!r} is neither an adapter folder (no {PEFT_CONFIG_NAME}) nor a folder of adapter folders; "
                    "pass a nested adapter, a PEFT LoRA adapter, or a folder such as the output of 'mlora-export slice'"
                )
            members = sorted((NestedAdapter.load(d) for d in subs), key=lambda a: a.max_rank)
            _check_distinct(members, f"collection {str(p)!r}")
            methods = sorted({a.config.method for a in members})
            curves.append(Curve(p.name or str(p), str(p), "collection", "+".join(methods), members[-1].max_rank,
                                [(a, (a.max_rank,)) for a in members]))
            continue
        adapter = NestedAdapter.load(p)
        if len(adapter.config.train_ranks) == 1:
            singles.append(adapter)
            continue
        curves.append(Curve(p.name or str(p), str(p), "adapter", adapter.config.method, adapter.max_rank,
                            [(adapter, _ranks_for(adapter, ranks))]))
    if len(singles) == 1:
        a = singles[0]
        curves.append(Curve(a.path.name or str(a.path), str(a.path), "adapter", a.config.method, a.max_rank, [(a, (a.max_rank,))]))
    elif singles:
        singles.sort(key=lambda a: a.max_rank)
        _check_distinct(singles, "the single-rank adapters given")
        curves.append(Curve(SINGLE_RANK_LABEL, ", ".join(str(a.path) for a in singles), SINGLE_RANK_LABEL,
                            "+".join(sorted({a.config.method for a in singles})), singles[-1].max_rank,
                            [(a, (a.max_rank,)) for a in singles]))
    multi = [a for c in curves if c.kind == "adapter" for a, _ in c.members if len(a.config.train_ranks) > 1]
    if multi and not isinstance(ranks, str):
        top = max(a.max_rank for a in multi)
        above = sorted(k for k in set(ranks) if k > top)
        if above:
            raise RankError(f"rank{'s' if len(above) > 1 else ''} {', '.join(map(str, above))} above the max rank of every adapter given "
                            f"({top}): give ranks in [1, {top}] (rank 0, the base model, is scored with with_base)", option="ranks")
    labels: dict[str, int] = {}
    for c in curves:  # unique labels for the table and the plot legend
        n = labels.get(c.label, 0)
        labels[c.label] = n + 1
        if n:
            c.label = f"{c.label} ({n + 1})"
    return curves


