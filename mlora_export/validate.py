"""Type checks for values that come from users, files or JSON: one definition each.

``bool`` is a subclass of ``int`` in Python, so ``True`` passes ``isinstance(x, int)``; a rank,
a count or a seed of ``True`` is a mistake, so these helpers refuse it. JSON integers have no
size limit (``10**400`` parses), so "finite" here means "a finite ``float`` once converted":
the helpers never raise on any JSON value. Text that should hold a number is read as ASCII
digits only (``str.isdigit`` and ``int`` also accept ``"²"``, ``"٨"`` and ``"1_0"``). Pure
functions, no I/O.
"""

from __future__ import annotations

import math
import re
from typing import Any

#: Longest run of digits read as an integer from text (any count or rank fits; ``int()`` of a
#: longer one is slow and meaningless).
MAX_INT_DIGITS = 18
_ASCII_INT = re.compile(r"[0-9]+")


def is_int(value: Any) -> bool:
    """True for an ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """True for an ``int`` or ``float`` that is not a ``bool`` (finite or not: check that apart)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite_real(value: Any) -> bool:
    """:func:`is_real` and a finite ``float`` once converted: no NaN, no infinity, and no
    integer too large for a ``float`` (``10**400``); never raises."""
    if not is_real(value):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def is_bool(value: Any) -> bool:
    """True for ``True`` or ``False`` only (``"false"``, ``0`` and ``None`` are not booleans)."""
    return isinstance(value, bool)


def ascii_int(text: Any) -> int | None:
    """The non-negative integer that ``text`` spells in ASCII digits (``"08"`` → 8), else ``None``.

    Only ``0-9``: no sign, spaces, underscores, superscripts or other scripts' digits, and at
    most :data:`MAX_INT_DIGITS` of them. Never raises.
    """
    if not isinstance(text, str) or len(text) > MAX_INT_DIGITS or not _ASCII_INT.fullmatch(text):
        return None
    return int(text)


__all__ = ["MAX_INT_DIGITS", "ascii_int", "is_bool", "is_finite_real", "is_int", "is_real"]
