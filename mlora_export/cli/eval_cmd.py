"""``mlora-export eval``: per-rank scores and AURAC of nested adapters (and LoRA grids) on a data file or Hub dataset."""

from __future__ import annotations

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


@click.command("eval")
@click.argument("adapters", nargs=-1, required=True, type=click.Path(path_type=str))
@base_model_options
@data_options("test")
@click.option("--ranks", type=RankList(), default="all", show_default=True,
              help="Ranks for nested adapters, e.g. 1,2,4,8,16,32, or 'all' for each adapter's train ranks.")
@click.option("--metric", type=click.Choice(list(METRICS)), default="loss", show_default=True,
              help="loss: NLL of the completion, the assistant turns or the text (lower is better); accuracy: next-token accuracy "
                   "on the same tokens; exact-match: greedy generation equals the completion (or a conversation's last assistant turn).")
@click.option("--output", "-o", required=True, type=click.Path(path_type=str), help="Folder to create with results.json and rank_curve.png.")
@click.option("--record", is_flag=True, help="Also store the numbers in each nested adapter's matryoshka_config.json (key 'evaluation').")
@click.option("--batch-size", type=AsciiIntRange(min=1), default=16, show_default=True, help="Examples per forward pass.")
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
    adapters: tuple[str, ...], base_model: str, revision: str | None, data: str, data_split: str | None, data_config: str | None,
    data_columns: str | None, chat_template: str | None, ranks: tuple[int, ...] | str, metric: str, output: str,
    record: bool, batch_size: int, max_new_tokens: int | None, tokenizer_dir: str | None, dtype: str, device: str | None,
    with_base: bool, max_examples: int | None, threads: int | None, force: bool, as_json: bool,
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
    from ..data import DataSource, parse_columns, read_chat_template
    from ..evaluation import evaluate, write_results
    from ..fs import check_output_path

    check_output_path(output, force)
    source = DataSource(data, split=data_split, config=data_config, columns=parse_columns(data_columns))
    template = read_chat_template(chat_template) if chat_template is not None else None
    with maybe_torch_threads(threads), BarProgress("evaluating", unit="rank") as bar:
        result = evaluate(
            list(adapters), base_model, source, ranks, metric=metric, batch_size=batch_size, max_new_tokens=max_new_tokens,
            tokenizer_dir=tokenizer_dir, dtype=dtype, device=device, with_base=with_base, max_examples=max_examples,
            record=record, progress=bar, chat_template=template, revision=revision,
        )
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
