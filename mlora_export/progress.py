"""The progress callback the library reports through; the CLI draws it as a bar."""

from __future__ import annotations

from collections.abc import Callable

#: ``progress(done, total)``: called from the library as work completes (the unit is the caller's:
#: bytes written, steps, evaluated ranks); the CLI draws it, Python callers may pass their own.
Progress = Callable[[int, int], None]
