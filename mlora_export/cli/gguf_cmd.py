"""``mlora-export gguf``: write llama.cpp LoRA adapters (GGUF), one file per rank."""

from __future__ import annotations

import click

from ..converters.gguf import GgufOptions
from ._errors import handle_errors
from ._options import BarProgress, BaseModelArg, adapter_argument, base_model_option, collect, echo_json
from ._options import echo_table, field_options, force_option, json_option, output_option, ranks_option


@click.command("gguf")
@adapter_argument
@ranks_option()
@output_option("Folder to create; one r{k}.gguf per rank.")
@base_model_option("The base model folder, or just its config.json (only the config is read), or a Hub model id (only its config.json "
                   "is downloaded). [default: the adapter's recorded base, if it is a local folder]")
@field_options(GgufOptions, "arch", "out_type", "scale_mode", "name")
@force_option
@json_option
@handle_errors
@collect(GgufOptions, "options")
def gguf(adapter: str, ranks: tuple[int, ...] | str, output: str, base: BaseModelArg, options: GgufOptions, force: bool, as_json: bool) -> None:
    """Write one llama.cpp LoRA adapter (GGUF) per rank of a nested ADAPTER.

    Each file is what llama.cpp's convert_lora_to_gguf.py writes for that rank's PEFT slice.

    \b
    Example:
      mlora-export gguf ./nested --ranks 8,16 --base-model ./Llama-3.2-1B --output ./gguf
      llama-cli -m base.gguf --lora ./gguf/r8.gguf -p "Hello"
    """
    from ..converters.gguf import export_gguf

    base_model = None
    if base.spec is not None or base.revision is not None:
        if base.spec is not None:
            from ..fs import check_output_path

            check_output_path(output, force)  # before a Hub config is downloaded
        base_model = str(base.resolve(config_only=True))
    with BarProgress("writing GGUF") as bar:
        results = export_gguf(adapter, ranks, output, options, base_model=base_model, force=force, progress=bar)
    if as_json:
        echo_json([r.to_dict() for r in results])
        return
    echo_table(["rank", "path", "alpha", "tensors", "bytes", "type"],
               [[r.rank, r.path, f"{r.alpha:.6g}", r.tensors, r.bytes, r.out_type] for r in results])
