"""Type checks for values that come from users, files or JSON: one definition each.

``bool`` is a subclass of ``int`` in Python, so ``True`` passes ``isinstance(x, int)``; a rank,
a count or a seed of ``True`` is a mistake, so these helpers refuse it. Pure functions, no I/O.
"""

from __future__ import annotations

import math
from typing import Any


def is_int(value: Any) -> bool:
    """True for an ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """True for an ``int`` or ``float`` that is not a ``bool`` (finite or not: check that apart)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite_real(value: Any) -> bool:
    """:func:`is_real` and finite (no NaN, no infinity)."""
    return is_real(value) and math.isfinite(value)


__all__ = ["is_finite_real", "is_int", "is_real"]
