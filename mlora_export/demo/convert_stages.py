"""The demo's converter stages: merge, ONNX export, GGUF, ONNX Runtime GenAI, Hub bundle, each run on the demo's outputs.

The converters know nothing of the demo; these stages call them and say what they did.
"""

from __future__ import annotations

from pathlib import Path

from ..converters.hub.bundle import ONNX_DIR, BundleOptions, write_bundle
from ..converters.merge import merge_adapter
from ..converters.onnx import MODEL_NAME, export_genai, export_onnx
from ..units import human_bytes
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
    diff: float | None = None
    same: float | None = None
    slice_dir = ctx.slices_dir / f"r{k}"
    if slice_dir.is_dir():
        from peft import PeftModel

        # both in float32: the difference left is the merge's one rounding to the base's dtype
        merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ctx.base_dir, dtype=torch.float32), str(slice_dir)).eval()
        ids = torch.randint(0, merged.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(ctx.seed))
        with torch.no_grad():
            a, b = merged(ids).logits, peft_model(ids).logits
        diff = float((a - b).abs().max())
        same = float((a.argmax(-1) == b.argmax(-1)).float().mean())
    stored = res.dtype or _config_dtype(ctx.base_dir)
    if diff is None or same is None:
        check = ""
    elif stored in (None, "float32"):
        check = f"; from_pretrained on it matches the base + PEFT r{k} slice (max |Δlogit| {diff:.1e})"
    else:  # the merge rounds W + ΔW once to the stored dtype: say how far that moves the logits, claim nothing
        check = (f"; from_pretrained on it vs the base + PEFT r{k} slice, both run in float32 (the merged weights stored in {stored}): "
                 f"max |Δlogit| {diff:.1e}, same argmax at {same * 100:.0f}% of positions")
    return StageReport(
        lines=[
            f"rank {k} merged into {res.merged_tensors} base weights ({res.copied_tensors} tensors copied unchanged, "
            f"{human_bytes(res.bytes)} in {res.seconds:.2f} s) -> {ctx.output / out.name}{check}"
        ],
        data={**res.to_dict(), "path": out.name, "max_abs_logit_diff_vs_peft": diff, "same_argmax_vs_peft": same},
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


def stage_gguf(ctx: DemoContext) -> StageReport:
    """Demo stage ``gguf``: one llama.cpp LoRA adapter per sliced rank (``gguf/r{k}.gguf``), read back with ``gguf``'s own reader."""
    import gguf

    from ..converters.gguf import export_gguf

    out = ctx.root / "gguf"
    results = export_gguf(ctx.nested_dir, ctx.slice_ranks, out, base_model=ctx.base_dir)
    rows = []
    for r in results:
        reader = gguf.GGUFReader(str(r.path))
        rows.append([r.rank, r.path.name, len(reader.tensors), f"{float(reader.fields['adapter.lora.alpha'].parts[-1][0]):g}", r.bytes])
    return StageReport(
        lines=[
            f"llama.cpp LoRA adapters ({results[0].architecture}, {results[0].out_type}) -> {ctx.output / 'gguf'}; "
            f"serve one with `llama-cli -m base.gguf --lora {ctx.output / 'gguf' / results[-1].path.name}` "
            f"(base.gguf: llama.cpp's convert_hf_to_gguf.py on {ctx.base_id})"
        ],
        headers=["rank", "file", "tensors", "adapter.lora.alpha", "bytes"],
        rows=rows,
        data={"path": "gguf", "files": [r.to_dict() for r in results]},
    )


def stage_genai(ctx: DemoContext) -> StageReport:
    """Demo stage ``genai``: a decoder with a KV cache for ONNX Runtime GenAI, generated from at each sliced rank
    and compared with transformers + the PEFT slice (skipped, saying so, when ``onnxruntime-genai`` is not installed)."""
    import importlib.util

    if importlib.util.find_spec("onnxruntime_genai") is None:
        return StageReport(lines=["skipped: onnxruntime-genai is not installed (pip install onnxruntime-genai) to export for and run ONNX Runtime GenAI"],
                           data={"skipped": True})
    import numpy as np
    import onnxruntime_genai as og
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def progress(done: int, total: int) -> None:
        ctx.report_progress("genai export", done, total)

    out = ctx.root / "genai"
    res = export_genai(ctx.nested_dir, ctx.base_dir, out, progress=progress)
    tok = AutoTokenizer.from_pretrained(ctx.base_dir)
    text = _first_prompt(ctx.eval_path)
    prompt = tok(text)["input_ids"]
    model = og.Model(str(out))
    rows = []
    for k in ctx.slice_ranks:
        rank = np.array(k, dtype=np.int64)  # GenAI does not copy it: it must live as long as the generator
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + 8, do_sample=False)
        gen = og.Generator(model, params)
        gen.set_model_input("lora_rank", rank)
        gen.append_tokens(prompt)
        while not gen.is_done():
            gen.generate_next_token()
        got = list(gen.get_sequence(0))[len(prompt):]
        del gen
        ref_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ctx.base_dir), str(ctx.slices_dir / f"r{k}")).eval()
        with torch.no_grad():
            ref = ref_model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id,
                                     eos_token_id=tok.eos_token_id)[0, len(prompt):].tolist()
        got, ref = (_until_eos([int(x) for x in seq], tok.eos_token_id) for seq in (got, ref))  # GenAI leaves EOS out
        rows.append([k, repr(tok.decode(got, skip_special_tokens=True)), "yes" if got == ref else "NO"])
    same = all(r[2] == "yes" for r in rows)
    return StageReport(
        lines=[f"ONNX Runtime GenAI decoder (KV cache, lora_rank per request) -> {ctx.output / 'genai'}; greedy tokens "
               + ("equal transformers + the PEFT slice at every rank" if same else "DIFFER from transformers + the PEFT slice")],
        headers=["lora_rank", f"GenAI greedy completion of {text!r}", "same as PEFT"],
        rows=rows,
        data={**res.to_dict(), "path": "genai", "same_as_peft": same},
    )


def stage_bundle(ctx: DemoContext) -> StageReport:
    """Demo stage ``bundle``: the demo's nested adapter as a Hub variant bundle in ``bundle/`` (no network).

    Includes the demo's ONNX export in ``onnx/`` and each rank's ``adapter.gguf`` when the ``onnx``
    and ``gguf`` stages wrote them.
    """

    def progress(done: int, total: int) -> None:
        ctx.report_progress("bundling", done, total)

    onnx, gguf_dir = ctx.root / ONNX_DIR, ctx.root / "gguf"
    options = BundleOptions(onnx_dir=onnx if onnx.is_dir() else None, gguf_dir=gguf_dir if gguf_dir.is_dir() else None, warn_local_base=False)
    b = write_bundle(ctx.nested_dir, ctx.slice_ranks, ctx.root / "bundle", options, progress=progress)
    return StageReport(
        lines=[
            f"variant bundle (model card, manifest with sha256 of {len(b.files) + 1} files, nested/ + "
            + ", ".join(f"{r.path}/" for r in b.ranks) + (", onnx/" if b.manifest.get("onnx") else "")
            + (", with adapter.gguf in each rank" if gguf_dir.is_dir() else "")
            + f") -> {ctx.output / 'bundle'}; publish it with `mlora-export push-hub {ctx.output / 'bundle'} --repo-id <namespace>/<repo>`"
        ],
        headers=["rank", "folder", "params", "bytes"],
        rows=[[r.rank, r.path + "/", f"{r.params:,}", r.bytes] for r in b.ranks],
        data={"path": "bundle", "ranks": [r.__dict__ for r in b.ranks], "files": len(b.files) + 1, "bytes": b.total_bytes},
    )


def _config_dtype(folder: Path) -> str | None:
    """The dtype a model folder's ``config.json`` records (``dtype`` or ``torch_dtype``), if any."""
    import json

    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = cfg.get("dtype") or cfg.get("torch_dtype") if isinstance(cfg, dict) else None
    return value if isinstance(value, str) else None


def _first_prompt(path: Path) -> str:
    """The prompt of the first record of a JSONL file (the demo's held-out split)."""
    import json

    with open(path, encoding="utf-8") as f:
        return str(json.loads(f.readline())["prompt"])


def _until_eos(tokens: list[int], eos: int | None) -> list[int]:
    """The tokens before the first EOS."""
    return tokens[: tokens.index(eos)] if eos is not None and eos in tokens else tokens
