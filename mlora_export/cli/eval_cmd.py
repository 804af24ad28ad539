"""``mlora-export eval``: per-rank scores and AURAC of nested adapters (and LoRA grids) on a data file or Hub dataset,
and on lm-evaluation-harness tasks."""

from __future__ import annotations

import dataclasses
from typing import Any

import click

from ..evaluation.options import EvalOptions, LmEvalTasks
from ..params import fields_of
from ._errors import handle_errors
from ._options import BarProgress, BaseModelArg, DataArgs, NameList, base_model_options, collect, data_options, echo_json
from ._options import echo_table, field_options, force_option, json_option, output_option, ranks_option, threads_option


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def _echo_tasks(result: Any, points: list[tuple[str, Any]], output: str) -> None:
    """The lm-eval part of the report: each task's headline metric per rank, then AURAC per metric."""
    from ..metric_names import TASKS_MEAN

    suite = result.tasks
    names = list(suite.headlines) + ([TASKS_MEAN] if TASKS_MEAN in suite.metrics else [])
    echo_table(["adapter", "rank", *names], [[label, p.rank, *(_fmt(((p.tasks or {}).get(n) or {}).get("value")) for n in names)] for label, p in points])
    click.echo("(lm-eval: each task's headline metric; every metric of every task is in results.json)")
    click.echo("")
    own = [result.metric] if result.data is not None else []
    rows = [[c.label, m, _fmt((c.aurac_by_metric.get(m) or {}).get("v1")), _fmt((c.aurac_by_metric.get(m) or {}).get("v2"))]
            for c in result.curves for m in own + names]
    echo_table(["adapter", "metric", "AURAC v1", "AURAC v2"], rows)
    click.echo(f"\nAURAC = mean score over the rank axis (v1 linear, v2 log2); higher is better, except for loss. "
               f"Wrote {output}/results.json and {output}/rank_curve.png")


@click.command("eval")
@click.argument("adapters", nargs=-1, required=True, type=click.Path(path_type=str))
@base_model_options
@data_options("test", required=False, extra_help=" Optional with --tasks.")
@field_options(LmEvalTasks, "tasks", "num_fewshot", "limit", "apply_chat_template", "include_path",
               overrides={"tasks": {"type": NameList()}, "include_path": {"multiple": True, "type": click.Path(path_type=str)}})
@ranks_option("Ranks for nested adapters, e.g. 1,2,4,8,16,32, or 'all' for each adapter's train ranks.", required=False, default="all")
@field_options(EvalOptions, "metric")
@output_option("Folder to create with results.json and rank_curve.png.")
@field_options(EvalOptions, "record", "batch_size", "max_new_tokens", "tokenizer_dir", "dtype", "device", "with_base", "max_examples")
@threads_option
@force_option
@json_option
@handle_errors
@collect(EvalOptions, "options")
@collect(LmEvalTasks, "lm_eval")
def eval_(
    adapters: tuple[str, ...], base: BaseModelArg, data: DataArgs, ranks: tuple[int, ...] | str, output: str, options: EvalOptions,
    lm_eval: LmEvalTasks, force: bool, as_json: bool,
) -> None:
    """Evaluate ADAPTER(s) at every rank on --data and/or lm-eval --tasks; print a per-rank table and AURAC v1/v2.

    An ADAPTER is a nested adapter folder (evaluated at --ranks, switching rank in place: the base is
    loaded once), a plain PEFT LoRA folder or slice (evaluated at its own rank; several of them form
    one curve), or a folder of adapter folders such as a slice output or a grid of LoRA runs
    (one curve, each member at its own rank). For --metric loss, AURAC is a mean loss: lower is better.

    With --tasks, lm-evaluation-harness scores every rank with its own tasks and metrics, its HFLM
    wrapping the one loaded model; each metric is named task:metric (task:metric:filter for a
    task's second filter on, e.g. gsm8k:exact_match:flexible-extract), gets its AURAC, and with
    --record is stored for pull --rank auto --metric gsm8k:exact_match.

    \b
    Example:
      mlora-export eval ./nested --base-model ./my-model --data eval.jsonl \\
          --ranks 1,2,4,8,16,32 --metric exact-match --output ./eval
      mlora-export eval ./nested ./lora-grid --base-model ./my-model --data eval.jsonl --output ./cmp
      mlora-export eval ./nested --base-model HuggingFaceTB/SmolLM2-135M-Instruct --data chat-test.jsonl \\
          --metric exact-match --max-new-tokens 64 --output ./eval-chat
      mlora-export eval ./nested --base-model ./my-model --tasks gsm8k,arc_easy --ranks 1,2,4,8,16,32 \\
          --num-fewshot 5 --limit 200 --with-base --record --output ./eval-lm
    """
    from ..evaluation import evaluate, write_results
    from ..fs import check_output_path

    if lm_eval.tasks is None:
        given = [fields_of(LmEvalTasks)[f.name].metadata["flag"] for f in dataclasses.fields(LmEvalTasks)
                 if f.metadata["flag"] and getattr(lm_eval, f.name) != f.default]
        if given:
            raise click.UsageError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} only with --tasks")
    if data.path is None and lm_eval.tasks is None:
        raise click.UsageError("nothing to evaluate on: give --data, --tasks, or both")
    check_output_path(output, force)
    source = data.source()
    options = dataclasses.replace(options, revision=base.revision, chat_template=data.chat_template(),
                                  lm_eval=lm_eval if lm_eval.tasks is not None else None)
    with BarProgress("evaluating", unit="rank") as bar:
        result = evaluate(list(adapters), base.given, source, ranks, options, progress=bar)
    write_results(result, output, force=force)
    recorded = result.recorded
    for label in result.not_recorded:
        click.echo(f"note: not recording for {label!r}: only nested adapter folders carry a matryoshka_config.json", err=True)
    if as_json:
        echo_json({**result.to_dict(), "output": output, "recorded": recorded})
        return
    metric = options.metric
    points = ([("base model", result.base)] if result.base is not None else []) + [(c.label, p) for c in result.curves for p in c.points]
    if result.data is not None:
        # one column per number (loss, perplexity, token accuracy, exact match when measured); the
        # --metric that AURAC integrates is marked, not repeated under a second name
        columns = [("loss", "loss", "loss"), ("perplexity", "perplexity", None), ("token acc", "token_accuracy", "accuracy")]
        if metric == "exact-match":
            columns.append(("exact match", "exact_match", "exact-match"))
        headers = ["adapter", "rank"] + [f"{name} *" if m == metric else name for name, _, m in columns]
        rows = [[label, p.rank, *(_fmt(getattr(p, attr)) for _, attr, _ in columns)] for label, p in points]
        echo_table(headers, rows)
        click.echo(f"(* = --metric {metric}, the score of the AURAC below)")
        click.echo("")
    if result.tasks is None:
        better = "higher" if result.higher_is_better else "lower"
        echo_table(["adapter", "method", "AURAC v1", "AURAC v2"], [[c.label, c.method, _fmt(c.aurac["v1"]), _fmt(c.aurac["v2"])] for c in result.curves])
        click.echo(f"\nAURAC = mean {metric} over the rank axis (v1 linear, v2 log2); {better} is better. Wrote {output}/results.json and {output}/rank_curve.png")
    else:
        _echo_tasks(result, points, output)
    for path in recorded:
        click.echo(f"recorded in {path}")
