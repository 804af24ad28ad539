"""Loading a local base model and its tokenizer with transformers: local files only, safetensors only.

Nothing is downloaded (``local_files_only``) and pickle weights are never loaded
(``use_safetensors=True``); every folder is first checked by :func:`~.folder.scan_base`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Final, Literal

from ..errors import BaseModelError, ConfigError, DataError
from .folder import check_base_model_dir

#: ``dtype`` values accepted by :func:`load_base_model` (``auto``: as saved in the folder).
DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16")
_TOKENIZER_HINT = "save the tokenizer into the model folder"
#: Files one of which a saved tokenizer always has (fast, SentencePiece, BPE or WordPiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "merges.txt", "spiece.model", "sentencepiece.bpe.model", "special_tokens_map.json")

TASK_CAUSAL_LM: Final = "causal-lm"
TASK_SEQ_CLS: Final = "sequence-classification"
#: The model heads a base may have: a causal LM or a sequence classifier (read from ``architectures``).
Task = Literal["causal-lm", "sequence-classification"]


def check_dtype(dtype: str) -> str:
    """Validate a ``dtype`` name of :data:`DTYPES`.

    Raises:
        ConfigError: an unknown name.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    return dtype


def check_device(device: str) -> str:
    """Validate a torch device name before anything is loaded: it must parse, and a CUDA (or
    other accelerator) device must exist on this machine.

    Raises:
        ConfigError: an unknown device name, or a device this machine does not have.
    """
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"device {str(device)[:40]!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return device
    backend = getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise ConfigError(f"device {device!r}: this machine has no {dev.type} device; use cpu")
    count = getattr(backend, "device_count", lambda: 1)()
    if dev.index is not None and dev.index >= count:
        raise ConfigError(f"device {device!r}: this machine has {count} {dev.type} device(s), numbered from 0")
    return device


def base_task(path: str | os.PathLike[str]) -> Task:
    """The head of the base model in ``path``, read from ``config.json``'s ``architectures``.

    Raises:
        BaseModelError: transformers cannot read the config, or the architectures are neither a
            causal LM (``…ForCausalLM``, ``…LMHeadModel``, or none named) nor a sequence classifier.
    """
    import transformers

    root = check_base_model_dir(path)
    try:
        config = transformers.AutoConfig.from_pretrained(root, local_files_only=True)
    except Exception as e:  # any parse failure is a bad input
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BaseModelError(f"{root / 'config.json'}: cannot be read by transformers ({first})") from e
    archs = list(getattr(config, "architectures", None) or [])
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return TASK_SEQ_CLS
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) or not archs:
        return TASK_CAUSAL_LM
    raise BaseModelError(
        f"{root / 'config.json'}: architectures {archs} are not supported; expected a causal LM (…ForCausalLM, …LMHeadModel) "
        "or a sequence classifier (…ForSequenceClassification)"
    )


def _not_input_errors(torch: Any) -> tuple[type[BaseException], ...]:
    """Failures of the machine, not of the base folder, that loading lets through unchanged: out of
    host memory (``MemoryError``) or of accelerator memory (``torch.OutOfMemoryError``). They are
    resource limits to report as such (exit 1), not bad input. (A ``RecursionError`` stays a bad
    folder: only a hostile file gets the loader there.)"""
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
    return (MemoryError,) + ((oom,) if isinstance(oom, type) else ())


def load_base_model(
    path: str | os.PathLike[str], dtype: str = "float32", *, device: str | None = None, task: Task = TASK_CAUSAL_LM,
    quantization_config: Any | None = None,
) -> Any:
    """Load the model in a local folder (``local_files_only``, safetensors only), in eval mode.

    ``dtype`` is one of :data:`DTYPES`; ``device``, when given, is where the model is moved;
    ``task`` picks the head class (see :func:`base_task`); ``quantization_config`` (e.g. a
    ``BitsAndBytesConfig``) goes to ``from_pretrained``, which then places the model itself.

    Raises:
        ConfigError: an unknown ``dtype`` or ``device``.
        BaseModelError: the folder fails :func:`~.folder.scan_base` or transformers cannot load it.
        MemoryError, torch.OutOfMemoryError: not enough memory for the model (propagated unchanged).
    """
    import torch
    import transformers

    p = check_base_model_dir(path)
    check_dtype(dtype)
    if device is not None:
        check_device(device)
    auto = transformers.AutoModelForSequenceClassification if task == TASK_SEQ_CLS else transformers.AutoModelForCausalLM
    torch_dtype: Any = "auto" if dtype == "auto" else getattr(torch, dtype)
    try:
        extra = {} if quantization_config is None else {"quantization_config": quantization_config}
        model = auto.from_pretrained(str(p), local_files_only=True, use_safetensors=True, dtype=torch_dtype, **extra)
    except _not_input_errors(torch):
        raise  # the machine ran out of something: not a fault of the folder, so not a BaseModelError (exit 2)
    except Exception as e:  # any other failure to build the model from the folder is a bad base folder
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        kind = "a sequence classifier" if task == TASK_SEQ_CLS else "a causal language model"
        raise BaseModelError(f"{str(p)!r}: transformers cannot load it as {kind} ({type(e).__name__}: {first})") from e
    if device is not None:
        model = model.to(device)  # type: ignore[arg-type]  # transformers' stub wraps .to for models only
    return model.eval()


def load_tokenizer(path: str | os.PathLike[str], *, hint: str = _TOKENIZER_HINT, option: str | None = None) -> Any:
    """Load the tokenizer saved in a local folder; a tokenizer without a pad token pads with EOS.

    ``hint`` ends the error message (what the user should do); ``option`` is the error's field
    naming the caller's parameter that would give another folder.

    Raises:
        BaseModelError: no usable tokenizer in the folder.
    """
    from transformers import AutoTokenizer

    from ..data import ensure_pad_token

    folder = Path(path)
    if folder.is_dir() and not any((folder / name).exists() for name in TOKENIZER_FILES):
        # transformers 5 would build an empty tokenizer here, and every example would come out empty
        raise BaseModelError(f"{str(folder)!r} has no tokenizer (none of {', '.join(TOKENIZER_FILES[:3])}…); {hint}", option=option)
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise BaseModelError(f"no usable tokenizer in {str(path)!r} ({type(e).__name__}: {e}); {hint}", option=option) from e
    if tok is None or isinstance(tok, bool):
        raise BaseModelError(f"no usable tokenizer in {str(path)!r}; {hint}", option=option)
    try:
        size = len(tok)
    except TypeError:
        size = None
    if size == 0:
        raise BaseModelError(f"the tokenizer in {str(path)!r} is empty (no vocabulary); {hint}", option=option)
    try:
        ensure_pad_token(tok)
    except DataError as e:
        raise BaseModelError(f"tokenizer in {str(path)!r}: {e}", option=option) from e
    return tok


