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
#: Files one of which a saved tokenizer always has (fast, SentencePiece, BPE or WordPiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "merges.txt", "spiece.model", "sentencepiece.bpe.model", "special_tokens_map.json")


def check_base_model_dir(path: str | os.PathLike[str]) -> Path:
    """Check that ``path`` is a local transformers model folder with safetensors weights.

    ``config.json`` must be a JSON object naming a ``model_type`` transformers knows (or custom
    code through ``auto_map``); the weights are ``model.safetensors`` or the shards its index
    names (plain file names in the folder), and every shard's header is read and checked (a
    truncated download fails here, not halfway through loading).

    Raises:
        BaseModelError: no folder, a broken or missing ``config.json``, no ``model.safetensors``
            (or its index), a broken index or shard, or pickle-only (``.bin``) weights.
    """
    p = Path(path)
    if not p.exists():
        raise BaseModelError(f"base model folder {str(p)!r} does not exist; give a local transformers model folder (config.json + *.safetensors)")
    if not p.is_dir():
        raise BaseModelError(f"base model path {str(p)!r} is a file; pass the transformers model folder (config.json + *.safetensors)")
    if not (p / "config.json").exists():
        raise BaseModelError(f"base model folder {str(p)!r} has no config.json; save the model there with save_pretrained()")
    check_base_config(p)
    # What transformers loads; any other *.safetensors (an adapter, say) is no base weight, and a
    # pytorch_model.bin lying next to it must never be the fallback.
    if not ((p / SAFE_SINGLE).exists() or (p / SAFE_INDEX).exists()):
        pickles = sorted(q.name for q in p.iterdir() if q.name.endswith(_PICKLE_SUFFIXES))
        if pickles:
            raise BaseModelError(
                f"base model folder {str(p)!r} has only pickle weights ({', '.join(pickles[:3])}), which are never loaded; "
                "convert it once in a trusted environment: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)"
            )
        raise BaseModelError(f"base model folder {str(p)!r} has no {SAFE_SINGLE} or {SAFE_INDEX}; save the model there with save_pretrained()")
    base_weight_infos(p)
    return p


def check_base_config(root: Path) -> dict[str, Any]:
    """Read ``root/config.json`` strictly: a JSON object whose ``model_type`` transformers knows
    (or that brings its own code through ``auto_map``). Returns it.

    Raises:
        BaseModelError: missing, not a regular file, not JSON, not an object, or an unknown model type.
    """
    from .fs import read_json

    path = root / "config.json"
    if not path.exists():
        raise BaseModelError(f"base model folder {str(root)!r} has no config.json; save the model there with save_pretrained()")
    cfg = read_json(path, BaseModelError, what="model config")
    if not isinstance(cfg, dict):
        raise BaseModelError(f"{path}: expected a JSON object, found {type(cfg).__name__}; re-download or re-save the base model")
    model_type = cfg.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise BaseModelError(f"{path}: no model_type; re-download or re-save the base model with save_pretrained()")
    if not isinstance(cfg.get("auto_map"), dict):
        from .model_types import known_model_type

        if not known_model_type(model_type):
            raise BaseModelError(
                f"{path}: model_type {model_type[:60]!r} is unknown to this transformers; upgrade transformers or fix the folder"
            )
    return cfg


def base_shard_names(root: Path) -> list[str]:
    """The weight files of a base folder: ``model.safetensors``, or the shards its index names.

    Raises:
        BaseModelError: the index is not JSON or has no ``weight_map`` of plain shard file names
            in the folder; a shard is missing or not a regular file.
    """
    from .fs import check_regular_file, read_json

    index_path = root / SAFE_INDEX
    if index_path.exists() or index_path.is_symlink():
        index = read_json(index_path, BaseModelError, what="weight index")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
            raise BaseModelError(f"{index_path}: expected a non-empty 'weight_map' of tensor name → shard file; re-download or re-save the base model")
        names = list(dict.fromkeys(weight_map.values()))
        for name in names:
            if not name or Path(name).name != name or name in (".", "..") or "\\" in name:
                raise BaseModelError(f"{index_path}: shard name {name[:80]!r} is not a plain file name in the folder")
    else:
        names = [SAFE_SINGLE]
    for name in names:
        if not (root / name).exists():
            raise BaseModelError(f"{root / name}: missing (named by the base model's weights); re-download the base model")
        check_regular_file(root / name, BaseModelError, what="weight shard")
    return names


def base_weight_infos(root: Path) -> dict[str, Any]:
    """Tensor name → :class:`~mlora_export.safetensors_io.TensorInfo` over every shard of a base
    folder (headers only), each shard's header checked.

    Raises:
        BaseModelError: see :func:`base_shard_names`; a shard's header is corrupt or the file truncated.
    """
    from .errors import InvalidAdapterError
    from .safetensors_io import read_header

    out: dict[str, Any] = {}
    for name in base_shard_names(root):
        try:
            header = read_header(root / name)
        except InvalidAdapterError as e:  # read_header's error class; here it is the base model that is bad
            raise BaseModelError(str(e)) from e
        for key, info in header.tensors.items():
            out.setdefault(key, info)
    return out


#: safetensors dtypes a targeted base weight may have: a quantized one cannot take an exact delta.
FLOAT_WEIGHT_DTYPES = ("F32", "F16", "BF16", "F64")


def check_float_targets(root: Path, modules: Any) -> None:
    """Check that the base weight of every adapted module (``<module>.weight``, up to a prefix
    the checkpoint adds or drops) is stored as a float tensor.

    Raises:
        BaseModelError: a target weight is an integer (quantized) tensor.
    """
    infos = base_weight_infos(root)
    for module in modules:
        want = f"{module}.weight"
        for key, info in infos.items():
            if key == want or want.endswith("." + key) or key.endswith("." + want):
                if info.dtype not in FLOAT_WEIGHT_DTYPES:
                    raise BaseModelError(
                        f"base weight {key!r} in {str(root)!r} has dtype {info.dtype}; only float weights "
                        f"({', '.join(FLOAT_WEIGHT_DTYPES)}) can carry the adapter exactly: use the unquantized base model"
                    )
                break


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
    if device is not None:
        check_device(device)
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

    folder = Path(path)
    if folder.is_dir() and not any((folder / name).exists() for name in TOKENIZER_FILES):
        # transformers 5 would build an empty tokenizer here, and every example would come out empty
        raise BaseModelError(f"{str(folder)!r} has no tokenizer (none of {', '.join(TOKENIZER_FILES[:3])}…); {hint}")
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise BaseModelError(f"no usable tokenizer in {str(path)!r} ({type(e).__name__}: {e}); {hint}") from e
    if tok is None or isinstance(tok, bool):
        raise BaseModelError(f"no usable tokenizer in {str(path)!r}; {hint}")
    try:
        size = len(tok)
    except TypeError:
        size = None
    if size == 0:
        raise BaseModelError(f"the tokenizer in {str(path)!r} is empty (no vocabulary); {hint}")
    try:
        ensure_pad_token(tok)
    except DataError as e:
        raise BaseModelError(f"tokenizer in {str(path)!r}: {e}") from e
    return tok


__all__ = [
    "DTYPES", "FLOAT_WEIGHT_DTYPES", "base_shard_names", "base_weight_infos", "check_base_config", "check_base_model_dir",
    "check_device", "check_dtype", "check_float_targets", "load_base_model", "load_tokenizer",
]
