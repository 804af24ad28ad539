"""The demo's converter stages: merge, ONNX export, Hub bundle, each run on the demo's outputs.

The converters know nothing of the demo; these stages call them and say what they did.
"""

from __future__ import annotations

from ..converters.hub.bundle import ONNX_DIR, write_bundle
from ..converters.merge import merge_adapter
from ..converters.onnx.export import MODEL_NAME, export_onnx
from .context import DemoContext, StageReport


def stage_merge(ctx: DemoContext) -> StageReport:
    """Demo stage ``merge``: fold the largest sliced rank into the demo's base as ``merged-r{k}/``.

    Checks the result the way a user would: plain ``AutoModelForCausalLM.from_pretrained`` on the
    merged folder gives the logits of the base with that rank's PEFT slice applied.
    """
    import torch
    from transformers import AutoModelForCausalLM


    k = max(ctx.slice_ranks)
    out = ctx.root / f"merged-r{k}"

    def progress(done: int, total: int) -> None:
        ctx.report_progress("merging", done, total)

    res = merge_adapter(ctx.nested_dir, ctx.base_dir, k, out, progress=progress)
    diff = None
    slice_dir = ctx.slices_dir / f"r{k}"
    if slice_dir.is_dir():
        from peft import PeftModel

        merged = AutoModelForCausalLM.from_pretrained(out).eval()
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ctx.base_dir), str(slice_dir)).eval()
        ids = torch.randint(0, merged.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(ctx.seed))
        with torch.no_grad():
            diff = float((merged(ids).logits - peft_model(ids).logits).abs().max())
    check = "" if diff is None else f"; from_pretrained on it matches the base + PEFT r{k} slice (max |Δlogit| {diff:.1e})"
    return StageReport(
        lines=[
            f"rank {k} merged into {res.merged_tensors} base weights ({res.copied_tensors} tensors copied unchanged, "
            f"{res.bytes / 2**20:.1f} MiB in {res.seconds:.2f} s) -> {ctx.output / out.name}{check}"
        ],
        data={**res.to_dict(), "path": out.name, "max_abs_logit_diff_vs_peft": diff},
    )


def stage_onnx(ctx: DemoContext) -> StageReport:
    """Demo stage ``onnx``: export the demo's nested adapter with a dynamic rank and verify it."""

    def progress(done: int, total: int) -> None:
        ctx.report_progress("onnx export", done, total)

    res = export_onnx(ctx.nested_dir, ctx.base_dir, ctx.root / "onnx", progress=progress)
    worst = max((c.max_abs_diff for c in res.checks), default=0.0)
    return StageReport(
        lines=[
            f"dynamic-rank ONNX model ({res.exporter} exporter, opset {res.opset}), inputs {', '.join(res.inputs)} -> "
            f"{ctx.output / 'onnx' / MODEL_NAME}; ONNX Runtime matches PyTorch at every rank (worst max abs diff {worst:.2g})"
        ],
        headers=["lora_rank", "max abs diff vs PyTorch"],
        rows=[[c.rank, f"{c.max_abs_diff:.2e}"] for c in res.checks],
        data={**res.to_dict(), "path": "onnx"},
    )


def stage_bundle(ctx: DemoContext) -> StageReport:
    """Demo stage ``bundle``: the demo's nested adapter as a Hub variant bundle in ``bundle/`` (no network).

    Includes the demo's ONNX export in ``onnx/`` when an earlier ``onnx`` stage wrote one.
    """

    def progress(done: int, total: int) -> None:
        ctx.report_progress("bundling", done, total)

    onnx = ctx.root / ONNX_DIR
    b = write_bundle(ctx.nested_dir, ctx.slice_ranks, ctx.root / "bundle", onnx_dir=onnx if onnx.is_dir() else None,
                     progress=progress, warn_local_base=False)
    return StageReport(
        lines=[
            f"variant bundle (model card, manifest with sha256 of {len(b.files) + 1} files, nested/ + "
            + ", ".join(f"{r.path}/" for r in b.ranks) + (", onnx/" if b.manifest.get("onnx") else "")
            + f") -> {ctx.output / 'bundle'}; publish it with `mlora-export push-hub {ctx.output / 'bundle'} --repo-id <namespace>/<repo>`"
        ],
        headers=["rank", "folder", "params", "bytes"],
        rows=[[r.rank, r.path + "/", f"{r.params:,}", r.bytes] for r in b.ranks],
        data={"path": "bundle", "ranks": [r.__dict__ for r in b.ranks], "files": len(b.files) + 1, "bytes": b.total_bytes},
    )
