"""``mlora-export merge``: fold one rank of a nested adapter into the base model's weights."""

from __future__ import annotations

import click

from ..converters.merge import OUTPUT_DTYPES
from ..units import human_bytes
from ._errors import handle_errors
from ._options import INT, BarProgress, BaseModelArg, base_model_options, echo_json, force_option, json_option


@click.command("merge")
@click.argument("adapter", type=click.Path(path_type=str))
@base_model_options
@click.option("--rank", "-r", required=True, type=INT, help="The rank k to merge: W + s(k)·B[:, :k]·A[:k].")
@click.option("--output", "-o", required=True, type=click.Path(path_type=str), help="Model folder to create.")
@click.option("--dtype", type=click.Choice(list(OUTPUT_DTYPES)), default=None,
              help="Cast every float tensor of the output (default: keep the base's dtypes and bytes).")
@force_option
@json_option
@handle_errors
def merge(adapter: str, base: BaseModelArg, rank: int, output: str, dtype: str | None, force: bool, as_json: bool) -> None:
    """Merge one rank (--rank K) of a nested ADAPTER (or a PEFT LoRA slice) into a base model, shard by shard.

    The output has the base's shard names, tensor order and index; untouched tensors are
    byte-identical, and it loads with AutoModelForCausalLM.from_pretrained. Memory stays at a
    few tensors whatever the model size.

    \b
    Example:
      mlora-export merge ./nested --base-model ./Llama-3.2-1B --rank 8 --output ./merged-r8
    """
    from ..converters.merge import merge_adapter
    from ..fs import check_output_path

    check_output_path(output, force)  # before a Hub model is downloaded
    base_dir = base.resolve()
    with BarProgress("merging") as bar:
        result = merge_adapter(adapter, base_dir, rank, output, dtype=dtype, force=force, progress=bar)
    if as_json:
        echo_json(result.to_dict())
        return
    click.echo(
        f"merged rank {result.rank} (s = {result.scale:.6g}) into {result.merged_tensors} weights; "
        f"{result.copied_tensors} tensors copied unchanged; {len(result.shards)} shard(s), "
        f"{human_bytes(result.bytes)} in {result.seconds:.1f} s → {result.path}"
    )
