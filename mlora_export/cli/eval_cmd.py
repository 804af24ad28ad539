"""``mlora-export eval``: per-rank scores and AURAC of nested adapters (and LoRA grids) on a data file or Hub dataset,
and on lm-evaluation-harness tasks."""

from __future__ import annotations

from typing import Any

import click

from ..base import DTYPES
from ..evaluation.scoring import METRICS
from ._errors import handle_errors
from ._options import (
    AsciiIntRange,
    BarProgress,
    RankList,
    base_model_options,
    data_options,
    echo_json,
    echo_table,
    force_option,
    json_option,
    maybe_torch_threads,
    threads_option,
)


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
@click.option("--tasks", default=None,
              help="lm-evaluation-harness tasks to score every rank on, comma-separated as lm_eval --tasks takes them (names, "
                   "groups, tags, glob patterns, task YAML paths), e.g. gsm8k,arc_easy; lm-eval runs them on the one loaded model. "
                   "Needs pip install 'mlora-export[lm-eval]'.")
@click.option("--num-fewshot", type=AsciiIntRange(min=0), default=None, help="With --tasks: few-shot examples per prompt (default: each task's own).")
@click.option("--limit", type=AsciiIntRange(min=1), default=None, help="With --tasks: only the first N documents of each task.")
@click.option("--apply-chat-template", is_flag=True,
              help="With --tasks: render prompts (few-shot examples as turns) with the tokenizer's chat template (or --chat-template).")
@click.option("--include-path", multiple=True, type=click.Path(path_type=str),
              help="With --tasks: a folder of task YAML files added to lm-eval's registry (repeatable).")
@click.option("--ranks", type=RankList(), default="all", show_default=True,
              help="Ranks for nested adapters, e.g. 1,2,4,8,16,32, or 'all' for each adapter's train ranks.")
@click.option("--metric", type=click.Choice(list(METRICS)), default="loss", show_default=True,
              help="The --data metric. loss: NLL of the completion, the assistant turns or the text (lower is better); accuracy: "
                   "next-token accuracy on the same tokens; exact-match: greedy generation equals the completion (or a "
                   "conversation's last assistant turn).")
@click.option("--output", "-o", required=True, type=click.Path(path_type=str), help="Folder to create with results.json and rank_curve.png.")
@click.option("--record", is_flag=True,
              help="Also store the numbers in each nested adapter's matryoshka_config.json (key 'evaluation'): the --metric of "
                   "--data and every lm-eval task metric (task:metric), for bundle and pull --rank auto.")
@click.option("--batch-size", type=AsciiIntRange(min=1), default=16, show_default=True, help="Examples per forward pass (lm-eval's too).")
@click.option("--max-new-tokens", type=AsciiIntRange(min=1), default=None,
              help="exact-match generation budget (default: each reference's token length); generation also stops at "
                   "EOS and the chat template's end-of-turn token.")
@click.option("--tokenizer", "tokenizer_dir", type=click.Path(path_type=str), default=None, help="Tokenizer folder (default: --base-model).")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="auto", show_default=True,
              help="Dtype to load the base model in.")
@click.option("--device", default=None, help="torch device (default: cuda if available, else cpu).")
@click.option("--with-base", is_flag=True, help="Also score the base model without adapter (rank 0, a dashed line in the plot).")
@click.option("--max-examples", type=AsciiIntRange(min=1), default=None, help="Use only the first N records.")
@threads_option
@force_option
@json_option
@handle_errors
def eval_(
    adapters: tuple[str, ...], base_model: str, revision: str | None, data: str | None, data_split: str | None, data_config: str | None,
    data_columns: str | None, chat_template: str | None, tasks: str | None, num_fewshot: int | None, limit: int | None,
    apply_chat_template: bool, include_path: tuple[str, ...], ranks: tuple[int, ...] | str, metric: str, output: str,
    record: bool, batch_size: int, max_new_tokens: int | None, tokenizer_dir: str | None, dtype: str, device: str | None,
    with_base: bool, max_examples: int | None, threads: int | None, force: bool, as_json: bool,
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
    from ..data import DataSource, parse_columns, read_chat_template
    from ..evaluation import LmEvalTasks, evaluate, write_results
    from ..fs import check_output_path

    task_options = {"--num-fewshot": num_fewshot, "--limit": limit, "--apply-chat-template": apply_chat_template or None,
                    "--include-path": include_path or None}
    if tasks is None and any(v is not None for v in task_options.values()):
        given = [k for k, v in task_options.items() if v is not None]
        raise click.UsageError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} only with --tasks")
    if data is None and tasks is None:
        raise click.UsageError("nothing to evaluate on: give --data, --tasks, or both")
    check_output_path(output, force)
    source = DataSource(data, split=data_split, config=data_config, columns=parse_columns(data_columns)) if data is not None else None
    template = read_chat_template(chat_template) if chat_template is not None else None
    lm_eval = None if tasks is None else LmEvalTasks(tuple(t.strip() for t in tasks.split(",")), num_fewshot=num_fewshot, limit=limit,
                                                      apply_chat_template=apply_chat_template, include_path=include_path)
    with maybe_torch_threads(threads), BarProgress("evaluating", unit="rank") as bar:
        result = evaluate(
            list(adapters), base_model, source, ranks, metric=metric, batch_size=batch_size, max_new_tokens=max_new_tokens,
            tokenizer_dir=tokenizer_dir, dtype=dtype, device=device, with_base=with_base, max_examples=max_examples,
            record=record, progress=bar, chat_template=template, revision=revision, lm_eval=lm_eval,
        )
    write_results(result, output, force=force)
    recorded = result.recorded
    for label in result.not_recorded:
        click.echo(f"note: not recording for {label!r}: only nested adapter folders carry a matryoshka_config.json", err=True)
    if as_json:
        echo_json({**result.to_dict(), "output": output, "recorded": recorded})
        return
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
