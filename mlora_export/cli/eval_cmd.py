"""``mlora-export eval``: per-rank scores and AURAC of nested adapters (and LoRA grids) on a data file or Hub dataset."""

from __future__ import annotations

import dataclasses

import click

from ..evaluation.options import EvalOptions
from ._errors import handle_errors
from ._options import BarProgress, BaseModelArg, DataArgs, base_model_options, collect, data_options, echo_json
from ._options import echo_table, field_options, force_option, json_option, output_option, ranks_option, threads_option


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


@click.command("eval")
@click.argument("adapters", nargs=-1, required=True, type=click.Path(path_type=str))
@base_model_options
@data_options("test")
@ranks_option("Ranks for nested adapters, e.g. 1,2,4,8,16,32, or 'all' for each adapter's train ranks.", required=False, default="all")
@field_options(EvalOptions, "metric")
@output_option("Folder to create with results.json and rank_curve.png.")
@field_options(EvalOptions, "record", "batch_size", "max_new_tokens", "tokenizer_dir", "dtype", "device", "with_base", "max_examples")
@threads_option
@force_option
@json_option
@handle_errors
@collect(EvalOptions, "options")
def eval_(
    adapters: tuple[str, ...], base: BaseModelArg, data: DataArgs, ranks: tuple[int, ...] | str, output: str, options: EvalOptions,
    force: bool, as_json: bool,
) -> None:
    """Evaluate ADAPTER(s) at every rank on --data; print a per-rank table and AURAC v1/v2.

    An ADAPTER is a nested adapter folder (evaluated at --ranks, switching rank in place: the base is
    loaded once), a plain PEFT LoRA folder or slice (evaluated at its own rank; several of them form
    one curve), or a folder of adapter folders such as a slice output or a grid of LoRA runs
    (one curve, each member at its own rank). For --metric loss, AURAC is a mean loss: lower is better.

    \b
    Example:
      mlora-export eval ./nested --base-model ./my-model --data eval.jsonl \\
          --ranks 1,2,4,8,16,32 --metric exact-match --output ./eval
      mlora-export eval ./nested ./lora-grid --base-model ./my-model --data eval.jsonl --output ./cmp
      mlora-export eval ./nested --base-model HuggingFaceTB/SmolLM2-135M-Instruct --data chat-test.jsonl \\
          --metric exact-match --max-new-tokens 64 --output ./eval-chat
    """
    from ..evaluation import evaluate, write_results
    from ..fs import check_output_path

    check_output_path(output, force)
    source = data.source()
    options = dataclasses.replace(options, revision=base.revision, chat_template=data.chat_template())
    with BarProgress("evaluating", unit="rank") as bar:
        result = evaluate(list(adapters), base.given, source, ranks, options, progress=bar)
    write_results(result, output, force=force)
    recorded = result.recorded
    for label in result.not_recorded:
        click.echo(f"note: not recording for {label!r}: only nested adapter folders carry a matryoshka_config.json", err=True)
    if as_json:
        echo_json({**result.to_dict(), "output": output, "recorded": recorded})
        return
    # one column per number (loss, perplexity, token accuracy, exact match when measured); the
    # --metric that AURAC integrates is marked, not repeated under a second name
    columns = [("loss", "loss", "loss"), ("perplexity", "perplexity", None), ("token acc", "token_accuracy", "accuracy")]
    metric = options.metric
    if metric == "exact-match":
        columns.append(("exact match", "exact_match", "exact-match"))
    headers = ["adapter", "rank"] + [f"{name} *" if m == metric else name for name, _, m in columns]
    points = ([("base model", result.base)] if result.base is not None else []) + [(c.label, p) for c in result.curves for p in c.points]
    rows = [[label, p.rank, *(_fmt(getattr(p, attr)) for _, attr, _ in columns)] for label, p in points]
    echo_table(headers, rows)
    click.echo(f"(* = --metric {metric}, the score of the AURAC below)")
    click.echo("")
    better = "higher" if result.higher_is_better else "lower"
    echo_table(["adapter", "method", "AURAC v1", "AURAC v2"], [[c.label, c.method, _fmt(c.aurac["v1"]), _fmt(c.aurac["v2"])] for c in result.curves])
    click.echo(f"\nAURAC = mean {metric} over the rank axis (v1 linear, v2 log2); {better} is better. Wrote {output}/results.json and {output}/rank_curve.png")
    for path in recorded:
        click.echo(f"recorded in {path}")
