"""``mlora-export slice``: cut PEFT LoRA adapters at chosen ranks from a nested adapter."""

from __future__ import annotations

import click

from ._errors import handle_errors
from ._options import BarProgress, adapter_argument, echo_json, echo_table
from ._options import force_option, json_option, ranks_option, scale_mode_option


@click.command("slice")
@adapter_argument
@ranks_option()
@click.option("--output", "-o", required=True, type=click.Path(path_type=str), help="Folder to create; one r{k}/ PEFT adapter per rank.")
@scale_mode_option(
    "baked: s(k) folded into lora_B, lora_alpha = k (every runtime reads it alike); native: exact prefix, s(k) as lora_alpha = s(k)·k (no use_rslora).")
@force_option
@json_option
@handle_errors
def slice_(adapter: str, ranks: tuple[int, ...] | str, output: str, scale_mode: str, force: bool, as_json: bool) -> None:
    """Slice a nested ADAPTER into one standard PEFT LoRA adapter per rank.

    \b
    Example:
      mlora-export slice ./nested --ranks 8,16 --output ./slices
      # ./slices/r8 and ./slices/r16 load with PeftModel.from_pretrained(base, "./slices/r8")
    """
    from ..converters.slice import slice_adapter

    with BarProgress("slicing") as bar:
        results = slice_adapter(adapter, ranks, output, scale_mode=scale_mode, force=force, progress=bar)
    if as_json:
        echo_json([{"rank": r.rank, "path": str(r.path), "params": r.params, "bytes": r.bytes, "scale": r.scale} for r in results])
        return
    echo_table(["rank", "path", "params", "bytes", "scale"], [[r.rank, r.path, r.params, r.bytes, f"{r.scale:.6g}"] for r in results])
