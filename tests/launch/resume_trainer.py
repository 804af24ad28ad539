"""The Python API under a stock ``transformers.Trainer``: train a nested adapter 6 steps with a
checkpoint every 3, or resume such a run from a checkpoint; save the nested adapter (on every
process, as sharded engines need), and ``steps.json`` beside it: the optimiser steps this process
began (a resumed run begins at the checkpoint's step). Run by tests/test_sharded.py under
``accelerate launch``.

Usage: resume_trainer.py BASE DATA CHECKPOINTS OUTPUT METHOD [RESUME_FROM]
"""

from __future__ import annotations

import sys


def _step_recorder(steps: list[int]):  # type: ignore[no-untyped-def]
    from transformers import TrainerCallback

    class StepRecorder(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            steps.append(state.global_step)

    return StepRecorder()


def main(base: str, data: str, checkpoints: str, output: str, method: str, resume_from: str | None) -> None:
    import json
    from pathlib import Path

    from transformers import Trainer, TrainingArguments

    from mlora_export.adapter import MatryoshkaConfig
    from mlora_export.base import check_base_model_dir, load_base_model, load_tokenizer
    from mlora_export.data import CompletionCollator, load_jsonl, tokenize_examples
    from mlora_export.training import NestedRankCallback, add_nested_adapter

    folder = check_base_model_dir(base)
    tokenizer = load_tokenizer(folder)
    features = tokenize_examples(load_jsonl(data), tokenizer, 64, source=data)
    model = load_base_model(folder, "float32")
    model.config.use_cache = False
    nested = add_nested_adapter(model, MatryoshkaConfig(method, 8, (1, 2, 4, 8)), seed=3)
    args = TrainingArguments(
        output_dir=checkpoints, per_device_train_batch_size=4, gradient_accumulation_steps=2, learning_rate=0.02,
        max_steps=6, save_strategy="steps", save_steps=3, seed=3, data_seed=3, logging_steps=1, report_to=[],
        disable_tqdm=True, remove_unused_columns=False, use_cpu=True, dataloader_pin_memory=False,
    )
    trainer = Trainer(model=nested.model, args=args, train_dataset=features, data_collator=CompletionCollator(tokenizer.pad_token_id),
                      callbacks=[NestedRankCallback(nested)])
    steps: list[int] = []
    trainer.add_callback(_step_recorder(steps))
    trainer.train(resume_from_checkpoint=resume_from)
    nested.save(output, force=True)  # every process: a collective under FSDP; the main one writes
    if trainer.is_world_process_zero():
        (Path(output) / "steps.json").write_text(json.dumps(steps))


if __name__ == "__main__":
    main(*sys.argv[1:6], sys.argv[6] if len(sys.argv) > 6 else None)
