"""The progress callback the library reports through; the CLI draws it as a bar."""

from __future__ import annotations

import logging
from collections.abc import Callable

#: ``progress(done, total)``: called from the library as work completes (the unit is the caller's:
#: bytes written, steps, evaluated ranks); the CLI draws it, Python callers may pass their own.
Progress = Callable[[int, int], None]


class StepCounter:
    """Counts the named steps of a job of ``total`` steps: each call logs the step on ``log`` (with
    ``label``) and reports ``progress(done, total)``, so a job's steps are named and counted in one place."""

    def __init__(self, total: int, progress: Progress | None, log: logging.Logger, label: str) -> None:
        self.total = total
        self.done = 0
        self._progress = progress
        self._log = log
        self._label = label

    def __call__(self, what: str) -> None:
        self.done += 1
        self._log.info("%s: %s", self._label, what)
        if self._progress is not None:
            self._progress(self.done, self.total)
