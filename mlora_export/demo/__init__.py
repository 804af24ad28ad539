"""The demo: the whole toolchain on a built-in default (a small pre-trained model, a task it half knows), stage by stage.

- :mod:`.context`: :class:`DemoContext`, :class:`Stage`, :class:`StageReport`, :class:`DemoResult`, and
  :class:`DemoModel` (:data:`DEMO_MODELS`: ``builtin``, ``smollm2``);
- :mod:`.stages`: base, train, renest, slice, evaluate; :mod:`.convert_stages`: merge, onnx, bundle;
- :mod:`.pipeline`: :data:`STAGES` and :func:`run_demo`;
- :mod:`.builtin`: the pre-trained base shipped in ``pretrained/`` and the task in ``data/`` (both made by
  ``scripts/make_demo_base.py``);
- :mod:`.real_model`: the ``smollm2`` demo model (a real pretrained chat model, its chat template);
- :mod:`.tiny`: tiny Llama-style models and tokenizers built from a config (the tests' untrained models).

The demo sits above the converters, training and evaluation: it imports them, never the reverse.
"""

from __future__ import annotations

from .builtin import BUILTIN_TASK, builtin_dataset_path, pretrained_base_dir, pretrained_base_record
from .context import (
    DEMO_MODELS,
    DEMO_SLICE_RANKS,
    DEMO_TRAIN_RANKS,
    DemoContext,
    DemoModel,
    DemoResult,
    Stage,
    StageProgress,
    StageReport,
)
from .pipeline import STAGES, run_demo
from .stages import DEMO_LR, demo_train_settings, demo_verdict

__all__ = [
    "BUILTIN_TASK", "DEMO_LR", "DEMO_MODELS", "DEMO_SLICE_RANKS", "DEMO_TRAIN_RANKS", "STAGES", "DemoContext", "DemoModel",
    "DemoResult", "Stage", "StageProgress", "StageReport", "builtin_dataset_path", "demo_train_settings", "demo_verdict",
    "pretrained_base_dir", "pretrained_base_record", "run_demo",
]
