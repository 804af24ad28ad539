"""Field metadata of the option dataclasses: one source for a default, its help, its choices and
the command-line flag that sets it.

The wide library functions take a frozen dataclass of options (``BundleOptions``,
``OnnxExportOptions``, ``EvalOptions``, ``RankBudget``…), as PEFT's ``LoraConfig`` does; each
field is declared with :func:`param`, whose metadata the CLI turns into its click options and
into the hints that name a flag in an error message (``cli/_errors.py``). The library never
imports click: the metadata is plain data.

Calls in the older style, with the options as keywords of the function, still work for one
release through :func:`merge_legacy`, with a :class:`DeprecationWarning`.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

#: Keys a field's metadata may hold (see :func:`param`).
META_KEYS = ("help", "flag", "choices", "hint", "min", "max", "min_open", "show_default", "metavar", "negate")


def param(default: Any = dataclasses.MISSING, *, help: str, flag: str | None = None, choices: Sequence[str] | None = None,
          hint: str | None = None, **cli: Any) -> Any:
    """A dataclass field with its documentation and command-line form.

    Args:
        default: the field's default (mutable defaults are not used by option dataclasses).
        help: what the option does, as ``--help`` shows it.
        flag: the command-line flag (``"--max-new-tokens"``); ``None`` for a library-only option.
        choices: the allowed values, shown and checked by the CLI.
        hint: what an error about this option adds (default: ``"see <flag>"``).
        cli: how the flag reads (``min``, ``max``, ``min_open``, ``show_default``, ``metavar``,
            ``negate`` for a ``--no-…`` flag that sets the field to ``False``).
    """
    unknown = set(cli) - set(META_KEYS)
    if unknown:
        raise TypeError(f"unknown option metadata {sorted(unknown)}")
    meta = {"help": help, "flag": flag, "choices": tuple(choices) if choices is not None else None, "hint": hint, **cli}
    return dataclasses.field(default=default, metadata=meta)


def fields_of(cls: type) -> dict[str, dataclasses.Field[Any]]:
    """The fields of an option dataclass, by name, in declaration order."""
    return {f.name: f for f in dataclasses.fields(cls)}


def flag_hints(*classes: type) -> dict[str, str]:
    """``{field name: hint}`` for every field with a flag: its ``hint``, else ``"see <flag>"``."""
    hints: dict[str, str] = {}
    for cls in classes:
        for f in dataclasses.fields(cls):
            flag = f.metadata.get("flag")
            if flag:
                hints[f.name] = f.metadata.get("hint") or f"see {flag}"
    return hints


def merge_legacy(options: T | None, cls: type[T], legacy: Mapping[str, Any], func: str) -> T:
    """``options`` (or the defaults of ``cls``) with the options a call passed the older way, as
    keywords of ``func``: accepted for one release with a :class:`DeprecationWarning`.

    Raises:
        TypeError: a keyword that is not a field of ``cls`` (as Python would for an unknown keyword).
    """
    base = options if options is not None else cls()
    if not legacy:
        return base
    names = fields_of(cls)
    unknown = [k for k in legacy if k not in names]
    if unknown:
        raise TypeError(f"{func}() got an unexpected keyword argument {unknown[0]!r}")
    warnings.warn(
        f"{func}({', '.join(f'{k}=...' for k in legacy)}) is deprecated: pass {cls.__name__}({', '.join(f'{k}=...' for k in legacy)}) "
        "instead; the keywords go in the next release",
        DeprecationWarning, stacklevel=3,
    )
    return dataclasses.replace(base, **legacy)  # type: ignore[type-var]


__all__ = ["META_KEYS", "fields_of", "flag_hints", "merge_legacy", "param"]
