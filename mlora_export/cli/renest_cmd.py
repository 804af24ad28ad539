"""``mlora-export renest``: re-nest any PEFT LoRA adapter so that every rank prefix is its best
approximation at that rank (method ``svd``)."""

from __future__ import annotations

import click

from ..converters.renest import DTYPES
from ._errors import handle_errors
from ._options import AsciiFloatRange, AsciiIntRange, BarProgress, echo_json, echo_table, force_option, json_option


@click.command("renest")
@click.argument("adapter", type=click.Path(path_type=str))
@click.option("--output", "-o", required=True, type=click.Path(path_type=str), help="Folder to create: a nested adapter (method svd).")
@click.option("--max-rank", type=AsciiIntRange(min=1), default=None, help="Keep only the first R components (a smaller file). Default: the source's rank.")
@click.option("--energy", type=AsciiFloatRange(min=0, max=1, min_open=True), default=None,
              help="Print, and record in the output, the smallest rank keeping this share of the sum of ||ΔW||² (e.g. 0.9).")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default=None, help="Output dtype. Default: the source's.")
@force_option
@json_option
@handle_errors
def renest(adapter: str, output: str, max_rank: int | None, energy: float | None, dtype: str | None, force: bool, as_json: bool) -> None:
    """Re-nest a PEFT LoRA ADAPTER: rank k of the output is each module's best rank-k delta.

    No base model is needed, and the dense delta is never built. The output is a nested
    adapter: inspect, slice, merge, onnx and bundle read it.

    \b
    Example:
      mlora-export renest ./my-peft-lora --output ./nested --energy 0.9
      mlora-export inspect ./nested
      mlora-export slice ./nested --ranks 4,8 --output ./slices
    """
    from ..converters.renest import renest_adapter

    with BarProgress("re-nesting") as bar:
        result = renest_adapter(adapter, output, max_rank=max_rank, energy=energy, dtype=dtype, force=force, progress=bar)
    if as_json:
        echo_json(result.to_dict())
        return
    click.echo(f"re-nested {result.modules} modules (rank {result.source_rank}, {result.source_dtype}) into {result.path} "
               f"(rank {result.max_rank}, {result.dtype}, {result.bytes} bytes) in {result.seconds:.2f} s")
    if result.energy_rank is not None:
        k = result.energy_rank
        kept = f"{result.energy[k - 1]:.6f}" if k <= result.max_rank else f"beyond --max-rank {result.max_rank}"
        click.echo(f"smallest rank keeping {result.energy_target:g} of the sum of ||ΔW||²: {k} ({kept})")
    ranks = sorted({k for k in (1, 2, 4, 8, 16, 32, 64, 128, 256, result.max_rank, result.energy_rank) if k and k <= result.max_rank})
    echo_table(["rank", "energy"], [[k, f"{result.energy[k - 1]:.6f}"] for k in ranks])
