"""The local base model: check a transformers model folder and load it, or its tokenizer.

Shared by training, evaluation and the demo. Nothing is downloaded (``local_files_only``) and
pickle weights are never loaded (``use_safetensors=True``; a pickle-only folder gets the one-line
conversion to run in a trusted environment).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .errors import BaseModelError, ConfigError, DataError

#: ``dtype`` values accepted by :func:`load_base_model` (``auto``: as saved in the folder).
DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
_TOKENIZER_HINT = "save the tokenizer into the model folder"


def check_base_model_dir(path: str | os.PathLike[str]) -> Path:
    """Check that ``path`` is a local transformers model folder with safetensors weights.

    Raises:
        BaseModelError: no folder, no ``config.json``, no ``model.safetensors`` (or its index), or
            pickle-only (``.bin``) weights.
    """
    p = Path(path)
    if not p.exists():
        raise BaseModelError(f"base model folder {str(p)!r} does not exist; give a local transformers model folder (config.json + *.safetensors)")
    if not p.is_dir():
        raise BaseModelError(f"base model path {str(p)!r} is a file; pass the transformers model folder (config.json + *.safetensors)")
    if not (p / "config.json").is_file():
        raise BaseModelError(f"base model folder {str(p)!r} has no config.json; save the model there with save_pretrained()")
    # What transformers loads; any other *.safetensors (an adapter, say) is no base weight, and a
    # pytorch_model.bin lying next to it must never be the fallback.
    if not ((p / SAFE_SINGLE).is_file() or (p / SAFE_INDEX).is_file()):
        pickles = sorted(q.name for q in p.iterdir() if q.name.endswith(_PICKLE_SUFFIXES))
        if pickles:
            raise BaseModelError(
                f"base model folder {str(p)!r} has only pickle weights ({', '.join(pickles[:3])}), which are never loaded; "
                "convert it once in a trusted environment: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)"
            )
        raise BaseModelError(f"base model folder {str(p)!r} has no {SAFE_SINGLE} or {SAFE_INDEX}; save the model there with save_pretrained()")
    return p


def check_dtype(dtype: str) -> str:
    """Validate a ``dtype`` name of :data:`DTYPES`.

    Raises:
        ConfigError: an unknown name.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    return dtype


def load_base_model(path: str | os.PathLike[str], dtype: str = "float32", *, device: str | None = None) -> Any:
    """Load a causal LM from a local folder (``local_files_only``, safetensors only), in eval mode.

    ``dtype`` is one of :data:`DTYPES`; ``device``, when given, is where the model is moved.

    Raises:
        ConfigError: an unknown ``dtype``.
        BaseModelError: the folder fails :func:`check_base_model_dir` or transformers cannot load it.
    """
    import torch
    from transformers import AutoModelForCausalLM

    p = check_base_model_dir(path)
    check_dtype(dtype)
    torch_dtype: Any = "auto" if dtype == "auto" else getattr(torch, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(p), local_files_only=True, use_safetensors=True, dtype=torch_dtype)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BaseModelError(f"cannot load {str(p)!r} as a causal language model: {e}") from e
    if device is not None:
        model = model.to(device)
    return model.eval()


def load_tokenizer(path: str | os.PathLike[str], *, hint: str = _TOKENIZER_HINT) -> Any:
    """Load the tokenizer saved in a local folder; a tokenizer without a pad token pads with EOS.

    ``hint`` ends the error message (what the user should do).

    Raises:
        BaseModelError: no usable tokenizer in the folder.
    """
    from transformers import AutoTokenizer

    from .data import ensure_pad_token

    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise BaseModelError(f"no usable tokenizer in {str(path)!r} ({type(e).__name__}: {e}); {hint}") from e
    if tok is None or isinstance(tok, bool):
        raise BaseModelError(f"no usable tokenizer in {str(path)!r}; {hint}")
    try:
        ensure_pad_token(tok)
    except DataError as e:
        raise BaseModelError(f"tokenizer in {str(path)!r}: {e}") from e
    return tok


__all__ = ["DTYPES", "check_base_model_dir", "check_dtype", "load_base_model", "load_tokenizer"]
