"""The small task shipped with the package for the demo: sort the letters of a word."""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError

#: The task shipped with the package (see :func:`builtin_dataset_path`).
BUILTIN_TASK = "sort"


def builtin_dataset_path(split: str = "train", task: str = BUILTIN_TASK) -> Path:
    """Path of a JSONL file shipped with the package: ``mlora_export/demo/data/{task}-{split}.jsonl``.

    Raises:
        DataError: no such split or task in the package.
    """
    path = Path(__file__).resolve().parent / "data" / f"{task}-{split}.jsonl"
    if not path.is_file():
        raise DataError(f"built-in data set {task!r} has no split {split!r} ({str(path)!r} is missing); reinstall mlora-export")
    return path
