"""``mlora-export onnx``: export a nested adapter on its base model to ONNX, verified in ONNX Runtime."""

from __future__ import annotations

import click

from ..converters.onnx.common import OnnxExportOptions
from ._errors import handle_errors
from ._options import BarProgress, BaseModelArg, adapter_argument, base_model_options, collect
from ._options import echo_json, echo_table, field_options, force_option, json_option, output_option


def _collapse_kv(names: list[str]) -> list[str]:
    """``past_key_values.0.key … past_key_values.{n}.value`` shown as one item."""
    past = [n for n in names if n.startswith("past_key_values.")]
    if len(past) <= 2:
        return names
    rest = [n for n in names if not n.startswith("past_key_values.")]
    at = names.index(past[0])
    return rest[:at] + [f"past_key_values.{{0..{len(past) // 2 - 1}}}.key/value"] + rest[at:]


@click.command("onnx")
@adapter_argument
@base_model_options
@output_option("Folder to create (model.onnx, export_info.json, …).")
@field_options(OnnxExportOptions, "rank", "merged", "adapters_per_rank", "genai", "opset", "verify", "provider")
@force_option
@json_option
@handle_errors
@collect(OnnxExportOptions, "options")
def onnx(adapter: str, base: BaseModelArg, output: str, options: OnnxExportOptions, force: bool, as_json: bool) -> None:
    """Export a nested ADAPTER on --base-model to ONNX and check it in ONNX Runtime.

    By default the graph takes input_ids, attention_mask and an int64 scalar lora_rank
    (clamped into [0, r]; 0 = the base model) and returns logits.

    \b
    Example:
      mlora-export onnx ./nested --base-model ./my-model --output ./onnx-out                  # dynamic rank
      mlora-export onnx ./nested --base-model ./my-model --rank 8 --output ./onnx-r8           # fixed rank 8
      mlora-export onnx ./nested --base-model ./my-model --rank 8 --merged --output ./onnx-m8  # merged
      mlora-export onnx ./nested --base-model ./my-model --adapters-per-rank --output ./ort    # ORT adapter files
      mlora-export onnx ./nested --base-model ./my-model --genai --output ./genai             # onnxruntime-genai, lora_rank
      mlora-export onnx ./nested --base-model ./my-model --genai --adapters-per-rank -o ./ga  # onnxruntime-genai, Adapters
    """
    from ..converters.onnx import export_genai, export_onnx
    from ..fs import check_output_path

    check_output_path(output, force)  # before a Hub model is downloaded
    base_dir = base.resolve()
    export = export_genai if options.genai else export_onnx
    with BarProgress("onnx export", unit="step") as bar:
        res = export(adapter, base_dir, output, options, force=force, progress=bar)
    if as_json:
        echo_json(res.to_dict())
        return
    click.echo(f"{res.kind} export ({res.task}, {res.exporter} exporter, opset {res.opset}) -> {res.model_path}")
    outputs = res.to_dict()["outputs"]
    shown = outputs if len(outputs) <= 3 else [outputs[0], f"{outputs[1]} … {outputs[-1]}"]
    click.echo(f"inputs: {', '.join(_collapse_kv(res.inputs))}; outputs: {', '.join(shown)}" + ("; external data" if res.external_data else ""))
    for k, path in res.adapter_files.items():
        click.echo(f"rank {k}: {res.path / path}")
    if res.checks:
        echo_table(
            ["rank", "max abs diff", "tolerance", "ok"],
            [[c.rank, f"{c.max_abs_diff:.3g}", f"{c.tolerance:.3g}", "yes" if c.ok else "NO"] for c in res.checks],
        )
    else:
        click.echo("not verified (--no-verify)")
