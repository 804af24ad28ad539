"""What the demo ships: a small pre-trained base (``pretrained/``) and the task it half knows (``data/``).

Both are made by ``scripts/make_demo_base.py`` from the reproduction's ``skill`` regime
(``examples/reproduce/``): a Llama-style causal LM pre-trained on a synthetic letter-string
language, and the task of its rare fourth operation ``~`` (``{"prompt": "qTwm~", "completion": "..."}``),
which the base already solves about half of the time. ``data/`` also holds ``sort``, a task for
models trained from scratch (the test suite's).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import DataError

#: The demo's task (see :func:`builtin_dataset_path`).
BUILTIN_TASK = "skill"

_HERE = Path(__file__).resolve().parent


def builtin_dataset_path(split: str = "train", task: str = BUILTIN_TASK) -> Path:
    """Path of a JSONL file shipped with the package: ``mlora_export/demo/data/{task}-{split}.jsonl``.

    Raises:
        DataError: no such split or task in the package.
    """
    path = _HERE / "data" / f"{task}-{split}.jsonl"
    if not path.is_file():
        raise DataError(f"built-in data set {task!r} has no split {split!r} ({str(path)!r} is missing); reinstall mlora-export")
    return path


def pretrained_base_dir() -> Path:
    """The demo's pre-trained base: a transformers model folder (safetensors, ``tokenizer.json``) in the package.

    Raises:
        DataError: the folder or its weights are missing (a broken install).
    """
    path = _HERE / "pretrained"
    if not (path / "model.safetensors").is_file() or not (path / "tokenizer.json").is_file():
        raise DataError(f"the demo's pre-trained base is missing from {str(path)!r}; reinstall mlora-export")
    return path


def pretrained_base_record() -> dict[str, Any]:
    """What ``scripts/make_demo_base.py`` recorded about the base: its pre-training, shape and base skills.

    Raises:
        DataError: the record is missing or not valid JSON.
    """
    path = pretrained_base_dir() / "pretraining.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"the demo's base record {str(path)!r} is unreadable ({e}); reinstall mlora-export") from e
