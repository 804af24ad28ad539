"""``mlora-export demo``: the whole pipeline on a built-in default, as a list of stages.

The demo builds a tiny Llama-style causal LM from a config (no download), trains a MatryoshkaLoRA
nested adapter on a small task shipped with the package (:mod:`mlora_export.data`), slices it into
PEFT adapters and prints the held-out loss at every rank.

It is a list of :class:`Stage` objects run in order on one shared :class:`DemoContext`. To add a
stage (merge, ONNX, bundle…), write a function ``my_stage(ctx: DemoContext) -> StageReport`` (in
your own module if you like) and add one line to :data:`STAGES`, either with the function itself
or with a lazy ``"package.module:function"`` reference so that importing this module stays cheap::

    Stage("merge", "merge rank 8 into the base", "mlora_export.converters.merge:demo_stage"),

A stage writes under ``ctx.root`` (a temporary sibling of the output folder until the demo
finishes; the finished folder appears at once), reads what earlier stages left in
``ctx.results[stage_name]``, and returns a :class:`StageReport` (lines and/or a table to print,
``data`` for ``--json`` and later stages). ``ctx.quick`` asks for a shortened run (tests).
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .fs import atomic_output_dir, check_output_path
from .threads import torch_threads

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
        """The tiny base model (a transformers model folder, safetensors) with its tokenizer."""
        return self.root / "base"

    @property
    def nested_dir(self) -> Path:
        """The trained nested adapter (DESIGN.md §2)."""
        return self.root / "nested"

    @property
    def slices_dir(self) -> Path:
        """One PEFT slice per rank in ``slice_ranks``: ``slices/r{k}``."""
        return self.root / "slices"

    @property
    def train_path(self) -> Path:
        """The training JSONL file (shipped with the package)."""
        from .data import builtin_dataset_path

        return builtin_dataset_path("train")

    @property
    def eval_path(self) -> Path:
        """The held-out JSONL file (shipped with the package)."""
        from .data import builtin_dataset_path

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


# -- the stages ---------------------------------------------------------------------------


def stage_base(ctx: DemoContext) -> StageReport:
    """Build the tiny base model and its character tokenizer into ``ctx.base_dir``."""
    from .tiny import build_tiny_model

    info = build_tiny_model(ctx.base_dir, seed=ctx.seed)
    return StageReport(
        lines=[f"tiny Llama-style causal LM: {info['params']:,} parameters, vocabulary {info['vocab_size']} characters -> {ctx.output / 'base'}"],
        data=info,
    )


def stage_train(ctx: DemoContext) -> StageReport:
    """Train a matryoshka nested adapter over ``ctx.train_ranks`` into ``ctx.nested_dir``."""
    from .finetune import train

    settings = demo_train_settings(ctx)

    def progress(done: int, total: int) -> None:
        ctx.report_progress("training", done, total)

    # Record the base's final path: ctx.base_dir lies in the temporary folder renamed at the end.
    res = train(ctx.base_dir, ctx.train_path, ctx.nested_dir, settings, progress=progress,
                base_model_name=str((ctx.output / "base").resolve()))
    return StageReport(
        lines=[
            f"matryoshka adapter, max rank {max(ctx.train_ranks)}, train ranks {list(ctx.train_ranks)}: "
            f"{res.steps} steps in {res.seconds:.1f} s -> {ctx.output / 'nested'}"
        ],
        data=res.to_dict(),
    )


def stage_slice(ctx: DemoContext) -> StageReport:
    """Cut plain PEFT LoRA adapters at ``ctx.slice_ranks`` into ``ctx.slices_dir``."""
    from .converters.slice import slice_adapter

    results = slice_adapter(ctx.nested_dir, ctx.slice_ranks, ctx.slices_dir)
    return StageReport(
        lines=["PEFT slices: " + ", ".join(f"r{r.rank} ({r.params:,} params)" for r in results) + f" -> {ctx.output / 'slices'}"],
        data={"slices": [{"rank": r.rank, "path": f"slices/r{r.rank}", "params": r.params, "bytes": r.bytes} for r in results]},
    )


def stage_evaluate(ctx: DemoContext) -> StageReport:
    """Held-out loss at rank 0 (the base) and every train rank, switching ranks in place on one
    model; each slice is also loaded with plain ``PeftModel.from_pretrained`` and scored."""
    from peft import PeftModel

    from .adapter import NestedAdapter
    from .base_model import load_base_model, load_tokenizer
    from .data import load_dataset
    from .finetune import heldout_loss
    from .training import _quiet_peft, load_nested_adapter

    tokenizer = load_tokenizer(ctx.base_dir)
    features = load_dataset(ctx.eval_path, tokenizer, demo_train_settings(ctx).max_length)
    if ctx.quick:
        features = features[:64]
    adapter = NestedAdapter.load(ctx.nested_dir)
    nested = load_nested_adapter(load_base_model(ctx.base_dir), adapter)
    slice_losses: dict[int, float] = {}
    for k in ctx.slice_ranks:
        with _quiet_peft():
            peft_model = PeftModel.from_pretrained(load_base_model(ctx.base_dir), str(ctx.slices_dir / f"r{k}"))
        slice_losses[k] = heldout_loss(peft_model, features, tokenizer.pad_token_id)
    table = []
    ranks = (0, *adapter.config.train_ranks)
    for i, k in enumerate(ranks):
        nested.set_rank(k)
        loss = heldout_loss(nested.model, features, tokenizer.pad_token_id)
        table.append({"rank": k, "params": adapter.params_at(k) if k else 0, "loss": loss, "slice_loss": slice_losses.get(k)})
        ctx.report_progress("evaluating", i + 1, len(ranks))
    headers = ["rank", "adapter params", "held-out loss", "PEFT slice loss"]
    rows = [[t["rank"], f"{t['params']:,}" if t["rank"] else "0 (base)", f"{t['loss']:.4f}",
             "" if t["slice_loss"] is None else f"{t['slice_loss']:.4f}"] for t in table]
    losses = [t["loss"] for t in table]
    lines = [f"held-out set: {len(features)} examples of the built-in task ({ctx.eval_path.name}), loss per completion token"]
    if all(math.isfinite(x) for x in losses):
        if all(x < losses[0] for x in losses[1:]):
            lines.append("every trained rank beats the base (rank 0); one training run, every rank usable")
        else:
            lines.append("warning: some trained ranks do not beat the base (rank 0)")
    return StageReport(lines=lines, headers=headers, rows=rows, data={"ranks": table, "eval_examples": len(features)})


#: The demo, in order. Add a stage with one line (see the module docstring).
STAGES: list[Stage] = [
    Stage("base", "build a tiny base model", stage_base),
    Stage("train", "train a nested adapter", stage_train),
    Stage("slice", "slice it into PEFT adapters", stage_slice),
    Stage("evaluate", "held-out loss per rank", stage_evaluate),
    Stage("merge", "merge the largest sliced rank into the base", "mlora_export.converters.merge:demo_stage"),
    Stage("onnx", "export to ONNX with the rank as an input, verify in ONNX Runtime", "mlora_export.converters.onnx.export:demo_stage"),
    Stage("bundle", "write a Hub variant bundle (local, no network)", "mlora_export.converters.hub.bundle:demo_stage"),
]


def demo_train_settings(ctx: DemoContext) -> Any:
    """The :class:`~mlora_export.finetune.TrainSettings` of the demo (shorter with ``ctx.quick``)."""
    from .finetune import TrainSettings

    return TrainSettings(
        method="matryoshka",
        train_ranks=ctx.train_ranks,
        scaling="sqrt",
        alpha=1.0,
        epochs=None,
        max_steps=20 if ctx.quick else 600,
        lr=3e-3,
        batch_size=32,
        seed=ctx.seed,
        max_length=48,
    )


def run_demo(
    output: str | os.PathLike[str],
    *,
    quick: bool = False,
    force: bool = False,
    seed: int = 0,
    stages: Sequence[Stage] | None = None,
    progress: StageProgress | None = None,
    on_stage: Callable[[Stage, StageReport], None] | None = None,
) -> DemoResult:
    """Run ``stages`` (default :data:`STAGES`) in order into ``output``; return every report.

    The output folder is written as a temporary sibling and appears only when every stage has
    succeeded. ``on_stage(stage, report)`` is called as each stage finishes (the CLI prints there).

    Raises:
        OutputExistsError: ``output`` exists and ``force`` is false.
        MloraError: whatever a stage raises.
    """
    check_output_path(output, force)
    chosen = list(STAGES if stages is None else stages)
    reports: list[tuple[Stage, StageReport]] = []
    # The demo's matrices are tiny (64 wide): more threads cannot speed them up.
    with torch_threads(1), atomic_output_dir(output, force) as tmp:
        ctx = DemoContext(output=Path(output), root=tmp, quick=quick, seed=seed, progress=progress)
        for stage in chosen:
            fn = stage.resolve()
            logger.info("demo stage %s: %s", stage.name, stage.title)
            t0 = time.perf_counter()
            report = fn(ctx) or StageReport()
            report.seconds = time.perf_counter() - t0
            ctx.results[stage.name] = report.data
            reports.append((stage, report))
            if on_stage is not None:
                on_stage(stage, report)
    return DemoResult(Path(output), reports)


__all__ = ["DemoContext", "DemoResult", "Stage", "StageReport", "STAGES", "run_demo", "demo_train_settings"]
