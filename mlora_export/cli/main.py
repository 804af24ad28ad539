"""The ``mlora-export`` click group; each command lives in its own module of this package."""

from __future__ import annotations

import logging
import os
import sys
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import click

from .._version import __version__
from ..urls import redact_url
from . import (
    demo_cmd,
    eval_cmd,
    gguf_cmd,
    hub_cmd,
    inspect_cmd,
    merge_cmd,
    onnx_cmd,
    renest_cmd,
    slice_cmd,
    train_cmd,
)
from ._errors import flush_warnings, hold_warning, usage_message

#: ``ctx.meta`` keys: the group's ``-v`` count and the function that applies a verbosity; whether
#: the group set ``TRANSFORMERS_VERBOSITY`` itself (so that a later ``-v`` may lift it).
_VERBOSITY = "mlora_export.verbosity"
_SET_TRANSFORMERS_VERBOSITY = "mlora_export.set_transformers_verbosity"


def _command_verbosity(ctx: click.Context, param: click.Parameter, value: int) -> None:
    """``-v`` given after the command name: add it to the group's count and apply the sum."""
    if value and _VERBOSITY in ctx.meta:
        before, apply = ctx.meta[_VERBOSITY]
        apply(before + value)


class _Group(click.Group):
    """The ``mlora-export`` group: a usage error (a bad or missing option, an unknown command) is
    one line on stderr and exit code 2, as every other error is, not click's three-line
    ``Usage:`` / ``Try …`` / ``Error:`` block."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:  # the bare command: its help, as click shows it
            e.show()
            sys.exit(e.exit_code)
        except click.ClickException as e:
            click.echo(f"error: {usage_message(e)}", err=True)
            sys.exit(e.exit_code)
        except click.exceptions.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) and not isinstance(rv, bool) else 0)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="mlora-export")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.pass_context
def main(ctx: click.Context, verbose: int) -> None:
    """Turn one nested-adapter fine-tuning run into every rank a deployment needs.

    \b
    Example:
      mlora-export demo ./demo-out
      mlora-export slice ./nested --ranks 8,16 --output ./slices
    """
    logger = logging.getLogger("mlora_export")
    saved = (logger.level, logger.propagate)
    handler = _EchoHandler()
    logger.addHandler(handler)
    logger.propagate = False

    def set_verbosity(n: int) -> None:
        logger.setLevel(logging.WARNING if n == 0 else logging.INFO if n == 1 else logging.DEBUG)
        handler.hold = n == 0
        if n > 0 and os.environ.get("TRANSFORMERS_VERBOSITY") == "error" and ctx.meta.get(_SET_TRANSFORMERS_VERBOSITY):
            os.environ.pop("TRANSFORMERS_VERBOSITY")  # -v after the command: transformers' warnings too
        if n > 0:
            logging.getLogger("DeepSpeed").removeFilter(_errors_only)

    set_verbosity(verbose)
    ctx.meta[_VERBOSITY] = (verbose, set_verbosity)

    def restore() -> None:
        # Leave the process as we found it (matters when the CLI is called in-process, e.g. by tests).
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        flush_warnings()

    ctx.call_on_close(restore)
    ctx.call_on_close(_quiet_libraries(verbose))
    # PEFT 0.21 calls a name transformers 5 deprecated; the FutureWarning is noise for our users.
    ctx.with_resource(warnings.catch_warnings())
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def _quiet_libraries(verbose: int) -> Callable[[], None]:
    """One line per error on stderr: without ``-v``, transformers logs errors only, and no
    library draws progress bars when stderr is not a terminal (a log file, a pipe). Set through
    the variables the libraries read at import (and their switches, when already imported);
    returns the function that restores them."""
    saved = {k: os.environ.get(k) for k in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS")}
    bars_off = hf_bars_off = False
    if verbose == 0 and "TRANSFORMERS_VERBOSITY" not in os.environ:
        os.environ["TRANSFORMERS_VERBOSITY"] = "error"
        click.get_current_context().meta[_SET_TRANSFORMERS_VERBOSITY] = True
    # DeepSpeed (imported by transformers' Trainer when installed) logs a warning on every import
    # on a machine without a GPU ("Setting accelerator to CPU"): errors only, as transformers.
    deepspeed_logger = logging.getLogger("DeepSpeed")
    if verbose == 0:
        deepspeed_logger.addFilter(_errors_only)
    if not _stderr_is_terminal():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        if "huggingface_hub" in sys.modules:
            import huggingface_hub.utils as hub_utils

            if not hub_utils.are_progress_bars_disabled():
                hub_utils.disable_progress_bars()
                bars_off = True
        if "transformers" in sys.modules:
            from transformers.utils import logging as hf_logging

            if hf_logging.is_progress_bar_enabled():
                hf_logging.disable_progress_bar()
                hf_bars_off = True

    def restore() -> None:
        deepspeed_logger.removeFilter(_errors_only)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if bars_off:
            import huggingface_hub.utils as hub_utils

            hub_utils.enable_progress_bars()
        if hf_bars_off:
            from transformers.utils import logging as hf_logging

            hf_logging.enable_progress_bar()

    return restore


def _errors_only(record: logging.LogRecord) -> bool:
    """A logging filter that keeps errors and drops warnings and below."""
    return record.levelno >= logging.ERROR


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class _EchoHandler(logging.Handler):
    """Send library log records to stderr through click (so they follow click's stream handling).

    With ``hold``, warnings are held until the command ends (see :func:`._errors.flush_warnings`).
    """

    def __init__(self, hold: bool = False) -> None:
        super().__init__()
        self.hold = hold

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = f"{record.levelname.lower()}: {record.getMessage()}"
            if record.exc_info:
                message += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip()
            message = redact_url(message)  # an endpoint's credentials are never shown
            if self.hold and record.levelno == logging.WARNING:
                hold_warning(message)
                return
            click.echo(message, err=True)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


#: Every command of ``mlora-export`` (``--help`` lists them by name).
COMMANDS: tuple[click.Command, ...] = (
    inspect_cmd.inspect, slice_cmd.slice_, renest_cmd.renest, merge_cmd.merge, hub_cmd.bundle, hub_cmd.push_hub, hub_cmd.pull,
    demo_cmd.demo, train_cmd.train, onnx_cmd.onnx, gguf_cmd.gguf, eval_cmd.eval_,
)
for _command in COMMANDS:
    main.add_command(_command)

# The verbosity options work after the command name too (`mlora-export onnx ... -v`).
for _command in main.commands.values():
    _command.params.append(click.Option(["-v", "--verbose"], count=True, expose_value=False, is_eager=True,
                                        callback=_command_verbosity, help="More log output (-vv for debug)."))
