"""Shared click parameter types, options and output helpers for the commands."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click

from ..adapter.ranks import SCALE_MODES
from ..params import fields_of
from ..validate import ascii_int

F = TypeVar("F", bound=Callable[..., Any])

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


class MetricName(click.ParamType):
    """A metric: one of ours (``loss``, ``accuracy``, ``exact-match``) or an lm-eval task metric ``task:metric[:filter]``."""

    name = "metric"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from ..evaluation.scoring import METRICS
        from ..metric_names import is_task_metric

        text = str(value)
        if text in METRICS or is_task_metric(text):
            return text
        self.fail(f"{text!r} is neither {', '.join(METRICS)} nor an lm-eval task metric such as gsm8k:exact_match or arc_easy:acc_norm", param, ctx)


class NameList(click.ParamType):
    """``--tasks gsm8k,arc_easy`` → ``("gsm8k", "arc_easy")``: comma-separated names, none empty."""

    name = "names"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[str, ...]:
        if isinstance(value, tuple):
            return value
        parts = tuple(t.strip() for t in str(value).split(","))
        if not all(parts):
            self.fail(f"{value!r} has an empty name; give comma-separated names such as gsm8k,arc_easy", param, ctx)
        return parts


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


# -- options generated from the library's option dataclasses --------------------------------------


class FieldOption(click.Option):
    """A click option made from a field of an option dataclass (:func:`field_options`); it
    remembers the class and the field, so that :func:`collect` can build the object."""

    def __init__(self, *args: Any, field_of: tuple[type, str, bool], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.field_of = field_of  # (the dataclass, the field's name, whether the flag negates it)


def field_option(cls: type, name: str, **override: Any) -> Callable[[F], F]:
    """The click option of field ``name`` of ``cls``, from its metadata (:func:`mlora_export.params.param`):
    its flag, help, default, choices and bounds; ``override`` replaces any of click's arguments."""
    f = fields_of(cls)[name]
    meta = f.metadata
    flag = meta["flag"]
    negate = bool(meta.get("negate"))
    decls = [flag] if negate or flag.lstrip("-").replace("-", "_") == name else [flag, name]
    kwargs: dict[str, Any] = {"help": meta["help"]}
    if negate or isinstance(f.default, bool):
        kwargs["is_flag"] = True
    else:
        kwargs["default"] = f.default
        kwargs["type"] = _click_type(f.type, meta)
    if meta.get("show_default"):
        kwargs["show_default"] = True
    if meta.get("metavar"):
        kwargs["metavar"] = meta["metavar"]
    kwargs.update(override)
    return click.option(*decls, cls=FieldOption, field_of=(cls, name, negate), **kwargs)


def _click_type(annotation: Any, meta: Mapping[str, Any]) -> Any:
    """The click type of a field: its choices, an ASCII number (bounded when ``min``/``max`` are
    given), a path, or text."""
    text = str(annotation)
    if meta.get("choices"):
        return click.Choice(list(meta["choices"]))
    bounds = {k: meta[k] for k in ("min", "max", "min_open") if k in meta}
    if text.startswith("int"):
        return AsciiIntRange(**bounds) if bounds else INT
    if text.startswith("float"):
        return AsciiFloatRange(**bounds) if bounds else FLOAT
    if "PathLike" in text:
        return click.Path(path_type=str)
    return None


def field_options(cls: type, *names: str, overrides: Mapping[str, Mapping[str, Any]] | None = None) -> Callable[[F], F]:
    """The click options of fields ``names`` of ``cls``, in that order on ``--help``."""

    def decorate(func: F) -> F:
        for name in reversed(names):
            func = field_option(cls, name, **dict((overrides or {}).get(name, {})))(func)
        return func

    return decorate


def field_help(cls: type, name: str) -> str:
    """The help of field ``name`` of ``cls`` (for an option the CLI builds by hand)."""
    return str(fields_of(cls)[name].metadata["help"])


def collect(cls: type, target: str, also: Sequence[str] = ()) -> Callable[[F], F]:
    """Hand the command one ``cls`` object as ``target``, built from the values of its field options
    (:func:`field_options`) and of the options named in ``also`` (shared options whose parameter
    is a field of ``cls``, e.g. ``token``), instead of one parameter per option."""

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            values = {name: kwargs.pop(name) for name in also}
            for param in click.get_current_context().command.params:
                if isinstance(param, FieldOption) and param.field_of[0] is cls and param.name in kwargs:
                    _, name, negate = param.field_of
                    value = kwargs.pop(param.name)
                    values[name] = not value if negate else value
            kwargs[target] = cls(**values)
            return func(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def collect_into(target: str, build: Callable[..., Any], names: Mapping[str, str]) -> Callable[[F], F]:
    """Hand the command ``target=build(**values)`` instead of the options ``names`` maps (the
    command's parameter name → the keyword ``build`` takes), for options that are no
    :func:`field_options`."""

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            kwargs[target] = build(**{key: kwargs.pop(name) for name, key in names.items()})
            return func(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


# -- the shared options, defined once -----------------------------------------------------------


@dataclass(frozen=True)
class BaseModelArg:
    """``--base-model`` (a local folder or a Hub model id; ``None`` when an optional one is not
    given) with its ``--revision``."""

    spec: str | None
    revision: str | None = None

    @property
    def given(self) -> str:
        """The ``--base-model`` given (a required one always is).

        Raises:
            ConfigError: none was given.
        """
        if self.spec is None:
            from ..errors import ConfigError

            raise ConfigError("a base model is needed; give --base-model", option="base_model")
        return self.spec

    def resolve(self, config_only: bool = False) -> Path:
        """The local folder (a Hub id downloaded into the Hugging Face cache; ``config_only``: its config only).

        Raises:
            ConfigError: no ``--base-model`` (a ``--revision`` alone names nothing).
        """
        from ..base import resolve_base_model

        if self.spec is None:
            from ..errors import ConfigError

            raise ConfigError("a revision applies to a Hub --base-model; give one", option="revision")
        return resolve_base_model(self.spec, revision=self.revision, config_only=config_only)


BASE_MODEL_HELP = ("Local transformers model folder (config.json, *.safetensors, tokenizer), or a Hub model id "
                   "(org/name: config, tokenizer and safetensors files are downloaded into the Hugging Face cache).")


def revision_option(help: str, default: str | None = None, show_default: bool = False) -> Callable[[F], F]:
    """``--revision``: a branch, tag or commit (of a Hub base model, a repo to pull from, a branch to push to)."""
    return click.option("--revision", default=default, show_default=show_default, help=help)


def base_model_options(func: F) -> F:
    """``--base-model`` (a local folder or a Hub model id) and ``--revision`` (the Hub id's branch,
    tag or commit), required; the command gets them as one ``base`` (:class:`BaseModelArg`)."""
    return base_model_option(BASE_MODEL_HELP, required=True)(func)


def base_model_option(help: str, *, required: bool = False, revision: bool = True) -> Callable[[F], F]:
    """``--base-model`` (with ``--revision`` unless ``revision`` is false); the command gets them
    as one ``base`` (:class:`BaseModelArg`; its ``spec`` is ``None`` when an optional
    ``--base-model`` is not given)."""

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return func(*args, base=BaseModelArg(kwargs.pop("base_model"), kwargs.pop("revision") if revision else None), **kwargs)

        f: Any = wrapper
        if revision:
            f = revision_option("Branch, tag or commit of a Hub --base-model.  [default: main]")(f)
        extra: dict[str, Any] = {"required": True} if required else {"default": None}
        return click.option("--base-model", "base_model", type=click.Path(path_type=str), help=help, **extra)(f)  # type: ignore[no-any-return]

    return decorate


@dataclass(frozen=True)
class DataArgs:
    """``--data`` with ``--data-split``, ``--data-config``, ``--data-columns`` and ``--chat-template``,
    read when the command asks (so that its own checks keep their order)."""

    path: str | None
    split: str | None = None
    config: str | None = None
    columns: str | None = None
    chat_template_path: str | None = None

    def source(self) -> Any:
        """The :class:`~mlora_export.data.DataSource` (``--data-columns`` parsed); ``None`` without ``--data``."""
        from ..data import DataSource, parse_columns

        if self.path is None:
            return None
        return DataSource(self.path, split=self.split, config=self.config, columns=parse_columns(self.columns))

    def chat_template(self) -> str | None:
        """The Jinja text of ``--chat-template`` (``None`` without one)."""
        from ..data import read_chat_template

        return read_chat_template(self.chat_template_path) if self.chat_template_path is not None else None


def data_options(split_default: str, *, required: bool = True, extra_help: str = "") -> Callable[[F], F]:
    """``--data`` (a local file or a Hub dataset id) with ``--data-split``, ``--data-config``,
    ``--data-columns``, and the chat-data options ``--chat-template``; the command gets them as one
    ``data`` (:class:`DataArgs`). ``required=False`` where the command has other inputs
    (``eval --tasks``); ``extra_help`` ends the help of ``--data``."""

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            data = DataArgs(kwargs.pop("data"), kwargs.pop("data_split"), kwargs.pop("data_config"), kwargs.pop("data_columns"),
                            kwargs.pop("chat_template"))
            return func(*args, data=data, **kwargs)

        f: Any = wrapper
        f = click.option("--chat-template", "chat_template", type=click.Path(path_type=str), default=None,
                         help="Jinja file with the chat template that renders conversations, instead of (or for a tokenizer "
                              "without) the tokenizer's own.")(f)
        f = click.option("--data-columns", default=None,
                         help="Rename data fields to record keys, e.g. question=prompt,answer=completion or "
                              "conversation=messages (only the mapped fields are kept).")(f)
        f = click.option("--data-config", default=None, help="Config (subset) name of a Hub dataset.")(f)
        f = click.option("--data-split", default=None, help=f"Split of a Hub dataset.  [default: {split_default}]")(f)
        return click.option(  # type: ignore[no-any-return]
            "--data", "data", required=required, default=None, type=click.Path(path_type=str),
            help="A .jsonl, .json or .parquet file, or a Hub dataset id (org/name); one record kind per source: "
                 '{"text"}, {"prompt", "completion"} strings, {"messages": [{"role", "content"}, ...]}, or '
                 '{"prompt": [messages], "completion": [messages]}.' + extra_help)(f)

    return decorate


def adapter_argument(func: F) -> F:
    """The ``ADAPTER`` argument of the commands that read one nested adapter."""
    return click.argument("adapter", type=click.Path(path_type=str))(func)


def ranks_option(help: str = "Comma-separated ranks (e.g. 8,16) or 'all' for the train ranks.", *, required: bool = True,
                 default: str | None = None, allow_all: bool = True) -> Callable[[F], F]:
    """``--ranks 8,16`` or ``all`` (the train ranks)."""
    extra: dict[str, Any] = {"required": True} if required else {"default": default, "show_default": True}
    return click.option("--ranks", type=RankList(allow_all=allow_all), help=help, **extra)


def output_option(help: str) -> Callable[[F], F]:
    """``--output``/``-o``, the folder a command creates."""
    return click.option("--output", "-o", required=True, type=click.Path(path_type=str), help=help)


def scale_mode_option(help: str) -> Callable[[F], F]:
    """``--scale-mode baked|native`` (default ``baked``): how a written slice expresses ``s(k)``,
    one choice list and default for every command that writes slices; ``help`` says it in the command's terms."""
    return click.option("--scale-mode", type=click.Choice(list(SCALE_MODES)), default="baked", show_default=True, help=help)


def token_option(func: F) -> F:
    """``--token``: the Hub token (never printed)."""
    return click.option("--token", help="Hub token (default: HF_TOKEN, then the `hf auth login` cache). Never printed.")(func)


def endpoint_option(func: F) -> F:
    """``--endpoint``: the Hub URL."""
    return click.option("--endpoint", help="Hub URL for private deployments and mirrors (default: HF_ENDPOINT, then huggingface.co).")(func)


def force_option(func: F) -> F:
    """``--force``: replace an existing output."""
    return click.option("--force", is_flag=True, help="Replace an existing output.")(func)


def json_option(func: F) -> F:
    """``--json``: the command's result as JSON on stdout."""
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


def threads_option(func: F) -> F:
    """``--threads N``: the command runs with N torch intra-op threads (default: torch's, one per
    core), restored after; the command itself does not get the value."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with maybe_torch_threads(kwargs.pop("threads")):
            return func(*args, **kwargs)

    return click.option(  # type: ignore[return-value]
        "--threads", type=AsciiIntRange(min=1), default=None,
        help="torch intra-op threads of this process. [default: torch's, one per core, or OMP_NUM_THREADS] "
             "On a machine shared with other jobs, or with several processes per machine, 1 is often much faster.",
    )(wrapper)


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
