"""Train a nested adapter from a local model folder and a JSONL file: ``mlora-export train`` in Python.

:func:`train` loads the base model (local folder, safetensors only, never a pickle), puts a nested
adapter on it (:func:`~mlora_export.training.add_nested_adapter`), trains it with a stock
``transformers.Trainer`` plus :class:`~mlora_export.training.callbacks.NestedRankCallback`, and writes the
nested adapter format (docs/design.md §2) atomically.

It runs unchanged under ``torchrun``/``accelerate launch``: ``Trainer`` wraps the model in
DistributedDataParallel, FSDP or DeepSpeed (as the launch config says) and shards the batches; the
training diagonal depends only on ``(seed, step, global position)``, so every process trains what
one process would; the LoRA factors are gathered whole (:mod:`mlora_export.training.distributed`), only the
main process writes the output, and the others wait for it (docs/distributed.md).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..adapter import MatryoshkaConfig
from ..base import DTYPES, check_base_model_dir, load_base_model, load_tokenizer
from ..errors import ConfigError, ExportError
from ..fs import check_output_path
from ..method import check_method
from ..progress import Progress
from ..validate import is_finite_real, is_int
from .distributed import cpu_training_args, engine_of
from .recipe import NestedRecipe

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSettings:
    """Everything :func:`train` needs besides the paths.

    ``max_rank`` defaults to ``max(train_ranks)``; ``max_steps`` (when set) overrides ``epochs``.
    ``batch_size`` is per process: the global batch is ``batch_size × grad_accum × processes``.
    ``rank_weights`` (``nested-loss`` only): one weight per train rank for the per-example rank
    assignment (default uniform). ``lora_plus_ratio``, ``rank_curriculum``, ``per_rank_loss``,
    ``a_init`` and ``loss_aware_ranks`` are the training recipe (:meth:`recipe`,
    :class:`~mlora_export.training.recipe.NestedRecipe`; all off by default).
    """

    method: str = "nested-loss"
    train_ranks: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    max_rank: int | None = None
    scaling: str = "sqrt"
    alpha: float = 1.0
    target_modules: str | tuple[str, ...] = "all-linear"
    epochs: float | None = 1.0
    max_steps: int | None = None
    lr: float = 1e-3
    batch_size: int = 8
    grad_accum: int = 1
    seed: int = 0
    max_length: int = 512
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_scheduler: str = "linear"
    max_grad_norm: float = 1.0
    dropout: float = 0.0
    rank_weights: tuple[float, ...] | None = None
    lora_plus_ratio: float | None = None
    rank_curriculum: float = 0.0
    per_rank_loss: bool = False
    a_init: str = "peft"
    loss_aware_ranks: float = 0.0
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    logging_steps: int = 10
    extra_training_args: dict[str, Any] = field(default_factory=dict)

    def nested_config(self, base_model: str | None = None) -> MatryoshkaConfig:
        """The adapter's :class:`MatryoshkaConfig` (validates method, scaling, alpha and ranks).

        Raises:
            ConfigError, RankError: an invalid method, scaling, alpha or rank set.
        """
        r = self.max_rank if self.max_rank is not None else (max(self.train_ranks) if self.train_ranks else 0)
        extra = {"base_model": base_model} if base_model else {}
        check_method(self.method, trainable=True)
        weights = tuple(self.rank_weights) if self.rank_weights is not None else None
        return MatryoshkaConfig(self.method, r, tuple(self.train_ranks), self.scaling, self.alpha, extra, rank_weights=weights)

    def recipe(self) -> NestedRecipe:
        """The training recipe of these settings (validated).

        Raises:
            ConfigError: a recipe option out of range.
        """
        return NestedRecipe(lora_plus_ratio=self.lora_plus_ratio, rank_curriculum=self.rank_curriculum, per_rank_loss=self.per_rank_loss,
                            a_init=self.a_init, loss_aware_ranks=self.loss_aware_ranks)

    def validate(self) -> MatryoshkaConfig:
        """Check every setting before any I/O; return the adapter config.

        Raises:
            ConfigError: a loop setting is out of range, or a recipe option the method cannot use; RankError: bad ranks.
        """
        cfg = self.nested_config()
        self.recipe().check_method(cfg.method)
        if self.max_steps is None and self.epochs is None:
            raise ConfigError("give a number of epochs or a number of steps (max_steps)", option="max_steps")
        if self.max_steps is not None and (not is_int(self.max_steps) or self.max_steps < 1):
            raise ConfigError(f"max steps must be a positive integer, got {self.max_steps!r}")
        if self.max_steps is None and (not isinstance(self.epochs, (int, float)) or not math.isfinite(self.epochs) or self.epochs <= 0):
            raise ConfigError(f"epochs must be a positive number, got {self.epochs!r}")
        for name in ("batch_size", "grad_accum", "logging_steps"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ConfigError(f"{name.replace('_', ' ')} must be a positive integer, got {value!r}")
        if not is_int(self.max_length) or self.max_length < 2:
            raise ConfigError(f"max length must be an integer of at least 2 tokens, got {self.max_length!r}")
        if not isinstance(self.lr, (int, float)) or not math.isfinite(self.lr) or self.lr <= 0:
            raise ConfigError(f"learning rate must be a positive number, got {self.lr!r}")
        if not is_finite_real(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        if not is_finite_real(self.weight_decay) or self.weight_decay < 0:
            raise ConfigError(f"weight decay must be a non-negative number, got {self.weight_decay!r}")
        if not is_finite_real(self.max_grad_norm) or self.max_grad_norm < 0:
            raise ConfigError(f"max grad norm must be a non-negative number (0 turns clipping off), got {self.max_grad_norm!r}")
        if not is_int(self.warmup_steps) or self.warmup_steps < 0:
            raise ConfigError(f"warmup steps must be a non-negative integer, got {self.warmup_steps!r}")
        if self.lr_scheduler not in _COMMON_SCHEDULERS:  # import transformers (seconds) only for a rare name
            from transformers import SchedulerType

            schedulers = [t.value for t in SchedulerType]
            if self.lr_scheduler not in schedulers:
                raise ConfigError(f"unknown learning-rate scheduler {self.lr_scheduler!r}: expected one of {', '.join(schedulers)}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {self.dtype!r}: expected one of {', '.join(DTYPES)}")
        if not is_int(self.seed) or self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed!r}")
        targets = self.target_modules
        if isinstance(targets, str):
            if not targets.strip():
                raise ConfigError("target modules are empty: use 'all-linear' or module names like q_proj,v_proj")
        elif not targets or any(not isinstance(t, str) or not t.strip() for t in targets):
            raise ConfigError(f"target modules {list(targets)!r} must be non-empty module names like q_proj,v_proj")
        return cfg


#: ``transformers.SchedulerType`` values that every supported transformers release has.
_COMMON_SCHEDULERS = frozenset({"linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"})


#: Fewer optimisation steps than this, from a number of epochs, get a warning (an explicit max steps does not).
FEW_STEPS = 50


def _warn_rank_above_width(nested: Any) -> None:
    """Warn when the adapter's rank exceeds ``min(in, out)`` of a target: the components above add nothing there."""
    r = nested.config.max_rank
    narrow = [(name, layer.in_features, layer.out_features) for name, layer in zip(nested.module_names, nested._layers)
              if min(layer.in_features, layer.out_features) < r]
    if narrow:
        name, fin, fout = narrow[0]
        width = min(min(a, b) for _, a, b in narrow)
        logger.warning(
            "max rank %d is above min(in_features, out_features) of %d of %d target modules (e.g. %s: %d -> %d); a delta "
            "there has rank at most %d, so components above %d add nothing: consider a max rank of at most %d",
            r, len(narrow), len(nested.module_names), name, fin, fout, width, width, width,
        )


@dataclass
class TrainResult:
    """What a training run produced (on every process; only the main one wrote ``path``)."""

    path: Path
    method: str
    max_rank: int
    train_ranks: tuple[int, ...]
    steps: int
    seconds: float
    train_loss: float
    final_loss: float
    examples: int
    world_size: int
    is_main_process: bool
    trainable_params: int
    losses: list[tuple[int, float]] = field(default_factory=list)
    #: What held the parameters (:func:`~mlora_export.training.distributed.engine_of`): single, ddp, fsdp1, fsdp2, deepspeed, deepspeed-zero3.
    engine: str = "single"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        d["train_ranks"] = list(self.train_ranks)
        d["losses"] = [list(x) for x in self.losses]
        return d


def _has_accelerator() -> bool:
    import torch

    acc = getattr(torch, "accelerator", None)
    if acc is not None and hasattr(acc, "is_available"):
        return bool(acc.is_available())
    return bool(torch.cuda.is_available())


def heldout_loss(model: Any, features: Sequence[dict[str, list[int]]], pad_token_id: int, *, batch_size: int = 32) -> float:
    """Mean cross-entropy per supervised token (labels ≠ -100) of ``model`` on tokenised ``features``."""
    import torch

    from ..data import IGNORE_INDEX, CompletionCollator

    collate = CompletionCollator(pad_token_id)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(features), batch_size):
            batch = collate(features[i : i + batch_size])
            logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
            labels = batch["labels"].to(device)[:, 1:]
            lg = logits[:, :-1].float()
            total += float(torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"))
            count += int((labels != IGNORE_INDEX).sum())
    model.train(was_training)
    return total / max(count, 1)


def _training_arguments(settings: TrainSettings, scratch: Path) -> Any:
    """The ``TrainingArguments`` of a run: the settings, no checkpoints or reports, our own progress."""
    import torch
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(scratch),
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        learning_rate=settings.lr,
        num_train_epochs=float(settings.epochs or 1.0),
        max_steps=settings.max_steps if settings.max_steps is not None else -1,
        lr_scheduler_type=settings.lr_scheduler,
        warmup_steps=settings.warmup_steps,
        weight_decay=settings.weight_decay,
        max_grad_norm=settings.max_grad_norm,
        seed=settings.seed,
        data_seed=settings.seed,
        logging_steps=settings.logging_steps,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,
        dataloader_drop_last=False,
        dataloader_pin_memory=torch.cuda.is_available(),
        # without an accelerator, accelerate only sets up multi-process (gloo) DDP when told "cpu"
        # (and then ignores FSDP/DeepSpeed configs: see mlora_export.training.distributed.cpu_training_args)
        **cpu_training_args(_has_accelerator()),
        **settings.extra_training_args,
    )


def _warn_few_steps(settings: TrainSettings, examples: int, world_size: int) -> None:
    """Warn when the epochs give fewer than :data:`FEW_STEPS` optimisation steps (each rank gets a share of them)."""
    if settings.max_steps is not None:
        return
    global_batch = settings.batch_size * world_size * settings.grad_accum
    planned = math.ceil(examples / global_batch) * float(settings.epochs or 1.0)
    if planned < FEW_STEPS:
        logger.warning(
            "only %d optimisation steps (%g epoch(s) of %d examples at a global batch of %d): each train rank gets a "
            "share of them, and so little training may leave the ranks near the base; raise the epochs or set max steps",
            math.ceil(planned), float(settings.epochs or 1.0), examples, global_batch,
        )


def _save_on_main(nested: Any, output: str | os.PathLike[str], *, force: bool, main: bool, world: int, extra: dict[str, Any]) -> None:
    """Gather the LoRA factors (a collective under FSDP/ZeRO-3, on every process), write them on the
    main process, and let the others fail with it rather than hang.

    Raises:
        ExportError: on a process other than the main one, when the main one failed to write.
        whatever the write raised, on the main process.
    """
    factors = nested.factors(main_only=True)
    failure: BaseException | None = None
    if main:
        try:
            nested.save(output, force=force, factors=factors, extra=extra)
            logger.info("wrote the nested adapter to %s", output)
        except Exception as e:  # noqa: BLE001 - re-raised below, after telling the other processes
            failure = e
    if world > 1:
        from accelerate.utils import broadcast_object_list

        status = broadcast_object_list([None if failure is None else f"{type(failure).__name__}: {failure}"], from_process=0)[0]
        if status is not None and failure is None:
            raise ExportError(f"the main process failed to write {str(output)!r}: {status}")
    if failure is not None:
        raise failure


def train(
    base_model: str | os.PathLike[str],
    data_path: str | os.PathLike[str],
    output: str | os.PathLike[str],
    settings: TrainSettings | None = None,
    *,
    force: bool = False,
    progress: Progress | None = None,
    base_model_id: str | None = None,
) -> TrainResult:
    """Train a nested adapter on ``base_model`` with the JSONL file ``data_path``; write it to ``output``.

    Everything is validated before the model is loaded. Works in one process and under
    ``torchrun``/``accelerate launch`` (DDP, FSDP, DeepSpeed ZeRO-2/3) alike; only the main process
    writes ``output``.
    ``base_model_id`` is what the adapter records as its base (PEFT's ``base_model_name_or_path``;
    default ``base_model`` as given), e.g. a Hub id when the local folder is a copy of one.

    Raises:
        ConfigError, RankError: invalid settings.
        OutputExistsError: ``output`` exists and ``force`` is false.
        BaseModelError: the base folder is missing, pickle-only or unloadable.
        DataError: the data file is missing or malformed (the message names the line).
    """
    from ..data import load_jsonl, tokenize_examples

    # every check that needs no torch first: a bad argument or file is reported in a blink
    settings = settings or TrainSettings()
    settings.validate()
    check_output_path(output, force, inputs=(base_model, data_path))  # --force may never replace an input
    examples = load_jsonl(data_path)
    base = check_base_model_dir(base_model)  # its model_type check imports transformers (about a second)

    tokenizer = load_tokenizer(base)
    features = tokenize_examples(examples, tokenizer, settings.max_length, source=str(data_path))
    cfg = settings.nested_config(base_model=base_model_id or str(base_model))
    nested, targets = _nested_model(base, settings, cfg)
    trainable = sum(p.numel() for p in nested.model.parameters() if p.requires_grad)

    scratch = Path(tempfile.mkdtemp(prefix="mlora-train-"))
    try:
        trainer = _make_trainer(nested, settings, scratch, features, tokenizer.pad_token_id, progress)
        world = trainer.args.world_size
        if trainer.is_world_process_zero():
            _warn_few_steps(settings, len(features), world)
        t0 = time.perf_counter()
        out = trainer.train()
        seconds = time.perf_counter() - t0
        losses = [(int(h["step"]), float(h["loss"])) for h in trainer.state.log_history if "loss" in h]
        main = trainer.is_world_process_zero()
        nested.model.eval()
        engine = engine_of(nested.model)
        record = _training_record(settings, data_path, trainer.state.global_step, world, targets)
        _save_on_main(nested, output, force=force, main=main, world=world, extra={"training": record})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return TrainResult(
        path=Path(output),
        method=cfg.method,
        max_rank=cfg.max_rank,
        train_ranks=cfg.train_ranks,
        steps=trainer.state.global_step,
        seconds=seconds,
        train_loss=float(out.training_loss),
        final_loss=losses[-1][1] if losses else float(out.training_loss),
        examples=len(features),
        world_size=world,
        is_main_process=main,
        trainable_params=trainable,
        losses=losses,
        engine=engine,
    )


def _nested_model(base: Path, settings: TrainSettings, cfg: MatryoshkaConfig) -> tuple[Any, str | list[str]]:
    """``(nested, targets)``: the base model loaded in the settings' dtype (no KV cache: training
    never decodes) with a nested adapter of ``cfg`` on its target modules, gradient checkpointing on
    when asked; warns about targets narrower than the rank.

    Raises:
        BaseModelError: transformers cannot load the base.
        ConfigError: the target modules match nothing in the model.
    """
    from .model import add_nested_adapter

    model = load_base_model(base, settings.dtype)
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False
    targets = settings.target_modules if isinstance(settings.target_modules, str) else list(settings.target_modules)
    nested = add_nested_adapter(model, cfg, target_modules=targets, dropout=settings.dropout, seed=settings.seed, recipe=settings.recipe())
    if settings.gradient_checkpointing:
        nested.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        nested.model.enable_input_require_grads()
    _warn_rank_above_width(nested)
    return nested, targets


def _make_trainer(nested: Any, settings: TrainSettings, scratch: Path, features: Sequence[dict[str, list[int]]], pad_token_id: int,
                  progress: Progress | None) -> Any:
    """A :class:`~.trainer.NestedTrainer` (a stock ``transformers.Trainer`` with :class:`~.callbacks.NestedRankCallback`
    and the nested recipe) on the nested model; no log lines on stdout (the CLI's ``--json`` owns it)
    and our own progress instead of Trainer's bar."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from ..data import CompletionCollator
    from .callbacks import StepProgressCallback
    from .trainer import NestedTrainer

    trainer = NestedTrainer(
        nested,
        args=_training_arguments(settings, scratch),
        train_dataset=features,
        data_collator=CompletionCollator(pad_token_id),
    )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if progress is not None:
        trainer.add_callback(StepProgressCallback(progress))
    return trainer


def _training_record(settings: TrainSettings, data_path: str | os.PathLike[str], steps: int, world: int, targets: str | list[str]) -> dict[str, Any]:
    """The ``training`` section the adapter records: the data file's name, steps, learning rate,
    seed, global batch size, target modules and the recipe options that are not the default."""
    record = {
        "data": Path(data_path).name,
        "steps": steps,
        "lr": settings.lr,
        "seed": settings.seed,
        "batch_size": settings.batch_size * settings.grad_accum * world,
        "target_modules": targets,
    }
    recipe = settings.recipe().changed()
    if recipe:
        record["recipe"] = recipe
    return record


__all__ = ["TrainResult", "TrainSettings", "heldout_loss", "train"]
