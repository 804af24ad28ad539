"""Map library exceptions to one-line messages and exit codes, in one table.

Exit codes come from the table :data:`EXIT_CODES` (the first type that matches wins): 2 for bad
usage or input, 1 for a failure elsewhere (the Hub, a failed verification). The library speaks
its own terms; an error's ``option`` field names the library parameter at fault, and
:data:`FLAG_HINTS` turns it into the command-line flag to use. Every error is one line on
stderr; a traceback is shown only when ``MLORA_DEBUG=1``.

Without ``-v``, library warnings are held until the command ends: shown after a success,
dropped after an error. While a command runs, ``SIGTERM`` and ``SIGHUP`` are handled like Ctrl-C: they raise an
interrupt in the main thread, so every temporary output is removed before the process exits
(with ``128 + signal``). The command's path arguments are declared as protected inputs
(:func:`mlora_export.fs.protected_inputs`), so no output of the command can replace one.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import click

from ..errors import (
    ExportError,
    HubError,
    HubInputError,
    MloraError,
    OutputExistsError,
    RemoteIntegrityError,
)
from ..converters.gguf import GgufOptions
from ..converters.hub.bundle import BundleOptions
from ..converters.hub.choose import RankBudget
from ..converters.hub.push import PushOptions
from ..converters.onnx.common import OnnxExportOptions
from ..evaluation.options import EvalOptions, LmEvalTasks
from ..params import flag_hints
from ..training.recipe import NestedRecipe
from ..urls import redact_url

F = TypeVar("F", bound=Callable[..., Any])

#: Exit code of each exception type, most specific first; anything else exits 1. A
#: :class:`RecursionError` reaches the CLI only from a hostile input file (bad input).
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (RemoteIntegrityError, 1),  # a corrupt or changed remote copy: not the user's input
    (ExportError, 1),
    (HubInputError, 2),  # a Hub id, revision or token that cannot be used: bad input
    (HubError, 1),
    (MloraError, 2),
    (RecursionError, 2),
)

#: The hints of the options that are no field of a library option dataclass (the flag of each
#: dataclass field comes with the field: :func:`mlora_export.params.param`).
_OTHER_HINTS: dict[str, str] = {
    "force": "or pass --force to replace it",
    "ranks": "see --ranks",
    "rank": "see --rank",
    "max_length": "see --max-length",
    "max_steps": "see --epochs / --max-steps",
    "revision": "see --revision",
    "repo_id": "see --repo-id",
    "budget": "give --max-bytes, --max-params, --max-latency-ms, --min-score or --within",
    "rank_weights": "see --rank-weights",
    "report_to": "see --report-to",
    "load_in_4bit": "see --load-in-4bit",
    "bf16": "see --bf16",
    "resume": "see --resume",
    "run_dir": "see --run-dir",
    "eval_data": "see --eval-data",
    "eval_ranks": "see --eval-ranks",
    "eval_steps": "see --eval-steps",
    "save_steps": "see --save-steps",
    "warmup_ratio": "see --warmup-ratio / --warmup-steps",
    "chat_template": "pass --chat-template FILE",
    "data_split": "see --data-split",
    "data_config": "see --data-config",
    "data_columns": "see --data-columns",
    "data": "give --data, --tasks or both",
}

#: What to add to a message whose ``option`` names a library parameter: the flag(s) to use.
#: An error of type :class:`OutputExistsError` with option ``force`` gets its own wording.
FLAG_HINTS: dict[str, str] = {
    **flag_hints(OnnxExportOptions, EvalOptions, LmEvalTasks, RankBudget, BundleOptions, PushOptions, GgufOptions, NestedRecipe),
    **_OTHER_HINTS,
}

#: Signals handled like Ctrl-C while a command runs.
TERMINATING_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


#: Warnings logged while a command runs (without ``-v``), shown when it ends: after a success,
#: all of them; after an error, none, so that the error is the one line on stderr.
_held_warnings: list[str] = []


def hold_warning(line: str) -> None:
    _held_warnings.append(line)


def flush_warnings() -> None:
    """Print the held warnings on stderr (the command succeeded)."""
    lines, _held_warnings[:] = list(_held_warnings), []
    for line in lines:
        click.echo(line, err=True)


def drop_warnings() -> None:
    """Forget the held warnings (the command failed: its error is the one line shown)."""
    _held_warnings.clear()


class Terminated(KeyboardInterrupt):
    """``SIGTERM`` or ``SIGHUP`` arrived: unwinds like Ctrl-C, so outputs are cleaned up."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def debug_enabled() -> bool:
    return os.environ.get("MLORA_DEBUG", "") not in ("", "0", "false", "False")


def exit_code_for(exc: BaseException) -> int:
    """The exit code of ``exc`` from :data:`EXIT_CODES`; 1 for anything not in the table."""
    for cls, code in EXIT_CODES:
        if isinstance(exc, cls):
            return code
    return 1


def flag_hint(exc: MloraError) -> str | None:
    """The command-line hint for the library parameter ``exc.option`` names, if any."""
    return FLAG_HINTS.get(exc.option) if exc.option else None


def usage_message(exc: click.ClickException) -> str:
    """The one-line message for a click usage error (a bad, missing or unknown option or
    command), with where to read the command's options."""
    text = " ".join(exc.format_message().split()).rstrip()
    ctx = getattr(exc, "ctx", None)
    if isinstance(exc, click.UsageError) and ctx is not None:
        text = f"{text.rstrip('.')} (see '{ctx.command_path} --help')"
    return redact_url(text)


def message_for(exc: BaseException) -> str:
    """The one-line message for ``exc`` (URLs in it shown without their credentials)."""
    from ..fs import disk_full_error

    if isinstance(exc, MloraError):
        text = str(exc)
        hint = flag_hint(exc)
        if hint:
            text = f"{text.rstrip('. ')} {hint}" if isinstance(exc, OutputExistsError) else f"{text.rstrip('. ')} ({hint})"
    elif isinstance(exc, RecursionError):
        text = "an input file is nested too deeply to read (a JSON array or object thousands of levels deep); fix or re-create it"
    elif isinstance(exc, OSError) and disk_full_error(exc, exc.filename or ".") is not None:
        text = str(disk_full_error(exc, exc.filename or "."))
    else:
        text = f"{type(exc).__name__}: {exc}"
        if not debug_enabled():
            text += " (set MLORA_DEBUG=1 for a traceback)"
    return redact_url(" ".join(text.split()))


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """Within the block (main thread only), ``SIGTERM``/``SIGHUP`` raise :class:`Terminated`."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Terminated(signum)

    previous = {}
    for sig in TERMINATING_SIGNALS:
        with contextlib.suppress(OSError, ValueError):
            previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            with contextlib.suppress(OSError, ValueError, TypeError):
                signal.signal(sig, old)


def _path_arguments() -> list[tuple[str, str]]:
    """``(value, option name)`` of the running command's path arguments other than its output
    (read from the parsed values, so that options handed on as one object count too)."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return []
    paths: list[tuple[str, str]] = []
    for param in ctx.command.params:
        if not isinstance(param.type, click.Path) or param.name in ("output", None):
            continue
        label = param.opts[0] if isinstance(param, click.Option) else param.name.upper()
        value = ctx.params.get(param.name)
        if isinstance(value, (tuple, list)):
            paths.extend((str(v), label) for v in value if v is not None)
        elif value is not None:
            paths.append((str(value), label))
    return paths


def handle_errors(func: F) -> F:
    """Run a command body; turn an exception into ``error: <message>`` on stderr and an exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from ..fs import protected_inputs

        try:
            with _terminate_as_interrupt(), protected_inputs(_path_arguments()):
                return func(*args, **kwargs)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Terminated as exc:
            drop_warnings()
            name = signal.Signals(exc.signum).name
            click.echo(f"error: stopped by {name}; no output was written", err=True)
            sys.exit(128 + exc.signum)
        except KeyboardInterrupt:
            drop_warnings()
            click.echo("error: interrupted; no output was written", err=True)
            sys.exit(130)
        except Exception as exc:  # the one place that turns errors into exit codes
            if debug_enabled():
                logging.getLogger("mlora_export").exception("command failed")
            drop_warnings()
            click.echo(f"error: {message_for(exc)}", err=True)
            sys.exit(exit_code_for(exc))

    return wrapper  # type: ignore[return-value]
