"""``mlora-export train``: train a nested adapter from a local model folder and a JSONL file."""

from __future__ import annotations

import click

from ..base import DTYPES
from ..method import SCALINGS, TRAIN_METHODS
from ..training.pipeline import TrainSettings
from ..training.recipe import A_INITS
from ._errors import handle_errors
from ._options import (
    BarProgress,
    ModuleList,
    NumberList,
    RankList,
    echo_json,
    force_option,
    json_option,
    maybe_torch_threads,
    quiet_transformers_bars,
    stdout_to_stderr,
    threads_option,
)

#: The defaults of every option come from the library's settings.
_DEFAULTS = TrainSettings()


@click.command("train")
@click.option("--base-model", required=True, type=click.Path(path_type=str), help="Local transformers model folder (config.json, *.safetensors, tokenizer).")
@click.option("--data", "data", required=True, type=click.Path(path_type=str),
              help='JSONL file: {"text": ...} or {"prompt": ..., "completion": ...} per line (loss on the completion only).')
@click.option("--ranks", required=True, type=RankList(allow_all=False), help="Train ranks T, comma-separated (e.g. 1,2,4,8,16,32).")
@click.option("--max-rank", type=int, default=None, help="Adapter rank r; must be one of --ranks.  [default: max of --ranks]")
@click.option("--output", "-o", required=True, type=click.Path(path_type=str), help="Folder to create for the nested adapter.")
@click.option("--method", type=click.Choice(list(TRAIN_METHODS)), default=_DEFAULTS.method, show_default=True,
              help="nested-loss: each example trained at one train rank exactly as it is served (ranks stratified per step); "
                   "matryoshka: the paper's one-pass diagonal p; lora: plain LoRA at r; dylora: one sampled rank per step.")
@click.option("--rank-weights", type=NumberList(), default=None,
              help="nested-loss only: one weight per train rank for the per-example assignment, e.g. 1,1,1,1,2,2.  [default: uniform]")
@click.option("--lora-plus-ratio", type=float, default=None,
              help="LoRA+ (Hayou et al. 2024): B's learning rate is this many times A's, e.g. 16.  [default: one learning rate]")
@click.option("--rank-curriculum", type=float, default=_DEFAULTS.rank_curriculum, show_default=True,
              help="nested-loss only: over this fraction of the steps the rank weights move from the low ranks "
                   "(weights ∝ 1, 1/2, 1/4, ... over the sorted train ranks) to --rank-weights; 0 is off.")
@click.option("--per-rank-loss", is_flag=True, default=_DEFAULTS.per_rank_loss,
              help="nested-loss only: mean token loss per train rank, then the mean over ranks (every rank weighs the same "
                   "in each step, whatever its examples' tokens).  [default: one mean over all tokens]")
@click.option("--a-init", type=click.Choice(list(A_INITS)), default=_DEFAULTS.a_init, show_default=True,
              help="Initial scale of A: peft (Kaiming on [r, in]) or paper (the paper's [in, r] layout: sqrt(in/r) times larger).")
@click.option("--loss-aware-ranks", type=float, default=_DEFAULTS.loss_aware_ranks, show_default=True,
              help="nested-loss only: share (0-1) of the rank assignment that follows each rank's running training loss, "
                   "so lagging ranks get more examples; 0 is off.")
@click.option("--scaling", type=click.Choice(list(SCALINGS)), default=_DEFAULTS.scaling, show_default=True, help="s(k) = alpha/sqrt(k), alpha/k or alpha.")
@click.option("--alpha", type=float, default=_DEFAULTS.alpha, show_default=True, help="The alpha of s(k).")
@click.option("--target-modules", type=ModuleList(), default=_DEFAULTS.target_modules, show_default=True,
              help="'all-linear' (every Linear/Conv1D but the output head) or module names, e.g. q_proj,v_proj.")
@click.option("--epochs", type=float, default=_DEFAULTS.epochs, show_default=True, help="Passes over the data (ignored with --max-steps).")
@click.option("--max-steps", type=int, default=None, help="Stop after this many optimisation steps.")
@click.option("--lr", type=float, default=_DEFAULTS.lr, show_default=True, help="Peak learning rate (linear decay).")
@click.option("--batch-size", type=int, default=_DEFAULTS.batch_size, show_default=True, help="Examples per step and process.")
@click.option("--grad-accum", type=int, default=_DEFAULTS.grad_accum, show_default=True, help="Micro-batches per optimisation step.")
@click.option("--seed", type=int, default=_DEFAULTS.seed, show_default=True, help="Seed of the adapter init, the data order and DyLoRA's sampling.")
@click.option("--max-length", type=int, default=_DEFAULTS.max_length, show_default=True, help="Truncate examples to this many tokens.")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default=_DEFAULTS.dtype, show_default=True, help="Dtype of the base model.")
@threads_option
@force_option
@json_option
@handle_errors
def train(
    base_model: str, data: str, ranks: tuple[int, ...], max_rank: int | None, output: str, method: str, scaling: str,
    rank_weights: tuple[float, ...] | None, alpha: float, target_modules: str | tuple[str, ...], epochs: float, max_steps: int | None, lr: float, batch_size: int, grad_accum: int,
    seed: int, max_length: int, dtype: str, threads: int | None, force: bool, as_json: bool,
    lora_plus_ratio: float | None, rank_curriculum: float, per_rank_loss: bool, a_init: str, loss_aware_ranks: float,
) -> None:
    """Train a nested adapter (nested-loss by default) on a local model and write it to --output.

    Runs unchanged under several processes: DDP (`torchrun --nproc_per_node 2 -m mlora_export train ...`),
    and FSDP or DeepSpeed ZeRO-2/3 (`accelerate launch --config_file cfg.yaml -m mlora_export train ...`);
    the adapter is saved whole (see docs/distributed.md).

    \b
    Example:
      mlora-export train --base-model ./my-model --data train.jsonl \\
          --ranks 1,2,4,8,16,32 --output ./nested --max-steps 500
    """
    from ..training.pipeline import train as run_train

    settings = TrainSettings(
        method=method, rank_weights=rank_weights, train_ranks=tuple(ranks), max_rank=max_rank, scaling=scaling, alpha=alpha,
        target_modules=target_modules,
        epochs=epochs, max_steps=max_steps, lr=lr, batch_size=batch_size, grad_accum=grad_accum, seed=seed,
        max_length=max_length, dtype=dtype, lora_plus_ratio=lora_plus_ratio, rank_curriculum=rank_curriculum,
        per_rank_loss=per_rank_loss, a_init=a_init, loss_aware_ranks=loss_aware_ranks,
    )
    with stdout_to_stderr(), maybe_torch_threads(threads), quiet_transformers_bars(), BarProgress("training", unit="step") as bar:
        result = run_train(base_model, data, output, settings, force=force, progress=bar)
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
