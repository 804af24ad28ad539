"""``mlora-export demo``: the whole pipeline on a built-in default, as a list of stages.

The demo builds a tiny Llama-style causal LM from a config (no download), trains a nested adapter
with the default method (``nested-loss``) on a small task shipped with the package
(:mod:`mlora_export.data`), trains one plain LoRA at the same rank and re-nests it by SVD, slices the
nested adapter into PEFT adapters and prints the held-out loss and exact match at every rank of both.

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
    """Train a nested adapter (the default method) over ``ctx.train_ranks`` into ``ctx.nested_dir``."""
    from .training import train

    settings = demo_train_settings(ctx)

    def progress(done: int, total: int) -> None:
        ctx.report_progress("training", done, total)

    # Record the base's final path: ctx.base_dir lies in the temporary folder renamed at the end.
    res = train(ctx.base_dir, ctx.train_path, ctx.nested_dir, settings, progress=progress,
                base_model_name=str((ctx.output / "base").resolve()))
    return StageReport(
        lines=[
            f"{res.method} adapter, max rank {max(ctx.train_ranks)}, train ranks {list(ctx.train_ranks)}: "
            f"{res.steps} steps in {res.seconds:.1f} s -> {ctx.output / 'nested'}"
        ],
        data=res.to_dict(),
    )


def stage_renest(ctx: DemoContext) -> StageReport:
    """Train one plain LoRA at the max rank (same settings) and re-nest it by SVD (no base model needed)."""
    import dataclasses

    from .converters.renest import renest_adapter
    from .training import train

    settings = dataclasses.replace(demo_train_settings(ctx), method="lora", train_ranks=(max(ctx.train_ranks),))

    def progress(done: int, total: int) -> None:
        ctx.report_progress("training LoRA", done, total)

    res = train(ctx.base_dir, ctx.train_path, ctx.lora_dir, settings, progress=progress,
                base_model_name=str((ctx.output / "base").resolve()))
    out = renest_adapter(ctx.lora_dir, ctx.renested_dir)
    keep = ", ".join(f"r{k} {out.energy[k - 1] * 100:.1f}%" for k in ctx.train_ranks if k <= len(out.energy))
    return StageReport(
        lines=[
            f"plain LoRA r={res.max_rank}: {res.steps} steps in {res.seconds:.1f} s -> {ctx.output / 'lora'}",
            f"re-nested by SVD in {out.seconds * 1000:.0f} ms -> {ctx.output / 'renested'}; share of ||dW||^2 kept: {keep}",
        ],
        data={"train": res.to_dict(), "energy": list(out.energy)},
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
    """Held-out loss and exact match at rank 0 (the base) and every train rank of the nested adapter
    and of the re-nested LoRA, switching ranks in place on one model; each slice is also loaded with
    plain ``PeftModel.from_pretrained`` and scored. The closing lines are computed from the table."""
    from peft import PeftModel

    from .adapter import NestedAdapter
    from .base import load_base_model, load_tokenizer
    from .evaluation import load_eval_data, score_model
    from .training import _quiet_peft, load_nested_adapter

    tokenizer = load_tokenizer(ctx.base_dir)
    data = load_eval_data(ctx.eval_path, tokenizer, max_examples=64 if ctx.quick else None)

    def scores(model: Any) -> tuple[float, float]:
        s = score_model(model, tokenizer, data, metric="exact-match", batch_size=64)
        return s.loss, float(s.exact_match or 0.0)

    adapter = NestedAdapter.load(ctx.nested_dir)
    slice_losses: dict[int, float] = {}
    for k in ctx.slice_ranks:
        with _quiet_peft():
            peft_model = PeftModel.from_pretrained(load_base_model(ctx.base_dir), str(ctx.slices_dir / f"r{k}"))
        slice_losses[k] = scores(peft_model)[0]
    ranks = (0, *adapter.config.train_ranks)
    # rank 0 is the base model whatever the adapter: scored once, with the first adapter
    todo = [(name, path) for name, path in (("nested", ctx.nested_dir), ("renested", ctx.renested_dir))
            if path.exists()]  # no re-nested adapter in a demo run without the renest stage
    total = len(ranks) + (len(todo) - 1) * (len(ranks) - 1)
    curves: dict[str, dict[int, tuple[float, float]]] = {}
    done = 0
    for name, path in todo:
        handle = load_nested_adapter(load_base_model(ctx.base_dir), path)
        curves[name] = {0: curves["nested"][0]} if curves else {}
        for k in ranks:
            if k in curves[name]:
                continue
            handle.set_rank(k)
            curves[name][k] = scores(handle.model)
            done += 1
            ctx.report_progress("evaluating", done, total)
    nested = curves["nested"]
    other = curves.get("renested", {})
    table = [
        {"rank": k, "params": adapter.params_at(k) if k else 0, "loss": nested[k][0], "exact_match": nested[k][1],
         "slice_loss": slice_losses.get(k), "renested_loss": other[k][0] if k in other else None,
         "renested_exact_match": other[k][1] if k in other else None}
        for k in ranks
    ]
    headers = ["rank", "adapter params", "held-out loss", "exact match", "PEFT slice loss"]
    if other:
        headers += ["re-nested LoRA loss", "re-nested exact match"]

    def pct(x: float | None) -> str:
        return "" if x is None else f"{x * 100:.1f}%"

    rows = []
    for t in table:
        row = [t["rank"], f"{t['params']:,}" if t["rank"] else "0 (base)", f"{t['loss']:.4f}", pct(t["exact_match"]),
               "" if t["slice_loss"] is None else f"{t['slice_loss']:.4f}"]
        if other:
            row += [f"{t['renested_loss']:.4f}", pct(t["renested_exact_match"])]
        rows.append(row)
    lines = [f"held-out set: {len(data.examples)} examples of the built-in task ({ctx.eval_path.name}); loss per completion token, greedy exact match"]
    lines += demo_verdict(table, adapter.config.method)
    return StageReport(lines=lines, headers=headers, rows=rows, data={"ranks": table, "eval_examples": len(data.examples)})


def demo_verdict(table: Sequence[dict[str, Any]], method: str) -> list[str]:
    """Closing lines computed from the evaluation table (rank 0 first): what beat the base, and by how much."""
    from .method import aurac

    base, trained = table[0], list(table[1:])
    ks = [t["rank"] for t in trained]
    lines = []
    if not all(math.isfinite(t["loss"]) for t in table):
        return ["warning: a held-out loss is not finite; the training diverged"]
    loss_ok = [t["rank"] for t in trained if t["loss"] < base["loss"]]
    em_ok = [t["rank"] for t in trained if t["exact_match"] > base["exact_match"]]
    best = max(trained, key=lambda t: t["exact_match"])
    au = aurac(ks, [t["exact_match"] for t in trained])["v2"]
    lines.append(
        f"{method}: {len(loss_ok)}/{len(ks)} ranks beat the base on held-out loss, {len(em_ok)}/{len(ks)} on exact match "
        f"(base {base['exact_match'] * 100:.1f}%; best rank {best['rank']}: {best['exact_match'] * 100:.1f}%; AURAC v2 {au * 100:.1f})"
    )
    if len(loss_ok) == len(ks) and len(em_ok) == len(ks):
        lines.append("every trained rank works on this task: one training run, every rank usable")
    else:
        weak = sorted(set(ks) - set(em_ok) | set(ks) - set(loss_ok))
        lines.append(f"warning: rank(s) {', '.join(map(str, weak))} do not beat the base here; evaluate before deploying them")
    if all(t.get("renested_exact_match") is not None for t in trained):
        au_svd = aurac(ks, [t["renested_exact_match"] for t in trained])["v2"]
        lines.append(f"re-nested plain LoRA (SVD): AURAC v2 {au_svd * 100:.1f} on exact match, vs {au * 100:.1f} for the {method} run")
    return lines


#: The demo, in order. Add a stage with one line (see the module docstring).
STAGES: list[Stage] = [
    Stage("base", "build a tiny base model", stage_base),
    Stage("train", "train a nested adapter", stage_train),
    Stage("renest", "train one plain LoRA and re-nest it by SVD", stage_renest),
    Stage("slice", "slice it into PEFT adapters", stage_slice),
    Stage("evaluate", "held-out loss and exact match per rank", stage_evaluate),
    Stage("merge", "merge the largest sliced rank into the base", "mlora_export.converters.merge:demo_stage"),
    Stage("onnx", "export to ONNX with the rank as an input, verify in ONNX Runtime", "mlora_export.converters.onnx.export:demo_stage"),
    Stage("bundle", "write a Hub variant bundle (local, no network)", "mlora_export.converters.hub.bundle:demo_stage"),
]


def demo_train_settings(ctx: DemoContext) -> Any:
    """The :class:`~mlora_export.training.TrainSettings` of the demo (shorter with ``ctx.quick``)."""
    from .training import TrainSettings

    return TrainSettings(  # the method is the default one, as `mlora-export train` uses
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


__all__ = ["DemoContext", "DemoResult", "Stage", "StageReport", "STAGES", "demo_train_settings", "demo_verdict", "run_demo"]
