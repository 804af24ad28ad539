"""Unit tests of docs/design.md §1 on hand-computed values."""

from __future__ import annotations

import math

import pytest

from mlora_export.errors import ConfigError, RankError
from mlora_export.method import (
    aurac,
    check_train_ranks,
    dylora_diagonal,
    lora_diagonal,
    matryoshka_diagonal,
    peft_alpha_for,
    scale,
    training_diagonal,
)


@pytest.mark.parametrize(
    ("k", "scaling", "alpha", "expected"),
    [(4, "none", 1.0, 1.0), (4, "none", 2.5, 2.5), (4, "rank", 1.0, 0.25), (8, "rank", 16.0, 2.0),
     (4, "sqrt", 1.0, 0.5), (16, "sqrt", 2.0, 0.5), (1, "sqrt", 1.0, 1.0)],
)
def test_scale_values(k: int, scaling: str, alpha: float, expected: float) -> None:
    assert scale(k, scaling, alpha) == pytest.approx(expected)


def test_scale_rejects_bad_input() -> None:
    with pytest.raises(RankError, match="positive integer"):
        scale(0)
    with pytest.raises(RankError):
        scale(2.0)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unknown scaling 'log'"):
        scale(2, "log")


def test_p_matches_issue_example() -> None:
    # r = 32, T = {1,2,4,8,16,32}, scaling none: [6,5,4,4,3,3,3,3, 2 x8, 1 x16]
    p = matryoshka_diagonal(32, [1, 2, 4, 8, 16, 32], "none")
    assert p == [6, 5, 4, 4, 3, 3, 3, 3] + [2] * 8 + [1] * 16


def test_p_sqrt_and_rank_by_hand() -> None:
    p = matryoshka_diagonal(4, [1, 2, 4], "sqrt", 1.0)
    s1, s2, s4 = 1.0, 1 / math.sqrt(2), 0.5
    assert p == pytest.approx([s1 + s2 + s4, s2 + s4, s4, s4])
    p = matryoshka_diagonal(4, [2, 4], "rank", 2.0)
    assert p == pytest.approx([1.0 + 0.5, 1.5, 0.5, 0.5])


def test_baseline_diagonals() -> None:
    assert lora_diagonal(4, "sqrt") == [0.5] * 4
    assert dylora_diagonal(8, 2, "rank", 1.0) == [0.5, 0.5] + [0.0] * 6
    assert training_diagonal("lora", 4, [1, 2, 4], "none", 3.0) == [3.0] * 4
    assert training_diagonal("dylora", 4, [1, 2, 4], "sqrt", sampled_rank=4) == [0.5] * 4
    with pytest.raises(ConfigError, match="sampled rank"):
        training_diagonal("dylora", 4, [1, 2, 4])
    with pytest.raises(RankError, match="not one of the train ranks"):
        training_diagonal("dylora", 4, [1, 2, 4], sampled_rank=3)
    with pytest.raises(ConfigError, match="unknown method"):
        training_diagonal("adalora", 4, [4])


@pytest.mark.parametrize(
    ("ranks", "r", "match"),
    [([], 8, "empty"), ([1, 2, 4], 8, "not among the train ranks"), ([0, 8], 8, "outside"),
     ([1, 16], 8, "outside"), ([2, 2, 8], 8, "duplicates"), ([1.5, 8], 8, "not an integer")],
)
def test_train_ranks_rejected(ranks: list, r: int, match: str) -> None:
    with pytest.raises(RankError, match=match):
        check_train_ranks(ranks, r)


def test_train_ranks_sorted() -> None:
    assert check_train_ranks([8, 1, 4], 8) == (1, 4, 8)


def test_aurac_hand_computed() -> None:
    # ranks 1,2,4 with accuracies 0.2, 0.4, 0.8
    # v1: trapezoids over k: (1*(0.2+0.4)/2 + 2*(0.4+0.8)/2) / 3 = (0.3 + 1.2) / 3 = 0.5
    # v2: over log2 k = 0,1,2: (0.3 + 0.6) / 2 = 0.45
    out = aurac([1, 2, 4], [0.2, 0.4, 0.8])
    assert out["v1"] == pytest.approx(0.5)
    assert out["v2"] == pytest.approx(0.45)


def test_aurac_one_rank_and_errors() -> None:
    assert aurac([8], [0.7]) == {"v1": 0.7, "v2": 0.7}
    with pytest.raises(RankError, match="strictly increasing"):
        aurac([4, 2], [0.1, 0.2])
    with pytest.raises(RankError, match="2 ranks but 1 scores"):
        aurac([1, 2], [0.1])
    with pytest.raises(RankError, match="at least one"):
        aurac([], [])


def test_peft_alpha_for_reproduces_scale() -> None:
    for scaling in ("none", "rank", "sqrt"):
        for k in (1, 3, 8):
            lora_alpha, rslora = peft_alpha_for(k, scaling, 2.0)
            peft = lora_alpha / math.sqrt(k) if rslora else lora_alpha / k
            assert peft == pytest.approx(scale(k, scaling, 2.0))


def test_aurac_accepts_numpy_integer_ranks() -> None:
    import numpy as np

    from mlora_export.method import aurac

    assert aurac(np.array([1, 2, 4]), [0.2, 0.4, 0.8]) == aurac([1, 2, 4], [0.2, 0.4, 0.8])
