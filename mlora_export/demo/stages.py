"""The demo's own stages: the pre-trained base, training, re-nesting, slicing and the per-rank evaluation."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

from .context import DemoContext, StageReport

logger = logging.getLogger(__name__)


# -- the stages ---------------------------------------------------------------------------


def stage_base(ctx: DemoContext) -> StageReport:
    """Put the demo model's base (and its task) in place: :meth:`DemoModel.prepare_base <.context.DemoModel.prepare_base>`."""
    return ctx.model.prepare_base(ctx)


def prepare_builtin_base(ctx: DemoContext) -> StageReport:
    """Copy the package's pre-trained base (:func:`~.builtin.pretrained_base_dir`: a Llama-style causal LM and
    its byte-level ``tokenizer.json``, which llama.cpp and ONNX Runtime GenAI read) into ``ctx.base_dir``."""
    import shutil

    from .builtin import pretrained_base_dir, pretrained_base_record

    shutil.copytree(pretrained_base_dir(), ctx.base_dir)
    info = pretrained_base_record()
    pre, skills = info["pretraining"], info["base_exact_match"]
    known = ", ".join(f"{k} {v * 100:.0f}%" for k, v in skills.items() if k != "demo held-out split")
    return StageReport(
        lines=[
            f"pre-trained Llama-style causal LM shipped with the package: {info['params']:,} parameters "
            f"({info['shape']['num_hidden_layers']} layers, hidden {info['shape']['hidden_size']}), byte-level BPE tokenizer "
            f"-> {ctx.output / 'base'}",
            f"pre-trained {pre['steps']} steps on a letter-string language (scripts/make_demo_base.py); greedy exact match "
            f"on its operations: {known}; the task: the rare '~', which it half knows",
        ],
        data=info,
    )


def stage_train(ctx: DemoContext) -> StageReport:
    """Train a nested adapter (the default method) over ``ctx.train_ranks`` into ``ctx.nested_dir``."""
    from ..training import RunOptions, train

    settings = ctx.model.train_settings(ctx, "nested-loss")

    def progress(done: int, total: int) -> None:
        ctx.report_progress("training", done, total)

    # Record the base's final path: ctx.base_dir may lie in the temporary folder renamed at the end.
    res = train(ctx.base_dir, ctx.train_path, ctx.nested_dir, settings, RunOptions(base_model_id=ctx.base_id), progress=progress)
    return StageReport(
        lines=[
            f"{res.method} adapter, max rank {max(ctx.train_ranks)}, train ranks {list(ctx.train_ranks)}, lr {settings.lr:g}: "
            f"{res.steps} steps of batch {settings.batch_size} in {res.seconds:.1f} s -> {ctx.output / 'nested'}"
        ],
        data=res.to_dict(),
    )


def stage_renest(ctx: DemoContext) -> StageReport:
    """Train one plain LoRA at the max rank (the same settings at its own learning rate) and re-nest it by SVD (no base model needed)."""
    from ..converters.renest import renest_adapter
    from ..training import RunOptions, train

    settings = ctx.model.train_settings(ctx, "lora")

    def progress(done: int, total: int) -> None:
        ctx.report_progress("training LoRA", done, total)

    res = train(ctx.base_dir, ctx.train_path, ctx.lora_dir, settings, RunOptions(base_model_id=ctx.base_id), progress=progress)
    out = renest_adapter(ctx.lora_dir, ctx.renested_dir)
    keep = ", ".join(f"r{k} {out.energy[k - 1] * 100:.1f}%" for k in ctx.train_ranks if k <= len(out.energy))
    return StageReport(
        lines=[
            f"plain LoRA r={res.max_rank}, lr {settings.lr:g}: {res.steps} steps of batch {settings.batch_size} in {res.seconds:.1f} s "
            f"-> {ctx.output / 'lora'}",
            f"re-nested by SVD in {out.seconds * 1000:.0f} ms -> {ctx.output / 'renested'}; share of ||dW||^2 kept: {keep}",
        ],
        data={"train": res.to_dict(), "energy": list(out.energy)},
    )


def stage_slice(ctx: DemoContext) -> StageReport:
    """Cut plain PEFT LoRA adapters at ``ctx.slice_ranks`` into ``ctx.slices_dir``."""
    from ..converters.slice import slice_adapter

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

    from ..adapter import NestedAdapter
    from ..base import load_base_model, load_tokenizer
    from ..evaluation import load_eval_data, score_model
    from ..training.model import load_nested_adapter, quiet_peft

    tokenizer = load_tokenizer(ctx.base_dir)
    data = load_eval_data(ctx.eval_path, tokenizer, max_examples=ctx.model.quick_eval_examples if ctx.quick else None)
    batch = ctx.model.eval_batch_size

    def scores(model: Any) -> tuple[float, float]:
        s = score_model(model, tokenizer, data, metric="exact-match", batch_size=batch)
        return (math.nan if s.loss is None else s.loss), float(s.exact_match or 0.0)  # a data file's score always has a loss

    adapter = NestedAdapter.load(ctx.nested_dir)
    slice_losses: dict[int, float] = {}
    for k in ctx.slice_ranks:  # the loss is the check (a slice computes its rank exactly); no need to generate
        with quiet_peft():
            peft_model = PeftModel.from_pretrained(load_base_model(ctx.base_dir), str(ctx.slices_dir / f"r{k}"))
        loss = score_model(peft_model, tokenizer, data, metric="loss", batch_size=batch).loss
        slice_losses[k] = math.nan if loss is None else loss
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
    lines = [f"held-out set: {len(data.examples)} examples ({ctx.eval_path.name}), none seen in training; "
             "loss per completion token, greedy exact match"]
    lines += demo_verdict(table, adapter.config.method)
    return StageReport(lines=lines, headers=headers, rows=rows, data={"ranks": table, "eval_examples": len(data.examples)})


def demo_verdict(table: Sequence[dict[str, Any]], method: str) -> list[str]:
    """Closing lines computed from the evaluation table (rank 0 first): what beat the base, and by how much."""
    from ..method import aurac

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
        lines.append("every trained rank beats the base on both measures (which is not the same as good enough: evaluate on your task before deploying)")
    else:
        weak = sorted(set(ks) - set(em_ok) | set(ks) - set(loss_ok))
        lines.append(f"warning: rank(s) {', '.join(map(str, weak))} do not beat the base here; evaluate before deploying them")
    if all(t.get("renested_exact_match") is not None for t in trained):
        au_svd = aurac(ks, [t["renested_exact_match"] for t in trained])["v2"]
        svd_ok = [t["rank"] for t in trained if t["renested_exact_match"] > base["exact_match"]]
        lines.append(f"re-nested plain LoRA (SVD): AURAC v2 {au_svd * 100:.1f} on exact match, vs {au * 100:.1f} for the {method} run "
                     f"({len(svd_ok)}/{len(ks)} vs {len(em_ok)}/{len(ks)} ranks above the base's exact match)")
    return lines


#: The demo, in order. Add a stage with one line (see the module docstring).


#: Each run's learning rate: the one the reproduction's validation search chose for that method in its
#: ``skill`` regime (docs/reproduction.md, the regime this demo is a miniature of), never tuned on the demo.
DEMO_LR: dict[str, float] = {"nested-loss": 1.6e-2, "lora": 2e-3}


def demo_train_settings(ctx: DemoContext, method: str = "nested-loss") -> Any:
    """The :class:`~mlora_export.training.TrainSettings` of a demo run (shorter with ``ctx.quick``).

    The reproduction's fine-tuning settings (examples/reproduce: 300 steps of batch 32, a 10% warm-up then
    linear decay, scaling ``sqrt`` with alpha 2, LoRA on ``o_proj`` and ``down_proj``) at the method's
    :data:`DEMO_LR`; ``lora`` trains one plain LoRA at the max rank.
    """
    from ..training import TrainSettings

    steps = 20 if ctx.quick else 300
    return TrainSettings(
        method=method,
        train_ranks=ctx.train_ranks if method != "lora" else (max(ctx.train_ranks),),
        scaling="sqrt",
        alpha=2.0,
        target_modules=("o_proj", "down_proj"),
        epochs=None,
        max_steps=steps,
        warmup_steps=max(1, round(0.1 * steps)),
        lr=DEMO_LR[method],
        batch_size=32,
        seed=ctx.seed,
        max_length=48,
    )
