"""The demo's shared state (:class:`DemoContext`), its stages (:class:`Stage`) and what they report."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .builtin import BUILTIN_TASK

logger = logging.getLogger(__name__)

#: ``progress(description, done, total)``: called by long stages, drawn by the CLI.
StageProgress = Callable[[str, int, int], None]

DEMO_TRAIN_RANKS: tuple[int, ...] = (1, 2, 4, 8, 16)
DEMO_SLICE_RANKS: tuple[int, ...] = (2, 8)


def _resolve(ref: str, what: str) -> Callable[..., Any]:
    """The function named by a lazy ``"package.module:function"`` reference."""
    module, _, attr = ref.partition(":")
    if not module or not attr:
        raise ConfigError(f"{what}: reference {ref!r} is not 'package.module:function'")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class DemoModel:
    """What differs between the demo's base models: the same stages run on each.

    ``prepare`` (``ctx -> StageReport``) puts the base model in place and says what it is (the ``base``
    stage); ``settings`` (``(ctx, method) -> TrainSettings``) gives a run's training settings;
    ``task`` names the data shipped in ``data/`` (:func:`~.builtin.builtin_dataset_path`);
    ``skip`` names stages that do not run on this model, each with the reason shown in their place.
    Both functions are lazy ``"package.module:function"`` references (importing stays cheap).
    """

    name: str
    description: str
    prepare: str
    settings: str
    task: str
    skip: tuple[tuple[str, str], ...] = ()
    eval_batch_size: int = 64
    #: held-out examples scored with ``quick`` (all of them otherwise)
    quick_eval_examples: int = 64
    #: torch threads while the demo runs (``None``: torch's own default, every core)
    threads: int | None = 1

    def prepare_base(self, ctx: "DemoContext") -> "StageReport":
        return _resolve(self.prepare, f"demo model {self.name!r}")(ctx)

    def train_settings(self, ctx: "DemoContext", method: str) -> Any:
        return _resolve(self.settings, f"demo model {self.name!r}")(ctx, method)

    def skipped(self, stage: str) -> str | None:
        """Why ``stage`` does not run on this model, or ``None`` when it runs."""
        return dict(self.skip).get(stage)


#: The demo's base models by name (``mlora-export demo --model``).
DEMO_MODELS: dict[str, DemoModel] = {
    "builtin": DemoModel(  # its matrices are 128 wide: more threads than one cannot speed them up
        "builtin", "the pre-trained 0.56 M-parameter model shipped with the package, on a task it half knows",
        "mlora_export.demo.stages:prepare_builtin_base", "mlora_export.demo.stages:demo_train_settings", BUILTIN_TASK,
    ),
    "smollm2": DemoModel(
        "smollm2", "SmolLM2-135M-Instruct (mlora_export.base.packaged), on the capitals of countries through its chat template",
        "mlora_export.demo.real_model:prepare_smollm2", "mlora_export.demo.real_model:smollm2_train_settings", "capitals",
        skip=(
            ("onnx", "the ONNX export of a 135 M-parameter model takes minutes and its verifier is being reworked for deep "
                     "models; run `mlora-export onnx` on the outputs yourself"),
            ("genai", "it needs the ONNX export (skipped above)"),
        ),
        eval_batch_size=32,
        quick_eval_examples=8,
        threads=None,
    ),
}


def demo_model(name: str) -> DemoModel:
    """The demo model called ``name``.

    Raises:
        ConfigError: no such demo model.
    """
    model = DEMO_MODELS.get(name)
    if model is None:
        raise ConfigError(f"unknown demo model {name!r}: expected one of {', '.join(DEMO_MODELS)}", option="model")
    return model


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
    model: DemoModel = field(default_factory=lambda: DEMO_MODELS["builtin"])
    #: set by the ``base`` stage when the base stays where it is (a cached real model) instead of ``root / "base"``
    external_base: Path | None = None

    @property
    def base_dir(self) -> Path:
        """The base model (a transformers model folder, safetensors) with its tokenizer: ``root / "base"``
        (a copy of the package's pre-trained one), or :attr:`external_base`."""
        return self.external_base if self.external_base is not None else self.root / "base"

    @property
    def base_id(self) -> str:
        """What the adapters record as their base: the folder the user will find the base in."""
        return str(self.external_base if self.external_base is not None else (self.output / "base").resolve())

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
        """The training JSONL file of the demo model's task (shipped with the package)."""
        from .builtin import builtin_dataset_path

        return builtin_dataset_path("train", self.model.task)

    @property
    def eval_path(self) -> Path:
        """The held-out JSONL file of the demo model's task (shipped with the package)."""
        from .builtin import builtin_dataset_path

        return builtin_dataset_path("eval", self.model.task)

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
        return _resolve(self.run, f"demo stage {self.name!r}")


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


