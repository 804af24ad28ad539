"""Local data files: JSON Lines (``.jsonl``), JSON (``.json``: an array of records, or JSON Lines) and
Parquet (``.parquet``), read strictly into validated :class:`~.records.Example` records.

JSON is parsed with a duplicate key refused (the contract refuses them everywhere) and strings
checked for lone surrogates; each record is validated by :func:`~.records.parse_record` and a file
that mixes record kinds is refused. Every error names the file and the line (item, row).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..io.jsonio import JsonFault, loads
from .records import Example, check_one_kind, parse_record

#: The longest line (one record) :func:`load_jsonl` reads: a longer one is refused before it is
#: held in memory (a 200 MB record would otherwise cost gigabytes before being truncated).
MAX_LINE_CHARS = 4 * 2**20
#: The largest ``.json`` file read whole (a JSON array is parsed in one piece).
MAX_JSON_FILE_BYTES = 2 * 2**30
#: File suffixes read as local data files.
SUFFIXES: tuple[str, ...] = (".jsonl", ".json", ".parquet")
_FORMAT_HINT = 'one {"text": ...}, {"prompt": ..., "completion": ...} or {"messages": [...]} object per line'


def parse_json_record(text: str, where: str) -> Any:
    """Parse one record's JSON text with the package's strict reader (:func:`~mlora_export.io.jsonio.loads`).

    Raises:
        DataError: not JSON, nested too deeply, an integer too long, ``NaN`` or a number beyond a
            float, or a key twice in one object.
    """
    try:
        return loads(text)
    except JsonFault as e:
        if e.kind == "duplicate":
            raise DataError(f"{where}: the key {str(e.key)[:60]!r} appears twice in one object; keep one (a duplicate would silently "
                            "hide the other)") from None
        if e.kind == "syntax":
            raise DataError(f"{where}: not valid JSON ({e.reason} at column {e.column}); each line must be one JSON object") from e
        if e.kind == "depth":
            raise DataError(f"{where}: JSON nested too deeply; each line must be one flat JSON object") from None
        raise DataError(f"{where}: invalid JSON ({e.reason[:80]}); each line must be one JSON object") from None


def _check_file(p: Path, what: str) -> None:
    if not p.exists():
        raise DataError(f"data file {str(p)!r} does not exist; give a JSONL file with {_FORMAT_HINT} "
                        "(or a .json or .parquet file, or a Hub dataset id namespace/name)", path=p)
    if not p.is_file():
        raise DataError(f"data file {str(p)!r} is not a file; give a {what} file", path=p)


def _jsonl_records(p: Path) -> Iterator[tuple[Any, str, int]]:
    """``(parsed object, where, line number)`` of every non-blank line."""
    with p.open("r", encoding="utf-8") as fh:
        number = 0
        while raw := fh.readline(MAX_LINE_CHARS + 1):
            number += 1
            if len(raw) > MAX_LINE_CHARS:
                raise DataError(
                    f"{p}, line {number}: longer than {MAX_LINE_CHARS:,} characters, the most one record may have; "
                    "split or shorten it (examples are truncated to the maximum token length anyway)"
                )
            if not raw.strip():
                continue
            where = f"{p}, line {number}"
            yield parse_json_record(raw.rstrip("\r\n"), where), where, number  # without the newline, an error points into the line


def _json_records(p: Path) -> Iterator[tuple[Any, str, int]]:
    """A ``.json`` file: a JSON array of records (item N), or JSON Lines as ``datasets`` also reads them."""
    with p.open("r", encoding="utf-8") as fh:
        head = fh.read(4096).lstrip("\ufeff \t\r\n")
    if not head.startswith("["):
        yield from _jsonl_records(p)
        return
    size = p.stat().st_size
    if size > MAX_JSON_FILE_BYTES:
        raise DataError(f"{p}: a JSON array of {size:,} bytes is read whole; save it as JSON Lines (.jsonl) instead", path=p)
    items = parse_json_record(p.read_text(encoding="utf-8"), str(p))
    if not isinstance(items, list):
        raise DataError(f"{p}: expected a JSON array of records or JSON Lines", path=p)
    for i, obj in enumerate(items, 1):
        yield obj, f"{p}, item {i}", i


def _parquet_records(p: Path) -> Iterator[tuple[Any, str, int]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(p)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DataError(f"{p}: not a readable Parquet file ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})", path=p) from e
    for i, row in enumerate(table.to_pylist(), 1):
        yield row, f"{p}, row {i}", i


def read_file_records(path: str | os.PathLike[str], columns: tuple[tuple[str, str], ...] = ()) -> list[Example]:
    """Read and validate a local ``.jsonl``, ``.json`` or ``.parquet`` data file (any other suffix is read as JSON Lines).

    ``columns`` renames fields before validation (``(("question", "prompt"), ("answer", "completion"))``);
    with a mapping a record keeps only the mapped fields.

    Raises:
        DataError: the file is missing, not a regular file, not UTF-8, empty, or a record is too
            long, not valid JSON (or has a key twice), lacks a mapped column, is malformed, or of
            another kind than the first; the message names the file and the line.
    """
    p = Path(path)
    _check_file(p, "JSONL, JSON or Parquet")
    reader = {".json": _json_records, ".parquet": _parquet_records}.get(p.suffix.lower(), _jsonl_records)
    examples: list[Example] = []
    try:
        for obj, where, number in reader(p):
            if columns:
                obj = apply_columns(obj, columns, where)
            examples.append(parse_record(obj, where).located(where, number))
    except UnicodeDecodeError as e:
        raise DataError(f"data file {str(p)!r} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8 JSONL", path=p) from e
    except OSError as e:
        raise DataError(f"cannot read data file {str(p)!r}: {e.strerror or e}", path=p) from e
    if not examples:
        raise DataError(f"data file {str(p)!r} has no examples; it needs at least one record", path=p)
    check_one_kind(examples, str(p))
    return examples


def apply_columns(obj: Any, columns: tuple[tuple[str, str], ...], where: str) -> Any:
    """``obj`` with only the mapped fields, renamed (source name → record key).

    Raises:
        DataError: a mapped field is missing from the record.
    """
    if not isinstance(obj, dict):
        return obj
    out = {}
    for src, dst in columns:
        if src not in obj:
            have = ", ".join(repr(k) for k in list(obj)[:8]) or "none"
            raise DataError(f"{where}: has no field {src!r} (mapped to {dst!r} by the column mapping); fields: {have}", option="data_columns")
        out[dst] = obj[src]
    return out


def load_jsonl(path: str | os.PathLike[str]) -> list[Example]:
    """Read and validate a JSONL data file (see :func:`read_file_records`).

    Lines are read at most :data:`MAX_LINE_CHARS` characters at a time; a longer record is refused.

    Raises:
        DataError: the file is missing, not a regular file, not UTF-8, empty, mixes record kinds,
            or a line is too long, not valid JSON or malformed; the message names the file and the line.
    """
    return read_file_records(path)


__all__ = ["MAX_JSON_FILE_BYTES", "MAX_LINE_CHARS", "SUFFIXES", "apply_columns", "load_jsonl", "parse_json_record", "read_file_records"]
