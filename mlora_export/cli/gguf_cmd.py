"""``mlora-export gguf``: write llama.cpp LoRA adapters (GGUF), one file per rank."""

from __future__ import annotations

import click

from ..converters.gguf import OUT_TYPES
from ._errors import handle_errors
from ._options import (
    BarProgress,
    adapter_argument,
    echo_json,
    echo_table,
    force_option,
    json_option,
    ranks_option,
    scale_mode_option,
)


@click.command("gguf")
@adapter_argument
@ranks_option
@click.option("--output", "-o", required=True, type=click.Path(path_type=str), help="Folder to create; one r{k}.gguf per rank.")
@click.option("--base-model", "base_model", type=click.Path(path_type=str), default=None,
              help="The base model folder, or just its config.json (only the config is read), or a Hub model id (only its config.json "
                   "is downloaded). [default: the adapter's recorded base, if it is a local folder]")
@click.option("--revision", default=None, help="Branch, tag or commit of a Hub --base-model.  [default: main]")
@click.option("--arch", default=None,
              help="Name the architecture (llama, mistral, qwen2, qwen3, gpt2) for a base that is not local; Llama-family bases still need --base-model (head counts).")
@click.option("--outtype", "out_type", type=click.Choice(list(OUT_TYPES)), default=None,
              help="Tensor type, as convert_lora_to_gguf.py --outtype. [default: the adapter's dtype]")
@scale_mode_option(
    "baked: s(k) folded into lora_b, alpha = k; native: exact prefix, alpha = s(k)·k. llama.cpp applies alpha/k either way.")
@click.option("--name", default="{adapter}-r{rank}", show_default=True, help="general.name of each file ({adapter}: the adapter folder's name, {rank}: the rank).")
@force_option
@json_option
@handle_errors
def gguf(adapter: str, ranks: tuple[int, ...] | str, output: str, base_model: str | None, revision: str | None, arch: str | None, out_type: str | None,
         scale_mode: str, name: str, force: bool, as_json: bool) -> None:
    """Write one llama.cpp LoRA adapter (GGUF) per rank of a nested ADAPTER.

    Each file is what llama.cpp's convert_lora_to_gguf.py writes for that rank's PEFT slice.

    \b
    Example:
      mlora-export gguf ./nested --ranks 8,16 --base-model ./Llama-3.2-1B --output ./gguf
      llama-cli -m base.gguf --lora ./gguf/r8.gguf -p "Hello"
    """
    from ..base import resolve_base_model
    from ..converters.gguf import export_gguf

    if base_model is not None:
        from ..fs import check_output_path

        check_output_path(output, force)  # before a Hub config is downloaded
        base_model = str(resolve_base_model(base_model, revision=revision, config_only=True))
    elif revision is not None:
        from ..errors import ConfigError

        raise ConfigError("a revision applies to a Hub --base-model; give one", option="revision")
    with BarProgress("writing GGUF") as bar:
        results = export_gguf(adapter, ranks, output, base_model=base_model, arch=arch, out_type=out_type, scale_mode=scale_mode,
                              name=name, force=force, progress=bar)
    if as_json:
        echo_json([r.to_dict() for r in results])
        return
    echo_table(["rank", "path", "alpha", "tensors", "bytes", "type"],
               [[r.rank, r.path, f"{r.alpha:.6g}", r.tensors, r.bytes, r.out_type] for r in results])
