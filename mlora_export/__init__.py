"""mlora-export: one MatryoshkaLoRA run, every rank a deployment needs.

The public API is imported lazily so that ``import mlora_export`` (and the CLI's ``--help``)
stays fast: torch, transformers and PEFT load only when a function that needs them runs.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "NestedAdapter": "mlora_export.adapter",
    "MatryoshkaConfig": "mlora_export.adapter",
    "save_nested": "mlora_export.adapter",
    "scale": "mlora_export.method",
    "matryoshka_diagonal": "mlora_export.method",
    "training_diagonal": "mlora_export.method",
    "aurac": "mlora_export.method",
    "slice_adapter": "mlora_export.converters.slice",
    "renest_adapter": "mlora_export.converters.renest",
    "add_nested_adapter": "mlora_export.training",
    "load_nested_adapter": "mlora_export.training",
    "NestedRankCallback": "mlora_export.callbacks",
    "TrainSettings": "mlora_export.finetune",
    "train": "mlora_export.finetune",
    "merge_adapter": "mlora_export.converters.merge",
    "export_onnx": "mlora_export.converters.onnx",
    "export_gguf": "mlora_export.converters.gguf",
    "write_bundle": "mlora_export.converters.hub",
    "push_bundle": "mlora_export.converters.hub",
    "pull_rank": "mlora_export.converters.hub",
    "evaluate": "mlora_export.evaluation",
    "MloraError": "mlora_export.errors",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mlora_export' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = ["__version__", *_EXPORTS]
