"""Choosing a bundle's rank by a budget (``pull --rank auto``): size, parameters, latency, recorded score."""

from __future__ import annotations

import pytest

from mlora_export.converters.hub.bundle import BundleRank
from mlora_export.converters.hub.choose import RankBudget, choose_rank_by_budget
from mlora_export.errors import ConfigError, RankError

# exact match recorded per rank (fractions), bytes and params growing with the rank
RANKS = [BundleRank(k, f"r{k}", 100 * k, 1000 * k, {"exact-match": em, "loss": loss})
         for k, em, loss in ((1, 0.10, 2.0), (2, 0.40, 1.2), (4, 0.52, 0.9), (8, 0.55, 0.8), (16, 0.56, 0.79))]
MANIFEST = {
    "evaluation": {"exact-match": {"higher_is_better": True}, "loss": {"higher_is_better": False}},
    "latency": {"machine": {"cpu": "Test CPU"}, "ms": {"0": 1.0, "1": 1.1, "2": 1.2, "4": 1.5, "8": 2.0, "16": 3.0}},
}


def choose(**kw: object) -> tuple[int, str]:
    c = choose_rank_by_budget(RANKS, RankBudget(**kw), MANIFEST)  # type: ignore[arg-type]
    return c.rank.rank, c.reason


def test_cost_limits_take_the_largest_rank_that_fits() -> None:
    assert choose(max_bytes=4500)[0] == 4
    assert choose(max_params=800)[0] == 8
    k, why = choose(max_latency_ms=1.6)
    assert k == 4 and "the largest rank" in why and "1.6 ms" in why and "Test CPU" in why
    assert choose(max_bytes=20_000, max_latency_ms=2.5)[0] == 8  # every limit holds


def test_scores_take_the_smallest_rank_that_reaches_them() -> None:
    k, why = choose(min_score=50)  # percent for exact match
    assert k == 4 and "smallest rank" in why and "52.0%" in why
    assert choose(within=2)[0] == 8  # best 56%: 54% or more
    with pytest.raises(RankError, match="reaches"):  # r8 is needed, but only up to r4 fits the latency
        choose(within=2, max_latency_ms=1.6)
    # loss: lower is better, in loss units
    assert choose(within=0.15, metric="loss")[0] == 4  # lowest 0.79: 0.94 or less
    assert choose(min_score=1.0, metric="loss")[0] == 4


def test_what_the_bundle_does_not_record_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="no per-rank latency") as e:
        choose_rank_by_budget(RANKS, RankBudget(max_latency_ms=5), {"evaluation": MANIFEST["evaluation"]})
    assert e.value.option == "max_latency_ms"
    with pytest.raises(ConfigError, match="records no evaluation"):
        choose_rank_by_budget(RANKS, RankBudget(min_score=50), {})
    with pytest.raises(ConfigError, match="no 'accuracy' evaluation"):
        choose(min_score=50, metric="accuracy")
    with pytest.raises(RankError, match="no rank fits") as r:
        choose(max_bytes=10)
    assert "rank 1, has 1,000 bytes" in str(r.value)
    for bad in ({"max_bytes": 0}, {"max_latency_ms": -1.0}, {"within": -1.0}, {"min_score": float("nan")},
                {"min_score": 50, "within": 2}, {}):
        with pytest.raises(ConfigError):
            choose(**bad)
