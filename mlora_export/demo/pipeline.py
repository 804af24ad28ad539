"""``mlora-export demo``: the whole pipeline on a built-in default, as a list of stages.

The demo takes the small pre-trained Llama-style causal LM shipped with the package (no download),
fine-tunes a nested adapter with the default method (``nested-loss``) on a task the base half knows
(:mod:`mlora_export.demo.builtin`: both from the reproduction's ``skill`` regime), trains one plain
LoRA at the max rank and re-nests it by SVD, slices the nested adapter into PEFT adapters and prints
the held-out loss and exact match at every rank of both.

It is a list of :class:`Stage` objects run in order on one shared :class:`DemoContext`. To add a
stage (merge, ONNX, bundle…), write a function ``my_stage(ctx: DemoContext) -> StageReport`` (in
your own module if you like) and add one line to :data:`STAGES`, either with the function itself
or with a lazy ``"package.module:function"`` reference so that importing this module stays cheap::

    Stage("merge", "merge rank 8 into the base", "mlora_export.demo.convert_stages:stage_merge"),

A stage writes under ``ctx.root`` (a temporary sibling of the output folder until the demo
finishes; the finished folder appears at once), reads what earlier stages left in
``ctx.results[stage_name]``, and returns a :class:`StageReport` (lines and/or a table to print,
``data`` for ``--json`` and later stages). ``ctx.quick`` asks for a shortened run (tests).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..fs import atomic_output_dir, check_output_path
from ..threads import torch_threads
from .context import DemoContext, DemoModel, DemoResult, Stage, StageProgress, StageReport, demo_model
from .stages import stage_base, stage_evaluate, stage_renest, stage_slice, stage_train

logger = logging.getLogger(__name__)

STAGES: list[Stage] = [
    Stage("base", "the pre-trained base model and the task", stage_base),
    Stage("train", "train a nested adapter", stage_train),
    Stage("renest", "train one plain LoRA and re-nest it by SVD", stage_renest),
    Stage("slice", "slice it into PEFT adapters", stage_slice),
    Stage("evaluate", "held-out loss and exact match per rank", stage_evaluate),
    Stage("merge", "merge the largest sliced rank into the base", "mlora_export.demo.convert_stages:stage_merge"),
    Stage("onnx", "export to ONNX with the rank as an input, verify in ONNX Runtime", "mlora_export.demo.convert_stages:stage_onnx"),
    Stage("gguf", "write llama.cpp LoRA adapters (GGUF), one per sliced rank", "mlora_export.demo.convert_stages:stage_gguf"),
    Stage("genai", "export a KV-cache decoder for ONNX Runtime GenAI and generate at each sliced rank", "mlora_export.demo.convert_stages:stage_genai"),
    Stage("bundle", "write a Hub variant bundle (local, no network)", "mlora_export.demo.convert_stages:stage_bundle"),
]


def run_demo(
    output: str | os.PathLike[str],
    *,
    quick: bool = False,
    force: bool = False,
    seed: int = 0,
    model: str | DemoModel = "builtin",
    stages: Sequence[Stage] | None = None,
    progress: StageProgress | None = None,
    on_stage: Callable[[Stage, StageReport], None] | None = None,
) -> DemoResult:
    """Run ``stages`` (default :data:`STAGES`) in order into ``output``; return every report.

    The output folder is written as a temporary sibling and appears only when every stage has
    succeeded. ``model`` names the base (:data:`~.context.DEMO_MODELS`); a stage it cannot run is
    reported as skipped, with the reason. ``on_stage(stage, report)`` is called as each stage
    finishes (the CLI prints there).

    Raises:
        ConfigError: an unknown ``model``.
        OutputExistsError: ``output`` exists and ``force`` is false.
        MloraError: whatever a stage raises.
    """
    spec = model if isinstance(model, DemoModel) else demo_model(model)
    check_output_path(output, force)
    chosen = list(STAGES if stages is None else stages)
    reports: list[tuple[Stage, StageReport]] = []
    threads = torch_threads(spec.threads) if spec.threads is not None else contextlib.nullcontext()
    with threads, atomic_output_dir(output, force) as tmp:
        ctx = DemoContext(output=Path(output), root=tmp, quick=quick, seed=seed, progress=progress, model=spec)
        for stage in chosen:
            logger.info("demo stage %s: %s", stage.name, stage.title)
            t0 = time.perf_counter()
            why = spec.skipped(stage.name)
            if why is not None:
                report = StageReport(lines=[f"skipped on {spec.name}: {why}"], data={"skipped": True, "reason": why})
            else:
                report = stage.resolve()(ctx) or StageReport()
            report.seconds = time.perf_counter() - t0
            retarget_paths(tmp, Path(output).absolute())  # before a later stage copies (and hashes) what it recorded
            report.data = _retargeter(tmp, Path(output).absolute())(report.data)
            ctx.results[stage.name] = report.data
            reports.append((stage, report))
            if on_stage is not None:
                on_stage(stage, report)
    return DemoResult(Path(output), reports)


def retarget_paths(root: Path, final: Path) -> int:
    """Rewrite every path under ``root`` recorded in the JSON files under ``root`` to the same path under ``final``.

    The stages write into a temporary sibling that is renamed to the output at the end, so the
    sources the converters record (a slice's nested adapter, an ONNX export's base) name the
    temporary folder: they are made to name the folder the user gets. A variant bundle (a folder
    with ``manifest.json``) is left as it is: its manifest holds the sha256 of every file, and it
    copies files only after this has run on them. Returns the number of files changed.
    """
    from ..io.jsonio import loads, write_json

    fix = _retargeter(root, final)
    bundles = [m.parent for m in root.rglob("manifest.json")]
    changed = 0
    for path in sorted(root.rglob("*.json")):
        if any(b == path.parent or b in path.parents for b in bundles) or path.stat().st_size > (1 << 24):
            continue
        try:
            data = loads(path.read_bytes())
        except (OSError, ValueError):
            continue  # not ours to fix
        new = fix(data)
        if new != data:
            write_json(path, new)
            changed += 1
    return changed


def _retargeter(root: Path, final: Path) -> Callable[[Any], Any]:
    """A function mapping any JSON value to the same value with paths under ``root`` moved under ``final``."""
    olds = sorted({str(root), str(root.absolute()), str(root.resolve())}, key=len, reverse=True)

    def fix(value: Any) -> Any:
        if isinstance(value, str):
            for old in olds:
                if value == old or value.startswith(old + os.sep):
                    return str(final) + value[len(old):]
            return value
        if isinstance(value, list):
            return [fix(v) for v in value]
        if isinstance(value, dict):
            return {k: fix(v) for k, v in value.items()}
        return value

    return fix


__all__ = ["STAGES", "retarget_paths", "run_demo"]
