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
from typing import TYPE_CHECKING, Any

from ..adapter import MatryoshkaConfig
from ..base import DTYPES, check_base_model_dir, load_base_model, load_tokenizer, resolve_base_model
from ..errors import ConfigError, ExportError
from ..fs import check_output_path
from ..method import check_method
from ..params import merge_legacy
from ..progress import Progress
from ..validate import is_finite_real, is_int
from .distributed import cpu_training_args, engine_of
from .heldout import heldout_loss as heldout_loss  # its home until 0.2; kept importable from here
from .recipe import NestedRecipe

if TYPE_CHECKING:
    from ..data import DataSource

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSettings:
    """Everything :func:`train` needs besides the paths.

    ``max_rank`` defaults to ``max(train_ranks)``; ``max_steps`` (when set) overrides ``epochs``.
    ``batch_size`` is per process: the global batch is ``batch_size × grad_accum × processes``.
    ``rank_weights`` (``nested-loss`` only): one weight per train rank for the per-example rank
    assignment (default uniform). ``dropout`` is LoRA's dropout on the adapter's input.
    ``recipe`` (:class:`~mlora_export.training.recipe.NestedRecipe`): how the adapter is trained
    beyond the method (LoRA+, rank curriculum, per-rank loss, the paper's init of ``A``,
    loss-aware rank sampling; all off by default).

    The run's extras, as in ``transformers``/TRL: ``gradient_checkpointing``; ``bf16`` (bfloat16
    autocast over the float32 adapter: on a GPU that has bfloat16, and on CPUs, where torch's
    autocast supports it; see :func:`check_environment`); ``warmup_ratio`` (a share of the steps,
    instead of ``warmup_steps``); ``eval_steps`` and ``eval_ranks`` (with evaluation data: the
    held-out loss at those ranks every ``eval_steps`` steps and at the end; default ranks: the
    smallest, a middle and the largest train rank); ``report_to`` (``none``, ``tensorboard``,
    ``wandb``); ``save_steps`` (a checkpoint every that many steps, to resume from);
    ``load_in_4bit`` (QLoRA: the frozen base quantised to 4-bit NF4 by bitsandbytes).
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
    recipe: NestedRecipe = field(default_factory=NestedRecipe)
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    logging_steps: int = 10
    bf16: bool = False
    warmup_ratio: float = 0.0
    eval_steps: int | None = None
    eval_ranks: tuple[int, ...] | None = None
    report_to: str = "none"
    save_steps: int | None = None
    load_in_4bit: bool = False
    extra_training_args: dict[str, Any] = field(default_factory=dict)
    #: Learn every token (prompt, system and user turns too), not only the completion or the assistant turns.
    train_on_prompt: bool = False
    #: Jinja text of a chat template that renders conversations instead of the tokenizer's own
    #: (:func:`mlora_export.data.read_chat_template` reads one from a file).
    chat_template: str | None = None

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

    def validate(self) -> MatryoshkaConfig:
        """Check every setting before any I/O; return the adapter config.

        Raises:
            ConfigError: a loop setting is out of range, or a recipe option the method cannot use; RankError: bad ranks.
        """
        cfg = self.nested_config()
        if not isinstance(self.recipe, NestedRecipe):
            raise ConfigError(f"recipe must be a NestedRecipe, got {type(self.recipe).__name__}", option="recipe")
        self.recipe.check_method(cfg.method)
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
        if not is_finite_real(self.warmup_ratio) or not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"warmup ratio must be a number in [0, 1), got {self.warmup_ratio!r}", option="warmup_ratio")
        if self.warmup_ratio and self.warmup_steps:
            raise ConfigError("give warmup steps or a warmup ratio, not both", option="warmup_ratio")
        for name in ("eval_steps", "save_steps"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or value < 1):
                raise ConfigError(f"{name.replace('_', ' ')} must be a positive integer, got {value!r}", option=name)
        if self.eval_ranks is not None:
            bad = [k for k in self.eval_ranks if not is_int(k) or not 1 <= k <= cfg.max_rank]
            if bad or not self.eval_ranks:
                raise ConfigError(f"eval ranks must be ranks in [1, {cfg.max_rank}], got {list(self.eval_ranks)!r}", option="eval_ranks")
        if self.report_to not in REPORTERS:
            raise ConfigError(f"unknown report_to {self.report_to!r}: expected one of {', '.join(REPORTERS)}", option="report_to")
        for name in ("bf16", "load_in_4bit", "gradient_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.bf16 and self.dtype == "float16":
            raise ConfigError("bf16 mixed precision needs a float32 or bfloat16 base, not float16", option="dtype")
        if self.load_in_4bit and self.dtype not in ("float32", "bfloat16", "auto"):
            raise ConfigError(f"load_in_4bit quantises the base itself; its other weights stay float32 or bfloat16, not {self.dtype}", option="dtype")
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


#: Where ``report_to`` may send the training logs (as transformers' ``report_to``).
REPORTERS = ("none", "tensorboard", "wandb")

#: Settings that may differ between a run and its resumption (they do not change what is trained).
RESUME_FREE = frozenset({"logging_steps", "save_steps", "report_to", "eval_steps", "eval_ranks", "gradient_checkpointing"})

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


def check_environment(settings: TrainSettings) -> None:
    """Check, before anything is loaded, that this machine has what the settings ask for.

    - ``report_to``: its package (``tensorboard`` or ``tensorboardX``; ``wandb``);
    - ``load_in_4bit``: ``bitsandbytes``, with a backend for one of this machine's devices
      (bitsandbytes 0.46+ has a CPU backend; older ones need a CUDA GPU);
    - ``bf16``: a GPU with bfloat16 (on CUDA, compute capability 8.0+), or no GPU: torch's CPU
      autocast runs bfloat16 on every CPU, natively where it has AVX512-BF16 or AMX and emulated,
      slower than float32, elsewhere (a warning says so).

    Raises:
        MissingDependencyError: a needed package is not installed.
        ConfigError: the installed bitsandbytes has no backend here, or the GPU has no bfloat16.
    """
    import importlib.util

    from ..errors import MissingDependencyError

    if settings.report_to == "tensorboard" and not any(importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX")):
        raise MissingDependencyError("report_to 'tensorboard' needs the tensorboard package, which is not installed: pip install tensorboard",
                                     package="tensorboard", option="report_to")
    if settings.report_to == "wandb" and importlib.util.find_spec("wandb") is None:
        raise MissingDependencyError("report_to 'wandb' needs the wandb package, which is not installed: pip install wandb",
                                     package="wandb", option="report_to")
    if settings.load_in_4bit:
        if importlib.util.find_spec("bitsandbytes") is None:
            raise MissingDependencyError(
                "load_in_4bit (QLoRA) needs bitsandbytes, which is not installed: pip install bitsandbytes "
                "(0.46 or later also runs on CPUs)", package="bitsandbytes", option="load_in_4bit")
        import bitsandbytes
        from transformers.integrations.bitsandbytes import validate_bnb_backend_availability

        if not validate_bnb_backend_availability(raise_exception=False):
            devices = sorted(getattr(bitsandbytes, "supported_torch_devices", ()) or ())
            raise ConfigError(
                f"load_in_4bit: the installed bitsandbytes {getattr(bitsandbytes, '__version__', '?')} supports "
                f"{', '.join(devices) or 'no device'}, none of which this machine has; install a bitsandbytes "
                "with a backend for this device or train without 4-bit quantisation", option="load_in_4bit")
    if settings.bf16:
        _check_bf16()


def _check_bf16() -> None:
    """Raise :class:`ConfigError` where bfloat16 autocast cannot run; warn where it runs emulated."""
    import torch

    if torch.cuda.is_available():
        if not torch.cuda.is_bf16_supported(including_emulation=False):
            name = torch.cuda.get_device_name()
            raise ConfigError(f"bf16: this GPU ({name}) has no bfloat16 arithmetic (it needs compute capability 8.0, Ampere, or newer); "
                              "train in float32 instead", option="bf16")
        return
    if _has_accelerator():
        from transformers.utils import is_torch_bf16_gpu_available

        if not is_torch_bf16_gpu_available():
            raise ConfigError("bf16: this machine's accelerator has no bfloat16 support; train in float32 instead", option="bf16")
        return
    native = bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())
    if not native:
        logger.warning("bf16 on a CPU without AVX512-BF16 or AMX: torch emulates bfloat16 here, which is correct but slower than float32")


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
    #: ``(step, rank, held-out loss)`` for every evaluation during training (with evaluation data).
    eval_losses: list[tuple[int, int, float]] = field(default_factory=list)
    #: The checkpoint folders in the run folder when training ended (``save_steps``), and the one the run resumed from.
    checkpoints: list[str] = field(default_factory=list)
    resumed_from: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        d["train_ranks"] = list(self.train_ranks)
        d["losses"] = [list(x) for x in self.losses]
        d["eval_losses"] = [list(x) for x in self.eval_losses]
        return d


def _name_the_cpu_for_deepspeed() -> None:
    """Tell DeepSpeed (which transformers and accelerate import whenever it is installed) that a
    machine without an accelerator trains on the CPU: found by itself, it logs "Setting accelerator
    to CPU" on stdout, which a command's ``--json`` result owns. Its choice is the same either way."""
    if "DS_ACCELERATOR" not in os.environ and not _has_accelerator():
        os.environ["DS_ACCELERATOR"] = "cpu"


def _has_accelerator() -> bool:
    import torch

    acc = getattr(torch, "accelerator", None)
    if acc is not None and hasattr(acc, "is_available"):
        return bool(acc.is_available())
    return bool(torch.cuda.is_available())


def _training_arguments(settings: TrainSettings, folder: Path) -> Any:
    """The ``TrainingArguments`` of a run: the settings, checkpoints and reports as asked (written
    under ``folder``), our own progress."""
    import torch
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(folder),
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        learning_rate=settings.lr,
        num_train_epochs=float(settings.epochs or 1.0),
        max_steps=settings.max_steps if settings.max_steps is not None else -1,
        lr_scheduler_type=settings.lr_scheduler,
        # transformers 5 reads a warmup below 1 as a share of the steps (its former warmup_ratio)
        warmup_steps=settings.warmup_ratio or settings.warmup_steps,
        weight_decay=settings.weight_decay,
        max_grad_norm=settings.max_grad_norm,
        seed=settings.seed,
        data_seed=settings.seed,
        logging_steps=settings.logging_steps,
        save_strategy="steps" if settings.save_steps else "no",
        save_steps=settings.save_steps or 500,
        eval_strategy="no",
        bf16=settings.bf16,
        report_to=[] if settings.report_to == "none" else [settings.report_to],
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


@dataclass(frozen=True)
class RunOptions:
    """Where one :func:`train` run reads and writes besides its data, settings and output: the
    base's Hub revision and recorded id, held-out data, the checkpoint to resume from, the folder
    of checkpoints and logs."""

    revision: str | None = None
    base_model_id: str | None = None
    eval_data: "DataSource | str | os.PathLike[str] | None" = None
    resume: str | os.PathLike[str] | None = None
    run_dir: str | os.PathLike[str] | None = None


@dataclass
class _Prepared:
    """A run's inputs, checked and read before the model loads."""

    records: Any
    eval_records: Any
    base: Path
    folder: Path | None


def train(
    base_model: str | os.PathLike[str],
    data_path: "str | os.PathLike[str] | DataSource",
    output: str | os.PathLike[str],
    settings: TrainSettings | None = None,
    run: RunOptions | None = None,
    *,
    force: bool = False,
    progress: Progress | None = None,
    **legacy: Any,
) -> TrainResult:
    """Train a nested adapter on ``base_model`` with the data ``data_path``; write it to ``output``.

    ``base_model`` is a local folder or a Hub model id (``run.revision``: its branch, tag or commit),
    resolved by :func:`~mlora_export.base.hub.resolve_base_model`; ``data_path`` is a local
    ``.jsonl``/``.json``/``.parquet`` file, a Hub dataset id or a :class:`~mlora_export.data.DataSource`
    (split ``train`` unless it names one), read by :func:`~mlora_export.data.read_records` and
    tokenised by :func:`~mlora_export.data.tokenize_records` (conversations with the chat template,
    loss on the assistant turns unless ``settings.train_on_prompt``).

    Everything is validated before the model is loaded. Works in one process and under
    ``torchrun``/``accelerate launch`` (DDP, FSDP, DeepSpeed ZeRO-2/3) alike; only the main process
    writes ``output``.
    ``run`` (:class:`RunOptions`): ``base_model_id`` is what the adapter records as its base
    (PEFT's ``base_model_name_or_path``; default ``base_model`` as given), e.g. a Hub id when the
    local folder is a copy of one; ``eval_data``: held-out data, read and tokenised as ``data_path`` is (a Hub dataset's split
    ``test`` unless it names one), scored at ``settings.eval_ranks`` every ``settings.eval_steps``
    steps and at the end. ``run_dir`` holds the checkpoints
    (``settings.save_steps``) and TensorBoard logs (default: ``<output>-run``, or the folder of the
    checkpoint resumed from); ``resume``, a ``checkpoint-N`` folder of a run with the same settings
    and data, continues that run exactly where it stopped (adapter, optimiser, scheduler, random
    states, data order and the rank assignment, which depends on the step only). Checkpoints are
    written in one process and under DDP (:mod:`~mlora_export.training.checkpoint`), not under FSDP
    or DeepSpeed. The run options passed as keywords of this function (``resume=…``) still work
    for one release, with a ``DeprecationWarning``.

    Raises:
        ConfigError, RankError: invalid settings, or a checkpoint of another run.
        MissingDependencyError: a package the settings need is not installed.
        OutputExistsError: ``output`` exists, or ``run_dir`` holds checkpoints of another run, and
            ``force`` is false.
        BaseModelError: the base folder is missing, pickle-only or unloadable.
        DataError: the data is missing or malformed (the message names the line), or conversations
            have no chat template.
        HubInputError, HubError: a Hub model or dataset that cannot be read.
    """
    from .checkpoint import read_checkpoint

    settings = settings or TrainSettings()
    run = merge_legacy(run, RunOptions, legacy, "train")
    inputs = _prepare(base_model, data_path, output, settings, run, force)  # every check that needs no torch first
    tokenizer = load_tokenizer(inputs.base)
    features = _features(inputs.records, tokenizer, settings)
    eval_features = _features(inputs.eval_records, tokenizer, settings) if inputs.eval_records is not None else None
    record = _resume_record(settings, features, inputs.base)
    if run.resume is not None:
        read_checkpoint(run.resume, record, world_size=_launch_world_size())
    cfg = settings.nested_config(base_model=run.base_model_id or os.fspath(base_model))
    nested, targets = _nested_model(inputs.base, settings, cfg)
    trainable = sum(p.numel() for p in nested.model.parameters() if p.requires_grad)
    scratch = Path(tempfile.mkdtemp(prefix="mlora-train-"))
    try:
        trainer, heldout = _make_trainer(nested, settings, inputs.folder or scratch, features, tokenizer.pad_token_id, progress, eval_features)
        trainer.checkpoint_record = record
        t0 = time.perf_counter()
        out = _run_trainer(trainer, settings, run, inputs.folder, len(features), force)
        seconds = time.perf_counter() - t0
        nested.model.eval()
        world, main, engine = trainer.args.world_size, trainer.is_world_process_zero(), engine_of(nested.model)
        training = _training_record(settings, inputs.records, trainer.state.global_step, world, targets)
        _save_on_main(nested, output, force=force, main=main, world=world, extra={"training": training})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    counts = {"examples": len(features), "trainable_params": trainable, "world_size": world, "is_main_process": main}
    return _result(output, cfg, trainer, out, seconds, engine, heldout, counts, inputs.folder if settings.save_steps else None, run)


def _prepare(base_model: str | os.PathLike[str], data_path: Any, output: str | os.PathLike[str], settings: TrainSettings, run: RunOptions,
             force: bool) -> _Prepared:
    """Validate the settings, the output and the run folder, read the data and find the base,
    before torch loads (a bad argument or file is reported in a blink).

    Raises:
        see :func:`train`.
    """
    from ..data import as_source, read_records

    settings.validate()
    if settings.eval_steps is not None and run.eval_data is None:
        raise ConfigError("eval steps need evaluation data (eval_data) to score", option="eval_data")
    if run.resume is not None and settings.recipe.loss_aware_ranks > 0:
        raise ConfigError("a run with loss-aware rank sampling cannot be resumed exactly: its running per-rank losses are not in "
                          "the checkpoint; train it again from the start", option="loss_aware_ranks")
    source = as_source(data_path)
    eval_source = as_source(run.eval_data) if run.eval_data is not None else None
    given = [os.fspath(base_model), source.location, *([eval_source.location] if eval_source else []),
             *([os.fspath(run.resume)] if run.resume else [])]
    locals_ = [p for p in given if Path(p).exists()]
    check_output_path(output, force, inputs=locals_)  # --force may never replace an input
    folder = _run_folder(output, settings, run.resume, run.run_dir, force, locals_)
    _name_the_cpu_for_deepspeed()
    check_environment(settings)
    records = read_records(source, default_split="train")
    eval_records = read_records(eval_source, default_split="test") if eval_source is not None else None
    base = check_base_model_dir(resolve_base_model(base_model, revision=run.revision))  # its model_type check imports transformers
    return _Prepared(records, eval_records, base, folder)


def _run_trainer(trainer: Any, settings: TrainSettings, run: RunOptions, folder: Path | None, examples: int, force: bool) -> Any:
    """Train (from ``run.resume`` when given); return ``Trainer.train``'s output.

    Raises:
        ConfigError: checkpoints asked for under FSDP or DeepSpeed.
    """
    from .checkpoint import checkpoints_in

    if (settings.save_steps or run.resume is not None) and (trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled):
        raise ConfigError("checkpoints (save_steps, resume) are written in one process or under DDP only, not under FSDP or "
                          "DeepSpeed; use a Trainer of your own there (docs/distributed.md)", option="save_steps")
    if trainer.is_world_process_zero():
        _warn_few_steps(settings, examples, trainer.args.world_size)
        if folder is not None and run.resume is None and force:
            for old in checkpoints_in(folder):  # force: the checkpoints of an earlier run go
                shutil.rmtree(old)
    return trainer.train(resume_from_checkpoint=str(run.resume) if run.resume is not None else None)


def _result(output: str | os.PathLike[str], cfg: MatryoshkaConfig, trainer: Any, out: Any, seconds: float, engine: str, heldout: Any,
            counts: dict[str, Any], checkpoints: Path | None, run: RunOptions) -> TrainResult:
    """The :class:`TrainResult` of a finished run (``counts``: examples, trainable parameters, processes, main or not)."""
    from .checkpoint import checkpoints_in

    losses = [(int(h["step"]), float(h["loss"])) for h in trainer.state.log_history if "loss" in h]
    return TrainResult(
        path=Path(output),
        method=cfg.method,
        max_rank=cfg.max_rank,
        train_ranks=cfg.train_ranks,
        steps=trainer.state.global_step,
        seconds=seconds,
        train_loss=float(out.training_loss),
        final_loss=losses[-1][1] if losses else float(out.training_loss),
        **counts,
        losses=losses,
        engine=engine,
        eval_losses=list(heldout.results) if heldout is not None else [],
        checkpoints=[str(c) for c in checkpoints_in(checkpoints)] if checkpoints is not None else [],
        resumed_from=str(run.resume) if run.resume is not None else None,
    )


def _features(records: Any, tokenizer: Any, settings: TrainSettings) -> list[dict[str, list[int]]]:
    """Tokenised ``{"input_ids", "labels"}`` of ``records`` (conversations with the chat template)."""
    from ..data import tokenize_records

    return tokenize_records(records, tokenizer, settings.max_length, train_on_prompt=settings.train_on_prompt, chat_template=settings.chat_template)


def _launch_world_size() -> int:
    """The number of processes of the launch (``WORLD_SIZE`` of torchrun/accelerate), before any is set up."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))
    except ValueError:
        return 1


def _run_folder(output: str | os.PathLike[str], settings: TrainSettings, resume: str | os.PathLike[str] | None,
                run_dir: str | os.PathLike[str] | None, force: bool, inputs: Sequence[Any]) -> Path | None:
    """The folder for checkpoints and TensorBoard logs, or ``None`` when the run writes neither.

    Raises:
        ConfigError: ``resume`` is not a folder, or the run folder is the output or inside it.
        OutputExistsError: the run folder holds checkpoints of another run and ``force`` is false.
    """
    from ..errors import OutputExistsError
    from .checkpoint import checkpoints_in, read_checkpoint

    if resume is not None:
        read_checkpoint(resume, {})  # a complete checkpoint of ours (its settings and data are compared later)
    if not (settings.save_steps or settings.report_to == "tensorboard"):
        if run_dir is not None:
            raise ConfigError("a run folder holds checkpoints (save_steps) and TensorBoard logs (report_to 'tensorboard'); "
                              "this run writes neither", option="run_dir")
        return None
    folder = Path(run_dir) if run_dir is not None else Path(resume).parent if resume is not None else Path(f"{output}-run")
    out = Path(output).absolute()
    if folder.absolute() == out or out in folder.absolute().parents:
        raise ConfigError(f"run folder {str(folder)!r} is the output or inside it; give another", option="run_dir")
    real = folder.resolve()
    resumed = Path(resume).resolve() if resume is not None else None
    for given in (i for i in inputs if i is not None):
        other = Path(given).resolve()
        if other == resumed:
            continue
        if real == other or other in real.parents or real in other.parents:
            raise ConfigError(f"run folder {str(folder)!r} overlaps the input {str(given)!r}; give another run folder", option="run_dir")
    if folder.exists() and not folder.is_dir():
        raise OutputExistsError(f"run folder {str(folder)!r} exists and is not a folder; choose another", path=folder, option="run_dir")
    old = checkpoints_in(folder)
    resuming_here = resume is not None and Path(resume).absolute().parent == folder.absolute()
    if old and not resuming_here and not force:
        raise OutputExistsError(
            f"run folder {str(folder)!r} already holds checkpoints of another run ({old[-1].name}): resume from one, "
            "choose another run folder", path=folder, option="force")
    return folder


def _resume_record(settings: TrainSettings, features: Sequence[dict[str, list[int]]], base: Path) -> dict[str, Any]:
    """What a run's checkpoints record and a resumption must match: the settings that change what
    is trained, a fingerprint of the tokenised data and of the base's config."""
    import hashlib
    import json

    import numpy as np

    values = {k: v for k, v in asdict(settings).items() if k not in RESUME_FREE}
    digest = hashlib.sha256()
    for f in features:
        digest.update(np.asarray(f["input_ids"], dtype=np.int64).tobytes())
        digest.update(np.asarray(f["labels"], dtype=np.int64).tobytes())
        digest.update(b"|")
    config = base / "config.json"
    return {
        "settings": json.loads(json.dumps(values, default=repr)),
        "data": {"examples": len(features), "sha256": digest.hexdigest()},
        "base_config_sha256": hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None,
    }


def _nested_model(base: Path, settings: TrainSettings, cfg: MatryoshkaConfig) -> tuple[Any, str | list[str]]:
    """``(nested, targets)``: the base model loaded in the settings' dtype (4-bit NF4 with
    ``load_in_4bit``; no KV cache: training never decodes) with a nested adapter of ``cfg`` on its
    target modules, gradient checkpointing on when asked; warns about targets narrower than the rank.

    Raises:
        BaseModelError: transformers cannot load the base.
        ConfigError: the target modules match nothing in the model.
    """
    from .model import add_nested_adapter

    model = _load_quantized(base, settings) if settings.load_in_4bit else load_base_model(base, settings.dtype)
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False
    targets = settings.target_modules if isinstance(settings.target_modules, str) else list(settings.target_modules)
    nested = add_nested_adapter(model, cfg, target_modules=targets, dropout=settings.dropout, seed=settings.seed, recipe=settings.recipe)
    if settings.gradient_checkpointing:
        inner = nested.model.get_base_model()
        if hasattr(inner, "activation_checkpointing_enable"):  # transformers 5.25 renamed gradient_checkpointing_enable
            inner.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        nested.model.enable_input_require_grads()
    _warn_rank_above_width(nested)
    return nested, targets


def _load_quantized(base: Path, settings: TrainSettings) -> Any:
    """The base quantised to 4-bit NF4 (double quantisation) by bitsandbytes, computing in bfloat16
    with ``bf16`` or a bfloat16 base and float32 otherwise, prepared for training by PEFT (QLoRA).

    Raises:
        BaseModelError: transformers cannot load or quantise the base.
    """
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    from .model import quiet_peft

    compute = torch.bfloat16 if settings.bf16 or settings.dtype == "bfloat16" else torch.float32
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)
    model = load_base_model(base, settings.dtype, quantization_config=quant)
    with quiet_peft():
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def _make_trainer(nested: Any, settings: TrainSettings, folder: Path, features: Sequence[dict[str, list[int]]], pad_token_id: int,
                  progress: Progress | None, eval_features: Sequence[dict[str, list[int]]] | None = None) -> tuple[Any, Any]:
    """``(trainer, heldout callback or None)``: a ``transformers.Trainer`` (:mod:`.trainer`: checkpoints
    without pickles, the loss from the supervised positions' logits only, the nested recipe) on the nested model with
    :class:`~.callbacks.NestedRankCallback`; no log lines on stdout (the CLI's ``--json`` owns it)
    and our own progress instead of Trainer's bar."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from ..data import CompletionCollator
    from .callbacks import HeldoutRanksCallback, StepProgressCallback
    from .trainer import nested_trainer_class

    trainer = nested_trainer_class()(
        nested,
        args=_training_arguments(settings, folder),
        train_dataset=features,
        data_collator=CompletionCollator(pad_token_id),
    )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    heldout = None
    if eval_features is not None:
        ranks = settings.eval_ranks or default_eval_ranks(nested.config.train_ranks)
        heldout = HeldoutRanksCallback(nested, eval_features, pad_token_id, ranks, every=settings.eval_steps, batch_size=settings.batch_size)
        heldout.log = trainer.log
        trainer.add_callback(heldout)
    if progress is not None:
        trainer.add_callback(StepProgressCallback(progress))
    return trainer, heldout


def default_eval_ranks(train_ranks: Sequence[int]) -> tuple[int, ...]:
    """A few train ranks to score during training: the smallest, a middle one and the largest."""
    ranks = sorted(train_ranks)
    return tuple(sorted({ranks[0], ranks[len(ranks) // 2], ranks[-1]}))


def _training_record(settings: TrainSettings, records: Any, steps: int, world: int, targets: str | list[str]) -> dict[str, Any]:
    """The ``training`` section the adapter records: the data's name (file name, or Hub id with
    split) and record kind, steps, learning rate, seed, global batch size, target modules and the
    recipe options that are not the default."""
    record: dict[str, Any] = {
        "data": records.name,
        "data_kind": records.kind,
        "steps": steps,
        "lr": settings.lr,
        "seed": settings.seed,
        "batch_size": settings.batch_size * settings.grad_accum * world,
        "target_modules": targets,
    }
    recipe = settings.recipe.changed()
    if recipe:
        record["recipe"] = recipe
    return record


__all__ = ["REPORTERS", "RunOptions", "TrainResult", "TrainSettings", "check_environment", "default_eval_ranks", "heldout_loss", "train"]
