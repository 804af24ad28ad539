"""The demo: the whole toolchain on a built-in default (a tiny model, a small task), stage by stage.

- :mod:`.context`: :class:`DemoContext`, :class:`Stage`, :class:`StageReport`, :class:`DemoResult`;
- :mod:`.stages`: base, train, renest, slice, evaluate; :mod:`.convert_stages`: merge, onnx, bundle;
- :mod:`.pipeline`: :data:`STAGES` and :func:`run_demo`;
- :mod:`.tiny`: the tiny Llama-style model and its tokenizer, built from a config (no download);
- :mod:`.builtin`: the task shipped in ``data/`` (:func:`builtin_dataset_path`).

The demo sits above the converters, training and evaluation: it imports them, never the reverse.
"""

from __future__ import annotations

from .builtin import BUILTIN_TASK, builtin_dataset_path
from .context import (
    DEMO_SLICE_RANKS,
    DEMO_TRAIN_RANKS,
    DemoContext,
    DemoResult,
    Stage,
    StageProgress,
    StageReport,
)
from .pipeline import STAGES, run_demo
from .stages import demo_train_settings, demo_verdict

__all__ = [
    "BUILTIN_TASK", "DEMO_SLICE_RANKS", "DEMO_TRAIN_RANKS", "STAGES", "DemoContext", "DemoResult", "Stage",
    "StageProgress", "StageReport", "builtin_dataset_path", "demo_train_settings", "demo_verdict", "run_demo",
]
