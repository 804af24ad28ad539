"""mlora-export: one MatryoshkaLoRA run, every rank a deployment needs.

The public API is imported lazily so that ``import mlora_export`` (and the CLI's ``--help``)
stays fast: torch, transformers and PEFT load only when a function that needs them runs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what the lazy names below resolve to, for type checkers and IDEs
    from .adapter import MatryoshkaConfig, NestedAdapter, save_nested  # noqa: F401
    from .converters.gguf import GgufOptions, export_gguf  # noqa: F401
    from .converters.hub import BundleOptions, PushOptions, RankBudget, publish, pull_rank, push_bundle, write_bundle  # noqa: F401
    from .converters.merge import merge_adapter  # noqa: F401
    from .converters.onnx import OnnxExportOptions, export_genai, export_onnx  # noqa: F401
    from .converters.renest import renest_adapter  # noqa: F401
    from .converters.slice import slice_adapter  # noqa: F401
    from .errors import MloraError  # noqa: F401
    from .evaluation import EvalOptions, evaluate  # noqa: F401
    from .method import aurac, matryoshka_diagonal, scale, training_diagonal  # noqa: F401
    from .training import (  # noqa: F401
        NestedLoraModel,
        NestedRankCallback,
        RunOptions,
        TrainSettings,
        add_nested_adapter,
        load_nested_adapter,
        train,
    )

from ._version import __version__

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
    "NestedRankCallback": "mlora_export.training",
    "NestedLoraModel": "mlora_export.training",
    "TrainSettings": "mlora_export.training",
    "RunOptions": "mlora_export.training",
    "train": "mlora_export.training",
    "merge_adapter": "mlora_export.converters.merge",
    "export_onnx": "mlora_export.converters.onnx",
    "export_genai": "mlora_export.converters.onnx",
    "OnnxExportOptions": "mlora_export.converters.onnx",
    "export_gguf": "mlora_export.converters.gguf",
    "GgufOptions": "mlora_export.converters.gguf",
    "write_bundle": "mlora_export.converters.hub",
    "push_bundle": "mlora_export.converters.hub",
    "publish": "mlora_export.converters.hub",
    "pull_rank": "mlora_export.converters.hub",
    "BundleOptions": "mlora_export.converters.hub",
    "PushOptions": "mlora_export.converters.hub",
    "RankBudget": "mlora_export.converters.hub",
    "evaluate": "mlora_export.evaluation",
    "EvalOptions": "mlora_export.evaluation",
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
