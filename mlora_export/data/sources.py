"""Where data comes from: a local file or a Hub dataset, read into validated :class:`Records`.

:func:`read_records` is the one reader of training and evaluation data (``train``, ``eval``, the
Python API, the reproduction harness):

- a path that exists is a local file: ``.jsonl``, ``.json`` or ``.parquet`` (:mod:`.files`);
- otherwise a Hub dataset id (``org/name``) is loaded with ``datasets.load_dataset`` (split,
  config, revision), through the Hub client's own endpoint, token and cache (``HF_ENDPOINT``,
  ``HF_TOKEN``, ``HF_HUB_OFFLINE``, ``HF_HOME`` behave as in ``datasets``);
- anything else is refused with what was looked for.

A column mapping (``question=prompt,answer=completion``; ``conversation=messages``) renames
fields first; with one, a record keeps only the mapped fields. Every record is then validated as
a local line is, and a source mixing record kinds is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError, HubError, HubInputError
from ..hubio import endpoint, has_token, is_hub_id, login_hint, transport_errors
from .files import apply_columns, read_file_records
from .records import Example, check_one_kind, parse_record

logger = logging.getLogger(__name__)

#: Record keys a column may be mapped to.
COLUMN_TARGETS: tuple[str, ...] = ("text", "prompt", "completion", "messages", "conversations", "tools", "chat_template_kwargs")


@dataclass(frozen=True)
class DataSource:
    """A data source: ``location`` (a local file, or a Hub dataset id ``org/name``), the dataset's
    ``split`` (default: the reader's), ``config`` (name) and ``revision``, and ``columns``, pairs
    ``(source field, record key)`` renaming fields before validation."""

    location: str
    split: str | None = None
    config: str | None = None
    columns: tuple[tuple[str, str], ...] = ()
    revision: str | None = None


@dataclass(frozen=True)
class Records:
    """Validated records of one kind, and where they came from.

    ``source`` names the source in messages; ``name`` is what a trained adapter records (a file
    name, or the Hub id with config and split); ``path`` is the local file (``None`` for a Hub
    dataset); ``sha256`` fingerprints the data (the file's bytes, or the records as read).
    """

    examples: tuple[Example, ...]
    kind: str
    source: str
    name: str
    sha256: str
    path: Path | None = None

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[Example]:
        return iter(self.examples)


def parse_columns(text: str | None) -> tuple[tuple[str, str], ...]:
    """``"question=prompt,answer=completion"`` → ``(("question", "prompt"), ("answer", "completion"))``.

    Raises:
        ConfigError: a pair is not ``source=key``, a key is not a record key, or a name repeats
            (``option="data_columns"``).
    """
    if text is None or not str(text).strip():
        return ()
    pairs: list[tuple[str, str]] = []
    for part in str(text).split(","):
        src, sep, dst = part.partition("=")
        src, dst = src.strip(), dst.strip()
        if not sep or not src or not dst:
            raise ConfigError(f"column mapping {part.strip()!r} in {text!r} is not source=key, e.g. question=prompt", option="data_columns")
        if dst not in COLUMN_TARGETS:
            raise ConfigError(f"column mapping {part.strip()!r}: {dst!r} is not a record key; map to one of {', '.join(COLUMN_TARGETS)}",
                              option="data_columns")
        pairs.append((src, dst))
    for i, (src, dst) in enumerate(pairs):
        if any(s == src or d == dst for s, d in pairs[:i]):
            raise ConfigError(f"column mapping {text!r} names {src!r} or {dst!r} twice", option="data_columns")
    return tuple(pairs)


def as_source(source: "DataSource | str | os.PathLike[str]") -> DataSource:
    """A :class:`DataSource` for a source given as one."""
    return source if isinstance(source, DataSource) else DataSource(os.fspath(source))


def read_records(source: "DataSource | str | os.PathLike[str]", *, default_split: str = "train", token: str | None = None,
                 max_records: int | None = None) -> Records:
    """Read and validate every record of ``source`` (a local file, or a Hub dataset id); see the module docstring.

    ``default_split`` is used when the source names none; ``token`` is the Hub token (default: the
    client's lookup, ``HF_TOKEN`` or the login); ``max_records`` keeps the first ones only.

    Raises:
        DataError: a missing or malformed file or record (named by line or row), a source mixing
            record kinds, an unknown split or config, a mapped column the data lacks.
        ConfigError: a bad column mapping, or a revision with a local file.
        HubInputError: the dataset or revision does not exist on the Hub or may not be read (exit 2).
        HubError: the Hub cannot be reached (exit 1).
    """
    src = as_source(source)
    for pair in src.columns:
        if not (isinstance(pair, tuple) and len(pair) == 2 and pair[1] in COLUMN_TARGETS):
            raise ConfigError(f"column mapping {pair!r} is not (source, record key) with a key of {', '.join(COLUMN_TARGETS)}",
                              option="data_columns")
    if max_records is not None and (not isinstance(max_records, int) or max_records < 1):
        raise ConfigError(f"max records must be a positive integer, got {max_records!r}")
    location = src.location
    path = Path(location).expanduser()
    if not path.exists() and is_hub_id(location):
        return _read_hub(src, default_split, token, max_records)
    given = [n for n, v in (("split", src.split), ("config", src.config), ("revision", src.revision)) if v is not None]
    if given and path.exists():
        raise ConfigError(f"{location!r} is a local file: a dataset {' and '.join(given)} applies to a Hub dataset id only",
                          option=f"data_{given[0]}" if given[0] != "revision" else None)
    examples = read_file_records(path, src.columns)
    if max_records is not None:
        examples = examples[:max_records]
    return Records(tuple(examples), examples[0].kind, str(path), path.name, _file_sha256(path), path)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """``datasets``' progress bars and its own log lines off while it loads (it logs to stderr itself,
    even the failures it then raises: the CLI's stderr stays one line on error)."""
    import datasets

    was = datasets.utils.logging.is_progress_bar_enabled()
    level = datasets.utils.logging.get_verbosity()
    datasets.utils.logging.disable_progress_bar()
    datasets.utils.logging.set_verbosity(logging.CRITICAL + 1)
    try:
        yield
    finally:
        datasets.utils.logging.set_verbosity(level)
        if was:
            datasets.utils.logging.enable_progress_bar()


def _load_hub_dataset(src: DataSource, split: str, token: str | None) -> Any:
    """``datasets.load_dataset`` of one split, its errors turned into ours.

    Raises:
        HubInputError, HubError, DataError: see :func:`read_records`.
    """
    import datasets
    from datasets.exceptions import DatasetNotFoundError
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    label = src.location
    try:
        with _quiet_datasets():
            return datasets.load_dataset(src.location, name=src.config, split=split, revision=src.revision, token=token)
    except DatasetNotFoundError as e:
        if src.revision is not None and "Revision" in str(e):
            raise HubInputError(f"dataset {label!r}: revision {src.revision!r} not found on {endpoint()}; check the revision",
                                option="data_revision", repo_id=label) from e
        if "gated" in str(e):
            raise HubInputError(f"dataset {label!r} on {endpoint()} is gated; request access on its page, then {login_hint()}",
                                repo_id=label) from e
        raise HubInputError(
            f"data {label!r} is not a local file, and the Hub at {endpoint()} has no dataset {label!r} that "
            f"{'the token' if has_token(token) else 'an anonymous request'} may read; check the id or the path, or {login_hint()}",
            repo_id=label,
        ) from e
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            raise HubInputError(f"dataset {label!r}: the Hub at {endpoint()} refused the token ({status}); it is invalid, expired or "
                                f"lacks access: {login_hint()}", repo_id=label) from e
        raise HubError(f"dataset {label!r}: the Hub at {endpoint()} answered HTTP {status}") from e
    except OfflineModeIsEnabled as e:
        raise HubInputError(f"dataset {label!r} is not in the local cache and HF_HUB_OFFLINE is set; load it once online, "
                            "or unset HF_HUB_OFFLINE", repo_id=label) from e
    except transport_errors() as e:
        if datasets.config.HF_HUB_OFFLINE:  # datasets says "Couldn't reach …" for what it has not cached
            raise HubInputError(f"dataset {label!r} is not in the local cache and HF_HUB_OFFLINE is set; load it once online, "
                                "or unset HF_HUB_OFFLINE", repo_id=label) from e
        raise HubError(f"dataset {label!r}: cannot reach the Hub at {endpoint()} ({type(e).__name__}); check the network and "
                       "HF_ENDPOINT") from e
    except (ValueError, datasets.exceptions.DatasetsError) as e:
        text = " ".join(str(e).split())
        if text.startswith("Unknown split"):
            found = re.search(r"\[(.*)\]", text)
            raise DataError(f"dataset {label!r} has no split {split!r}; its splits: {found.group(1) if found else '?'}",
                            option="data_split") from e
        if "Config name is missing" in text or "BuilderConfig" in text:
            found = re.search(r"\[(.*?)\]", text)
            what = f"has no config {src.config!r}" if src.config else "has several configs"
            raise DataError(f"dataset {label!r} {what}; pick one of {found.group(1) if found else '?'}", option="data_config") from e
        raise DataError(f"dataset {label!r}: cannot be loaded ({type(e).__name__}: {text[:200]})") from e


def _read_hub(src: DataSource, default_split: str, token: str | None, max_records: int | None) -> Records:
    split = src.split or default_split
    label = src.location + (f" [{src.config}]" if src.config else "") + f" ({split})"
    ds = _load_hub_dataset(src, split, token)
    names = list(ds.column_names)
    if src.columns:
        missing = [s for s, _ in src.columns if s not in names]
        if missing:
            raise DataError(f"{label}: no column {missing[0]!r} (named by the column mapping); its columns: {', '.join(names)}",
                            option="data_columns")
        ds = ds.select_columns([s for s, _ in src.columns])
    if max_records is not None:
        ds = ds.select(range(min(max_records, len(ds))))
    examples: list[Example] = []
    digest = hashlib.sha256()
    for i, row in enumerate(ds, 1):
        where = f"{label}, row {i}"
        if src.columns:
            row = apply_columns(row, src.columns, where)
        digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8", "surrogatepass") + b"\n")
        examples.append(parse_record(row, where).located(where, i))
    if not examples:
        raise DataError(f"{label}: the split has no rows", option="data_split")
    kind = check_one_kind(examples, label)
    return Records(tuple(examples), kind, label, label, digest.hexdigest(), None)


__all__ = ["COLUMN_TARGETS", "DataSource", "Records", "as_source", "parse_columns", "read_records"]
