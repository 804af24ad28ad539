"""A local base model folder, scanned once: config, safetensors shards and their headers, index,
the files a copy of it keeps, and the pickle policy (pickle weights are never loaded).

Training, evaluation, ONNX export and the streaming merge all read a base through
:func:`scan_base`, so a folder is accepted or refused the same way by every command.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BaseModelError, InvalidAdapterError
from ..io.files import check_regular_file
from ..io.jsonio import read_json
from ..io.safetensors import SafetensorsHeader, TensorInfo, read_header

logger = logging.getLogger(__name__)

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
#: Pickle weight files: refused, never unpickled (unpickling runs arbitrary code).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
#: Files a copy of the base never takes: weights in any format (they would be the un-merged ones).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".h5", ".msgpack", ".gguf", ".onnx", ".onnx_data", ".npz")
_WEIGHT_INDEX_SUFFIXES = (".bin.index.json", ".safetensors.index.json")
#: safetensors dtypes a targeted base weight may have: a quantized one cannot take an exact delta.
FLOAT_WEIGHT_DTYPES = ("F32", "F16", "BF16", "F64")


@dataclass(frozen=True)
class Shard:
    """One safetensors weight file of the base and its header."""

    name: str
    path: Path
    header: SafetensorsHeader


@dataclass(frozen=True)
class BaseFolder:
    """A scanned base folder: its ``config.json``, its shards (headers read and checked), its
    index, and the other files a copy of it keeps (``copy_files``) or leaves out (``skipped``)."""

    root: Path
    config: dict[str, Any]
    shards: list[Shard]
    index_path: Path | None
    index: dict[str, Any] | None
    copy_files: list[Path]
    skipped: list[str]

    def locate(self) -> dict[str, tuple[Shard, TensorInfo]]:
        """Tensor name → (shard, header entry), over all shards."""
        out: dict[str, tuple[Shard, TensorInfo]] = {}
        for shard in self.shards:
            for name, info in shard.header.tensors.items():
                out.setdefault(name, (shard, info))
        return out

    def weight_infos(self) -> dict[str, TensorInfo]:
        """Tensor name → header entry, over all shards."""
        return {name: info for name, (_, info) in self.locate().items()}


def convert_hint(root: Path) -> str:
    """What to run, in a trusted environment, to turn a pickle-only base into safetensors."""
    return (
        "convert it once in a trusted environment: "
        f"`python -c \"from transformers import AutoModelForCausalLM as M; M.from_pretrained('{root}').save_pretrained('{root}-safetensors')\"` "
        "and pass the new folder"
    )


def _is_weight_file(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES) or name.endswith(_WEIGHT_INDEX_SUFFIXES)


def check_base_config(root: Path) -> dict[str, Any]:
    """Read ``root/config.json`` strictly: a JSON object whose ``model_type`` transformers knows
    (or that brings its own code through ``auto_map``). Returns it.

    Raises:
        BaseModelError: missing, not a regular file, not JSON, not an object, or an unknown model type.
    """
    path = root / "config.json"
    if not path.exists():
        raise BaseModelError(f"base model folder {str(root)!r} has no config.json; save the model there with save_pretrained()")
    cfg = read_json(path, BaseModelError, what="model config")
    if not isinstance(cfg, dict):
        raise BaseModelError(f"{path}: expected a JSON object, found {type(cfg).__name__}; re-download or re-save the base model", path=path)
    model_type = cfg.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise BaseModelError(f"{path}: no model_type; re-download or re-save the base model with save_pretrained()", path=path)
    if not isinstance(cfg.get("auto_map"), dict):
        from .model_types import known_model_type

        if not known_model_type(model_type):
            raise BaseModelError(
                f"{path}: model_type {model_type[:60]!r} is unknown to this transformers; upgrade transformers or fix the folder"
            )
    return cfg


def _shard_names(root: Path) -> tuple[list[str], dict[str, str] | None, dict[str, Any] | None]:
    """The weight files of a base folder (``model.safetensors``, or the shards its index names),
    the index's ``weight_map`` and the index itself.

    Raises:
        BaseModelError: a broken index (not JSON, no ``weight_map`` of plain shard names), a
            missing shard, or no safetensors weights at all (pickle-only weights get the
            conversion to run).
    """
    index_path = root / SAFE_INDEX
    if index_path.exists() or index_path.is_symlink():
        index = read_json(index_path, BaseModelError, what="weight index")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
            raise BaseModelError(f"{index_path}: expected a non-empty 'weight_map' of tensor name → shard file; re-download or re-save the base model", path=index_path)
        names = list(dict.fromkeys(weight_map.values()))
        for name in names:
            if not name or Path(name).name != name or name in (".", "..") or "\\" in name:
                raise BaseModelError(f"{index_path}: shard name {name[:80]!r} is not a plain file name in the folder", path=index_path)
            if not (root / name).exists():
                raise BaseModelError(f"{index_path}: names shard {name!r}, which is missing from {str(root)!r}; re-download the base model", path=index_path)
        return names, weight_map, index  # type: ignore[return-value]
    if (root / SAFE_SINGLE).exists() or (root / SAFE_SINGLE).is_symlink():
        return [SAFE_SINGLE], None, None
    pickles = sorted(q.name for q in root.iterdir() if q.name.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise BaseModelError(
            f"base model folder {str(root)!r} has only pickle weights ({', '.join(pickles[:3])}): pickle weights are refused, never loaded "
            f"(unpickling runs arbitrary code); {convert_hint(root)}"
        )
    raise BaseModelError(f"base model folder {str(root)!r} has no {SAFE_SINGLE} or {SAFE_INDEX}; save the model there with save_pretrained()")


def scan_base(path: str | os.PathLike[str]) -> BaseFolder:
    """Check and scan a local transformers model folder with safetensors weights.

    ``config.json`` must be a JSON object naming a ``model_type`` transformers knows (or custom
    code through ``auto_map``); the weights are ``model.safetensors`` or the shards its index
    names (plain file names in the folder); every shard's header is read and checked (a
    truncated download fails here, not halfway through loading), and every tensor the index
    maps to a shard must be in it. Only headers are read.

    Raises:
        BaseModelError: no folder, a broken or missing ``config.json``, no ``model.safetensors``
            (or its index), a broken index or shard, or pickle-only (``.bin``) weights.
    """
    root = Path(path)
    if not root.exists():
        raise BaseModelError(f"base model folder {str(root)!r} does not exist; give a local transformers model folder (config.json + *.safetensors)")
    if not root.is_dir():
        raise BaseModelError(f"base model path {str(root)!r} is a file; pass the transformers model folder (config.json + *.safetensors)")
    config = check_base_config(root)
    names, weight_map, index = _shard_names(root)
    shards = []
    for name in names:
        check_regular_file(root / name, BaseModelError, what="weight shard")
        try:
            header = read_header(root / name)
        except InvalidAdapterError as e:  # read_header's error class; here it is the base model that is bad
            raise BaseModelError(str(e), path=e.path, tensor=e.tensor) from e
        shards.append(Shard(name, root / name, header))
    if weight_map is not None:
        by_name = {s.name: s for s in shards}
        for key, shard_name in weight_map.items():
            if key not in by_name[shard_name].header.tensors:
                raise BaseModelError(
                    f"{root / SAFE_INDEX}: tensor {key!r} is mapped to {shard_name!r} but that shard does not hold it; re-download the base model"
                )
    copy_files: list[Path] = []
    skipped: list[str] = []
    for entry in sorted(root.iterdir()):
        if entry.name in names or entry.name == SAFE_INDEX:
            continue
        if entry.name.startswith(".") or not entry.is_file() or _is_weight_file(entry.name):
            skipped.append(entry.name + ("/" if entry.is_dir() else ""))
            continue
        copy_files.append(entry)
    return BaseFolder(root, config, shards, root / SAFE_INDEX if index is not None else None, index, copy_files, skipped)


def check_base_model_dir(path: str | os.PathLike[str]) -> Path:
    """:func:`scan_base` for callers that need only the checked folder."""
    return scan_base(path).root


def check_float_targets(base: BaseFolder, modules: Any) -> None:
    """Check that the base weight of every adapted module (``<module>.weight``, up to a prefix
    the checkpoint adds or drops) is stored as a float tensor.

    Raises:
        BaseModelError: a target weight is an integer (quantized) tensor.
    """
    infos = base.weight_infos()
    for module in modules:
        want = f"{module}.weight"
        for key, info in infos.items():
            if key == want or want.endswith("." + key) or key.endswith("." + want):
                if info.dtype not in FLOAT_WEIGHT_DTYPES:
                    raise BaseModelError(
                        f"base weight {key!r} in {str(base.root)!r} has dtype {info.dtype}; only float weights "
                        f"({', '.join(FLOAT_WEIGHT_DTYPES)}) can carry the adapter exactly: use the unquantized base model"
                    )
                break
