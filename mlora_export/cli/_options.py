"""Shared click parameter types, options and output helpers for the commands."""

from __future__ import annotations

import contextlib
import json
import math
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any

import click

from ..adapter.ranks import SCALE_MODES
from ..validate import ascii_int

#: Numbers on the command line are read in ASCII only: ``int()`` and ``float()`` also take
#: ``"٨"`` (Arabic-Indic eight), ``"1_0"`` and surrounding spaces, which are typos, not numbers.
_ASCII_INT = re.compile(r"[+-]?[0-9]+")
_ASCII_FLOAT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _check_ascii_int(param_type: click.ParamType, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> None:
    if isinstance(value, str) and not _ASCII_INT.fullmatch(value):
        param_type.fail(f"{value!r} is not an integer (digits 0-9 only)", param, ctx)


def _float(param_type: click.ParamType, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
    if isinstance(value, str) and not _ASCII_FLOAT.fullmatch(value):
        param_type.fail(f"{value!r} is not a number (digits 0-9, a point and an exponent only)", param, ctx)
    if isinstance(value, str) and not math.isfinite(float(value)):
        param_type.fail(f"{value!r} is beyond the range of numbers", param, ctx)
    return value


class AsciiInt(click.types.IntParamType):
    """``click.INT`` reading ASCII digits only."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        _check_ascii_int(self, value, param, ctx)
        return super().convert(value, param, ctx)


class AsciiIntRange(click.IntRange):
    """``click.IntRange`` reading ASCII digits only."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        _check_ascii_int(self, value, param, ctx)
        return super().convert(value, param, ctx)


class AsciiFloat(click.types.FloatParamType):
    """``click.FLOAT`` reading ASCII decimal numbers only, finite (no ``nan``, ``inf``, ``1e999``)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        return super().convert(_float(self, value, param, ctx), param, ctx)


class AsciiFloatRange(click.FloatRange):
    """``click.FloatRange`` reading ASCII decimal numbers only, finite."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        return super().convert(_float(self, value, param, ctx), param, ctx)


INT = AsciiInt()
FLOAT = AsciiFloat()


class RankList(click.ParamType):
    """``--ranks 8,16`` → ``(8, 16)`` sorted and de-duplicated; ``all`` passes through when allowed."""

    name = "ranks"

    def __init__(self, allow_all: bool = True) -> None:
        self.allow_all = allow_all

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[int, ...] | str:
        if isinstance(value, tuple):
            return value
        text = str(value).strip()
        if self.allow_all and text == "all":
            return "all"
        ranks = []
        for part in text.split(","):
            part = part.strip()
            k = ascii_int(part)
            if k is None:
                self.fail(f"{part!r} in {text!r} is not an integer (digits 0-9); give ranks like 8,16" + (" or 'all'" if self.allow_all else ""), param, ctx)
            if k < 1:
                self.fail(f"rank {k} in {text!r} must be at least 1", param, ctx)
            ranks.append(k)
        if not ranks:
            self.fail("no ranks given", param, ctx)
        return tuple(sorted(set(ranks)))


class NumberList(click.ParamType):
    """``--rank-weights 1,1,2`` → ``(1.0, 1.0, 2.0)``."""

    name = "numbers"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[float, ...]:
        if isinstance(value, tuple):
            return value
        parts = [w.strip() for w in str(value).split(",")]
        if not all(_ASCII_FLOAT.fullmatch(w) and math.isfinite(float(w)) for w in parts):
            self.fail(f"{value!r} is not a comma-separated list of numbers", param, ctx)
        return tuple(float(w) for w in parts)


class ModuleList(click.ParamType):
    """``--target-modules all-linear`` passes through; ``q_proj,v_proj`` → ``("q_proj", "v_proj")``."""

    name = "modules"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str | tuple[str, ...]:
        if isinstance(value, tuple):
            return value
        text = str(value).strip()
        if text == "all-linear":
            return text
        return tuple(t.strip() for t in text.split(",") if t.strip())


def base_model_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--base-model`` (a local folder or a Hub model id) and ``--revision`` (the Hub id's branch, tag or commit), required."""
    func = click.option("--revision", default=None, help="Branch, tag or commit of a Hub --base-model.  [default: main]")(func)
    return click.option("--base-model", required=True, type=click.Path(path_type=str),
                        help="Local transformers model folder (config.json, *.safetensors, tokenizer), or a Hub model id "
                             "(org/name: config, tokenizer and safetensors files are downloaded into the Hugging Face cache).")(func)


def data_options(split_default: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--data`` (a local file or a Hub dataset id) with ``--data-split``, ``--data-config``,
    ``--data-columns``, and the chat-data options ``--chat-template``."""

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        func = click.option("--chat-template", "chat_template", type=click.Path(path_type=str), default=None,
                            help="Jinja file with the chat template that renders conversations, instead of (or for a tokenizer "
                                 "without) the tokenizer's own.")(func)
        func = click.option("--data-columns", default=None,
                            help="Rename data fields to record keys, e.g. question=prompt,answer=completion or "
                                 "conversation=messages (only the mapped fields are kept).")(func)
        func = click.option("--data-config", default=None, help="Config (subset) name of a Hub dataset.")(func)
        func = click.option("--data-split", default=None, help=f"Split of a Hub dataset.  [default: {split_default}]")(func)
        return click.option(
            "--data", "data", required=True, type=click.Path(path_type=str),
            help="A .jsonl, .json or .parquet file, or a Hub dataset id (org/name); one record kind per source: "
                 '{"text"}, {"prompt", "completion"} strings, {"messages": [{"role", "content"}, ...]}, or '
                 '{"prompt": [messages], "completion": [messages]}.')(func)

    return decorate


def adapter_argument(func: Callable[..., Any]) -> Callable[..., Any]:
    """The ``ADAPTER`` argument of the commands that read one nested adapter."""
    return click.argument("adapter", type=click.Path(path_type=str))(func)


def ranks_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--ranks 8,16`` or ``all`` (the train ranks), required."""
    return click.option("--ranks", required=True, type=RankList(), help="Comma-separated ranks (e.g. 8,16) or 'all' for the train ranks.")(func)


def scale_mode_option(help: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--scale-mode baked|native`` (default ``baked``): how a written slice expresses ``s(k)``,
    one choice list and default for every command that writes slices; ``help`` says it in the command's terms."""
    return click.option("--scale-mode", type=click.Choice(list(SCALE_MODES)), default="baked", show_default=True, help=help)


def force_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--force", is_flag=True, help="Replace an existing output.")(func)


def json_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout.")(func)


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def echo_table(headers: list[str], rows: list[list[Any]]) -> None:
    """Print a plain aligned table on stdout."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for j, row in enumerate(cells):
        click.echo("  ".join(c.rjust(w) if j and c[:1].isdigit() else c.ljust(w) for c, w in zip(row, widths)).rstrip())


class BarProgress:
    """A ``progress(done, total)`` callback that draws a tqdm bar on stderr (hidden when not a TTY)."""

    def __init__(self, desc: str, unit: str = "B") -> None:
        self.desc = desc
        self.unit = unit
        self._bar: Any = None

    def __call__(self, done: int, total: int) -> None:
        from tqdm.auto import tqdm

        if self._bar is None:
            self._bar = tqdm(total=total, desc=self.desc, unit=self.unit, unit_scale=self.unit == "B", leave=False, disable=None)
        self._bar.total = total
        self._bar.n = done
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "BarProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def quiet_transformers_bars() -> Iterator[None]:
    """Hide transformers' own progress bars (weight loading) while a command shows its own; restore after."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def threads_option(func: Any) -> Any:
    """``--threads N``: torch intra-op threads of this process (default: torch's, one per core)."""
    return click.option(
        "--threads", type=AsciiIntRange(min=1), default=None,
        help="torch intra-op threads of this process. [default: torch's, one per core, or OMP_NUM_THREADS] "
             "On a machine shared with other jobs, or with several processes per machine, 1 is often much faster.",
    )(func)


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send what the block prints on stdout to stderr, so that stdout holds only the command's result.

    Libraries loaded while training write there: DeepSpeed's logger prints on stdout (from its
    import on, which ``transformers.Trainer`` triggers whenever DeepSpeed is installed).
    """
    with contextlib.redirect_stdout(sys.stderr):
        yield


@contextlib.contextmanager
def maybe_torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch threads (``None``: leave the count alone), restoring it after."""
    if n is None:
        yield
        return
    from ..threads import torch_threads

    with torch_threads(n):
        yield
