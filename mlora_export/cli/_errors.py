"""Map library exceptions to one-line messages and exit codes, in one table.

A traceback is shown only when ``MLORA_DEBUG=1``.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from ..errors import MloraError

F = TypeVar("F", bound=Callable[..., Any])


def debug_enabled() -> bool:
    return os.environ.get("MLORA_DEBUG", "") not in ("", "0", "false", "False")


def exit_code_for(exc: BaseException) -> int:
    """2 for bad usage or input (most :class:`MloraError`), 1 for everything else."""
    if isinstance(exc, MloraError):
        return exc.exit_code
    return 1


def handle_errors(func: F) -> F:
    """Run a command body; turn an exception into ``error: <message>`` on stderr and an exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt:
            click.echo("error: interrupted; no output was written", err=True)
            sys.exit(130)
        except Exception as exc:  # noqa: BLE001 - the one place that turns errors into exit codes
            if debug_enabled():
                logging.getLogger("mlora_export").exception("command failed")
            message = str(exc) if isinstance(exc, MloraError) else f"{type(exc).__name__}: {exc}"
            click.echo(f"error: {message}", err=True)
            if not isinstance(exc, MloraError) and not debug_enabled():
                click.echo("(set MLORA_DEBUG=1 for a traceback)", err=True)
            sys.exit(exit_code_for(exc))

    return wrapper  # type: ignore[return-value]
