"""The ``mlora-export`` click group; each command lives in its own module of this package."""

from __future__ import annotations

import logging

import click

from .. import __version__
from . import inspect_cmd, slice_cmd


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="mlora-export")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """Turn one MatryoshkaLoRA fine-tuning run into every rank a deployment needs.

    \b
    Example:
      mlora-export demo ./demo-out
      mlora-export slice ./nested --ranks 8,16 --output ./slices
    """
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s: %(message)s")
    logging.getLogger("mlora_export").setLevel(level)


main.add_command(inspect_cmd.inspect)
main.add_command(slice_cmd.slice_)
