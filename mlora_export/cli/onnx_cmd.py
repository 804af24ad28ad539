"""``mlora-export onnx``: export a nested adapter on its base model to ONNX, verified in ONNX Runtime."""

from __future__ import annotations

import click

from ._errors import handle_errors
from ._options import INT, AsciiIntRange, BarProgress, base_model_options, echo_json, echo_table, force_option, json_option


def _collapse_kv(names: list[str]) -> list[str]:
    """``past_key_values.0.key … past_key_values.{n}.value`` shown as one item."""
    past = [n for n in names if n.startswith("past_key_values.")]
    if len(past) <= 2:
        return names
    rest = [n for n in names if not n.startswith("past_key_values.")]
    at = names.index(past[0])
    return rest[:at] + [f"past_key_values.{{0..{len(past) // 2 - 1}}}.key/value"] + rest[at:]


@click.command("onnx")
@click.argument("adapter", type=click.Path(path_type=str))
@base_model_options
@click.option("--output", "-o", required=True, type=click.Path(path_type=str), help="Folder to create (model.onnx, export_info.json, …).")
@click.option("--rank", type=AsciiIntRange(min=1), default=None, help="Fixed-rank export at rank K (default: the rank is a runtime input).")
@click.option("--merged", is_flag=True, help="With --rank: merge the rank-K delta into the weights (no LoRA ops in the graph).")
@click.option("--adapters-per-rank", is_flag=True,
              help="One model with the LoRA weights as inputs, plus adapters/r{k}.onnx_adapter per train rank (onnxruntime.LoraAdapter).")
@click.option("--genai", is_flag=True,
              help="A decoder with a KV cache (past_key_values.* in, present.* out) and genai_config.json for onnxruntime-genai "
                   "(Llama, Qwen2); the rank is the lora_rank input, or with --adapters-per-rank one adapter file per train rank.")
@click.option("--opset", type=INT, default=18, show_default=True, help="ONNX opset to write (14 to 25).")
@click.option("--no-verify", is_flag=True, help="Skip the ONNX Runtime vs PyTorch check at every train rank.")
@click.option("--provider", default="CPUExecutionProvider", show_default=True,
              help="ONNX Runtime execution provider for verification, e.g. CUDAExecutionProvider (needs pip install '.[gpu]').")
@force_option
@json_option
@handle_errors
def onnx(
    adapter: str, base_model: str, revision: str | None, output: str, rank: int | None, merged: bool, adapters_per_rank: bool, genai: bool, opset: int,
    no_verify: bool, provider: str, force: bool, as_json: bool,
) -> None:
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
    from ..base import resolve_base_model
    from ..converters.onnx import export_onnx

    from ..fs import check_output_path

    check_output_path(output, force)  # before a Hub model is downloaded
    base = resolve_base_model(base_model, revision=revision)
    with BarProgress("onnx export", unit="step") as bar:
        res = export_onnx(
            adapter, base, output, rank=rank, merged=merged, adapters_per_rank=adapters_per_rank, opset=opset,
            verify=not no_verify, force=force, provider=provider, progress=bar, genai=genai,
        )
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
