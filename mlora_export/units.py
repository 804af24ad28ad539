"""Human-readable sizes for messages and cards."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    """``n`` bytes as ``512 B``, ``1.5 KiB``, ``3.2 MiB`` or ``1.1 GiB`` (GiB is the largest unit)."""
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
