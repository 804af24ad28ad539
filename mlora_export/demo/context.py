"""The demo's shared state (:class:`DemoContext`), its stages (:class:`Stage`) and what they report."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError

logger = logging.getLogger(__name__)

#: ``progress(description, done, total)``: called by long stages, drawn by the CLI.
StageProgress = Callable[[str, int, int], None]

DEMO_TRAIN_RANKS: tuple[int, ...] = (1, 2, 4, 8, 16)
DEMO_SLICE_RANKS: tuple[int, ...] = (2, 8)


@dataclass
class DemoContext:
    """Shared state of one demo run: where things are and what earlier stages found.

    Paths are under ``root``, the folder being written (it becomes ``output`` when the demo ends).
    """

    output: Path
    root: Path
    quick: bool = False
    seed: int = 0
    train_ranks: tuple[int, ...] = DEMO_TRAIN_RANKS
    slice_ranks: tuple[int, ...] = DEMO_SLICE_RANKS
    results: dict[str, Any] = field(default_factory=dict)
    progress: StageProgress | None = None

    @property
    def base_dir(self) -> Path:
        """The base model (a transformers model folder, safetensors) with its tokenizer: a copy of the package's pre-trained one."""
        return self.root / "base"

    @property
    def nested_dir(self) -> Path:
        """The trained nested adapter (docs/design.md §2)."""
        return self.root / "nested"

    @property
    def lora_dir(self) -> Path:
        """One plain LoRA adapter at the max rank, trained with the same settings."""
        return self.root / "lora"

    @property
    def renested_dir(self) -> Path:
        """``lora_dir`` re-nested by SVD (method ``svd``)."""
        return self.root / "renested"

    @property
    def slices_dir(self) -> Path:
        """One PEFT slice per rank in ``slice_ranks``: ``slices/r{k}``."""
        return self.root / "slices"

    @property
    def train_path(self) -> Path:
        """The training JSONL file (shipped with the package)."""
        from .builtin import builtin_dataset_path

        return builtin_dataset_path("train")

    @property
    def eval_path(self) -> Path:
        """The held-out JSONL file (shipped with the package)."""
        from .builtin import builtin_dataset_path

        return builtin_dataset_path("eval")

    def report_progress(self, desc: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(desc, done, total)


@dataclass
class StageReport:
    """What a stage shows: free lines, an optional table, and data for ``--json``/later stages."""

    lines: list[str] = field(default_factory=list)
    headers: list[str] | None = None
    rows: list[list[Any]] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass(frozen=True)
class Stage:
    """One step of the demo: ``run(ctx)`` does the work and returns what to print.

    ``run`` is a callable or a lazy ``"package.module:function"`` reference.
    """

    name: str
    title: str
    run: Callable[[DemoContext], StageReport | None] | str

    def resolve(self) -> Callable[[DemoContext], StageReport | None]:
        if callable(self.run):
            return self.run
        module, _, attr = self.run.partition(":")
        if not module or not attr:
            raise ConfigError(f"demo stage {self.name!r}: reference {self.run!r} is not 'package.module:function'")
        return getattr(importlib.import_module(module), attr)


@dataclass
class DemoResult:
    """The finished demo: its folder and each stage's report, in order."""

    output: Path
    reports: list[tuple[Stage, StageReport]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": str(self.output),
            "stages": [
                {"name": st.name, "title": st.title, "seconds": rep.seconds, "lines": rep.lines,
                 "headers": rep.headers, "rows": rep.rows, "data": rep.data}
                for st, rep in self.reports
            ],
        }


