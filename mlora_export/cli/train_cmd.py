"""``mlora-export train``: train a nested adapter from a base model (folder or Hub id) and a data file or Hub dataset."""

from __future__ import annotations

import dataclasses
from typing import Any

import click

from ..base import DTYPES
from ..errors import ConfigError
from ..method import SCALINGS, TRAIN_METHODS
from ..training.pipeline import REPORTERS, TrainSettings
from ..training.recipe import NestedRecipe
from ._errors import handle_errors
from ._options import FLOAT, INT, BarProgress, BaseModelArg, DataArgs, ModuleList, base_model_options, collect, collect_into, field_options
from ._options import data_options, NumberList, RankList, echo_json, force_option, json_option, quiet_transformers_bars, stdout_to_stderr, threads_option

#: The defaults of every option come from the library's settings.
_DEFAULTS = TrainSettings()
#: The options whose name is not their field's in :class:`TrainSettings`.
_SETTINGS = {"ranks": "train_ranks", "lora_dropout": "dropout"}


@click.command("train")
@base_model_options
@data_options("train")
@click.option("--train-on-prompt", is_flag=True,
              help="Learn every token; by default only the completion, or every assistant turn of a conversation (end-of-turn included).")
@click.option("--ranks", required=True, type=RankList(allow_all=False), help="Train ranks T, comma-separated (e.g. 1,2,4,8,16,32).")
@click.option("--max-rank", type=INT, default=None, help="Adapter rank r; must be one of --ranks.  [default: max of --ranks]")
@click.option("--output", "-o", required=True, type=click.Path(path_type=str), help="Folder to create for the nested adapter.")
@click.option("--method", type=click.Choice(list(TRAIN_METHODS)), default=_DEFAULTS.method, show_default=True,
              help="nested-loss: each example trained at one train rank exactly as it is served (ranks stratified per step); "
                   "matryoshka: the paper's one-pass diagonal p; lora: plain LoRA at r; dylora: one sampled rank per step.")
@click.option("--rank-weights", type=NumberList(), default=None,
              help="nested-loss only: one weight per train rank for the per-example assignment, e.g. 1,1,1,1,2,2.  [default: uniform]")
@field_options(NestedRecipe, "lora_plus_ratio", "rank_curriculum", "per_rank_loss", "a_init", "loss_aware_ranks")
@click.option("--scaling", type=click.Choice(list(SCALINGS)), default=_DEFAULTS.scaling, show_default=True, help="s(k) = alpha/sqrt(k), alpha/k or alpha.")
@click.option("--alpha", type=FLOAT, default=_DEFAULTS.alpha, show_default=True, help="The alpha of s(k).")
@click.option("--target-modules", type=ModuleList(), default=_DEFAULTS.target_modules, show_default=True,
              help="'all-linear' (every Linear/Conv1D but the output head) or module names, e.g. q_proj,v_proj.")
@click.option("--epochs", type=FLOAT, default=_DEFAULTS.epochs, show_default=True, help="Passes over the data (ignored with --max-steps).")
@click.option("--max-steps", type=INT, default=None, help="Stop after this many optimisation steps.")
@click.option("--lr", type=FLOAT, default=_DEFAULTS.lr, show_default=True, help="Peak learning rate (linear decay).")
@click.option("--batch-size", type=INT, default=_DEFAULTS.batch_size, show_default=True, help="Examples per step and process.")
@click.option("--grad-accum", type=INT, default=_DEFAULTS.grad_accum, show_default=True, help="Micro-batches per optimisation step.")
@click.option("--seed", type=INT, default=_DEFAULTS.seed, show_default=True, help="Seed of the adapter init, the data order and DyLoRA's sampling.")
@click.option("--max-length", type=INT, default=_DEFAULTS.max_length, show_default=True, help="Truncate examples to this many tokens.")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default=_DEFAULTS.dtype, show_default=True, help="Dtype of the base model.")
@click.option("--lora-dropout", type=FLOAT, default=_DEFAULTS.dropout, show_default=True, help="LoRA dropout on the adapter's input, in [0, 1).")
@click.option("--warmup-steps", type=INT, default=_DEFAULTS.warmup_steps, show_default=True, help="Linear learning-rate warmup, in steps.")
@click.option("--warmup-ratio", type=FLOAT, default=_DEFAULTS.warmup_ratio, show_default=True,
              help="Linear learning-rate warmup as a share of the steps, in [0, 1) (instead of --warmup-steps).")
@click.option("--gradient-checkpointing", is_flag=True, default=_DEFAULTS.gradient_checkpointing,
              help="Recompute activations in the backward pass: less activation memory, one more forward pass of each layer per step.")
@click.option("--bf16", is_flag=True, default=_DEFAULTS.bf16,
              help="bfloat16 mixed precision (autocast; the adapter stays float32): GPUs with bfloat16 (Ampere+) and CPUs "
                   "(emulated, slower than float32, on CPUs without AVX512-BF16/AMX).")
@click.option("--load-in-4bit", is_flag=True, default=_DEFAULTS.load_in_4bit,
              help="QLoRA: quantise the frozen base to 4-bit NF4 with bitsandbytes (needs a bitsandbytes with a backend for this device).")
@click.option("--eval-data", type=click.Path(path_type=str), default=None,
              help="Held-out data (a file or a Hub dataset id, read like --data with its --data-config and --data-columns): "
                   "its loss at --eval-ranks is logged every --eval-steps and at the end.")
@click.option("--eval-split", default=None, help="Split of a Hub --eval-data.  [default: test]")
@click.option("--eval-steps", type=INT, default=_DEFAULTS.eval_steps, help="Score --eval-data every this many steps.  [default: at the end only]")
@click.option("--eval-ranks", type=RankList(allow_all=False), default=None,
              help="Ranks to score --eval-data at.  [default: the smallest, a middle and the largest train rank]")
@click.option("--logging-steps", type=INT, default=_DEFAULTS.logging_steps, show_default=True,
              help="Record the training loss every this many steps (in --json's losses and --report-to).")
@click.option("--report-to", type=click.Choice(list(REPORTERS)), default=_DEFAULTS.report_to, show_default=True,
              help="Send the training logs to TensorBoard (logs in --run-dir) or Weights & Biases, as transformers does.")
@click.option("--save-steps", type=INT, default=_DEFAULTS.save_steps, help="Write a checkpoint to --run-dir every this many steps (resume with --resume).")
@click.option("--resume", type=click.Path(path_type=str), default=None,
              help="Continue the run that wrote this checkpoint-N folder, exactly (same settings and data).")
@click.option("--run-dir", type=str, default=None,
              help="Folder for checkpoints and TensorBoard logs.  [default: <output>-run, or the folder of --resume]")
@threads_option
@force_option
@json_option
@handle_errors
@collect_into("settings", TrainSettings, {name: _SETTINGS.get(name, name) for name in (
    "train_on_prompt", "ranks", "max_rank", "method", "rank_weights", "scaling", "alpha", "target_modules", "epochs", "max_steps", "lr",
    "batch_size", "grad_accum", "seed", "max_length", "dtype", "lora_dropout", "warmup_steps", "warmup_ratio", "gradient_checkpointing",
    "bf16", "load_in_4bit", "eval_steps", "eval_ranks", "logging_steps", "report_to", "save_steps")})
@collect_into("run", dict, {name: name for name in ("eval_data", "eval_split", "resume", "run_dir")})
@collect(NestedRecipe, "recipe")
def train(base: BaseModelArg, data: DataArgs, settings: TrainSettings, recipe: NestedRecipe, run: dict[str, Any], output: str, force: bool,
          as_json: bool) -> None:
    """Train a nested adapter (nested-loss by default) on a base model and write it to --output.

    The data's kind is read from its records: plain text, prompt/completion, or conversations
    (TRL's "messages" and conversational prompt/completion), rendered with the tokenizer's chat
    template with the loss on every assistant turn. Models and datasets may be Hub ids.

    Runs unchanged under several processes: DDP (`torchrun --nproc_per_node 2 -m mlora_export train ...`),
    and FSDP or DeepSpeed ZeRO-2/3 (`accelerate launch --config_file cfg.yaml -m mlora_export train ...`);
    the adapter is saved whole (see docs/distributed.md).

    \b
    Examples:
      mlora-export train --base-model ./my-model --data train.jsonl \\
          --ranks 1,2,4,8,16,32 --output ./nested --max-steps 500
      mlora-export train --base-model HuggingFaceTB/SmolLM2-135M-Instruct \\
          --data HuggingFaceH4/no_robots --data-columns messages=messages \\
          --ranks 1,2,4,8,16 --output ./nested --max-length 1024
      mlora-export train ... --save-steps 100            # checkpoints in ./nested-run
      mlora-export train ... --resume ./nested-run/checkpoint-300
    """
    from ..data import DataSource
    from ..training.pipeline import RunOptions
    from ..training.pipeline import train as run_train

    source = data.source()
    settings = dataclasses.replace(settings, chat_template=data.chat_template(), recipe=recipe)
    if run["eval_split"] is not None and run["eval_data"] is None:
        raise ConfigError("an evaluation split needs evaluation data", option="eval_data")
    eval_source = (DataSource(run["eval_data"], split=run["eval_split"], config=data.config, columns=source.columns)
                   if run["eval_data"] is not None else None)
    options = RunOptions(revision=base.revision, eval_data=eval_source, resume=run["resume"], run_dir=run["run_dir"])
    with stdout_to_stderr(), quiet_transformers_bars(), BarProgress("training", unit="step") as bar:
        result = run_train(base.given, source, output, settings, options, force=force, progress=bar)
    if not result.is_main_process:
        return
    if as_json:
        echo_json(result.to_dict())
        return
    click.echo(
        f"wrote {result.path}: {result.method} adapter, max rank {result.max_rank}, train ranks "
        f"{', '.join(map(str, result.train_ranks))}; {result.steps} steps on {result.examples} examples "
        f"({result.world_size} process{'es' if result.world_size > 1 else ''}, {result.seconds:.1f} s), final loss {result.final_loss:.4f}"
    )
    if result.eval_losses:
        last = max(step for step, _, _ in result.eval_losses)
        click.echo(f"held-out loss at step {last}: " + ", ".join(f"r{k} {v:.4f}" for s, k, v in result.eval_losses if s == last))
    if result.checkpoints:
        click.echo(f"checkpoints: {', '.join(result.checkpoints)}")
