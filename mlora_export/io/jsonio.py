"""The one strict JSON reader and the one JSON writer of the package.

Every JSON text we read may come from an untrusted place (a downloaded config, a manifest, a
safetensors header, a data file). :func:`loads` refuses what :mod:`json` lets pass: a key twice
in one object (``json`` keeps the last, hiding the first), ``NaN`` and ``Infinity`` (not JSON),
a number beyond a float's range (``1e400``, which ``json`` reads as infinity), and turns every
other fault (bad syntax, bad UTF-8, nesting too deep, an integer of thousands of digits) into one
:class:`JsonFault`, which callers word in their own terms (:func:`parse_json` for files, the
safetensors and data readers for theirs).

Every JSON file we write is :func:`dumps`' form: indented by two, a final newline, and no
``NaN`` or ``Infinity`` unless a caller allows them.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from .files import check_regular_file

#: The largest JSON file (a config, an index, a manifest) read whole: far above any real one.
MAX_JSON_BYTES = 64 * 2**20


class JsonFault(ValueError):
    """Why a JSON text could not be read.

    ``kind`` is one of ``"syntax"`` (with ``line`` and ``column``), ``"encoding"`` (not UTF-8),
    ``"depth"`` (nested too deeply), ``"duplicate"`` (with ``key``) and ``"value"`` (``NaN``, a
    number beyond a float, an integer too long); ``reason`` says it in words, ``detail`` is the
    parser's own message.
    """

    def __init__(self, kind: str, reason: str, *, detail: str = "", key: str | None = None, line: int | None = None,
                 column: int | None = None) -> None:
        super().__init__(reason)
        self.kind, self.reason, self.detail = kind, reason, detail or reason
        self.key, self.line, self.column = key, line, column


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise JsonFault("duplicate", f"the key {key[:80]!r} appears twice", key=key)
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise JsonFault("value", f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    """A JSON number as a float; one beyond float's range (``1e400``, which ``json`` reads as infinity) is refused."""
    value = float(text)
    if not math.isfinite(value):
        raise JsonFault("value", f"the number {text[:40]} is beyond the range of a float")
    return value


def loads(text: str | bytes) -> Any:
    """Parse JSON text strictly (see the module docstring).

    Raises:
        JsonFault: any fault, with its kind and, for a syntax error, the line and column.
    """
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant, parse_float=_finite_float)
    except JsonFault:
        raise
    except json.JSONDecodeError as e:
        raise JsonFault("syntax", e.msg, detail=str(e), line=e.lineno, column=e.colno) from None
    except UnicodeDecodeError as e:
        raise JsonFault("encoding", "not UTF-8 text", detail=str(e)) from None
    except RecursionError:
        raise JsonFault("depth", "nested too deeply") from None
    except ValueError as e:  # an integer of thousands of digits
        raise JsonFault("value", str(e)) from None


def parse_json(text: str | bytes, source: str, error: type[Exception]) -> Any:
    """Parse JSON text strictly (:func:`loads`); every fault is an ``error`` naming ``source``.

    Raises:
        error: one sentence naming ``source`` and the fault.
    """
    try:
        return loads(text)
    except JsonFault as e:
        if e.kind == "syntax":
            raise error(f"{source}: not valid JSON ({e.reason} at line {e.line}); fix or re-create the file") from None
        if e.kind == "encoding":
            raise error(f"{source}: not UTF-8 text; fix or re-create the file") from None
        if e.kind == "depth":
            raise error(f"{source}: JSON nested too deeply to read; fix or re-create the file") from None
        raise error(f"{source}: invalid JSON ({e.reason[:120]}); fix or re-create the file") from None


def read_json(path: str | os.PathLike[str], error: type[Exception], what: str = "JSON file", max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Read a JSON file from untrusted input: a regular file of at most ``max_bytes``, parsed by
    :func:`parse_json`.

    Raises:
        error: naming ``path`` and the fault.
    """
    st = check_regular_file(path, error, what)
    if st.st_size > max_bytes:
        raise error(f"{path}: the {what} has {st.st_size} bytes, more than the {max_bytes} a JSON file of this kind may have")
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise error(f"{path}: cannot read the {what} ({e.strerror or e})") from e
    return parse_json(data, str(path), error)


def dumps(data: Any, *, sort_keys: bool = False, ensure_ascii: bool = True, allow_nan: bool = False) -> str:
    """``data`` as the text of a JSON file of ours: indented by two, with a final newline.

    Raises:
        ValueError: ``data`` holds ``NaN`` or an infinity (unless ``allow_nan``): not JSON, and
            refused by our own reader, so a bug upstream rather than something to write.
    """
    return json.dumps(data, indent=2, sort_keys=sort_keys, ensure_ascii=ensure_ascii, allow_nan=allow_nan) + "\n"


def write_json(path: str | os.PathLike[str], data: Any, *, sort_keys: bool = False, ensure_ascii: bool = True,
               allow_nan: bool = False) -> None:
    """Write ``data`` to ``path`` in :func:`dumps`' form (UTF-8).

    Raises:
        ValueError: see :func:`dumps`.
        OSError: the file cannot be written.
    """
    text = dumps(data, sort_keys=sort_keys, ensure_ascii=ensure_ascii, allow_nan=allow_nan)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


__all__ = ["MAX_JSON_BYTES", "JsonFault", "dumps", "loads", "parse_json", "read_json", "write_json"]
