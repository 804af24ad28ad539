"""The nested adapter's files: their names, the PEFT tensor names, and checks on the weights file.

One place knows the folder layout (docs/design.md §2) and how a PEFT LoRA weights file names its
tensors (``base_model.model.<module>.lora_A/lora_B.weight``); loading, slicing and re-nesting
all read them from here.
"""

from __future__ import annotations

import logging
import mmap
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InvalidAdapterError
from ..io.jsonio import read_json as _read_json
from ..io.safetensors import SafetensorsHeader, TensorInfo, find_non_finite

logger = logging.getLogger(__name__)

NESTED_FORMAT = "mlora-nested/1"
SLICE_FORMAT = "mlora-slice/1"
CONFIG_NAME = "matryoshka_config.json"
PEFT_CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
#: A folder holding this file is a variant bundle: its nested adapter is in :data:`BUNDLE_NESTED_DIR`.
BUNDLE_MANIFEST_NAME = "manifest.json"
BUNDLE_NESTED_DIR = "nested"
#: The prefix PEFT gives every tensor of a saved adapter.
KEY_PREFIX = "base_model.model."
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")

_KEY_RE = re.compile(rf"^{re.escape(KEY_PREFIX)}(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: its name in the base model and the shapes of its LoRA factors."""

    name: str
    in_features: int
    out_features: int

    @property
    def key_a(self) -> str:
        return f"{KEY_PREFIX}{self.name}.lora_A.weight"

    @property
    def key_b(self) -> str:
        return f"{KEY_PREFIX}{self.name}.lora_B.weight"

    def params_at(self, k: int) -> int:
        """Parameter count of this module's rank-``k`` adapter."""
        return k * (self.in_features + self.out_features)


def map_file(fd: int, *, populate: bool = False) -> "mmap.mmap":
    """A read-only map of the whole open file.

    ``populate`` maps every page up front (one call instead of a page fault per 4 KiB, and
    ``write`` from the map then runs at copy speed), where the platform has ``MAP_POPULATE`` and
    the file takes at most a quarter of the machine's memory: a larger file is mapped lazily so
    it is never all pulled into memory at once.
    """
    if populate and hasattr(mmap, "MAP_POPULATE") and os.fstat(fd).st_size <= _physical_memory() // 4:
        return mmap.mmap(fd, 0, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=mmap.PROT_READ)
    return mmap.mmap(fd, 0, access=mmap.ACCESS_READ)


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 0


def check_finite(weights: Path, header: SafetensorsHeader, buffer: Any = None, keys: Iterable[str] | None = None) -> None:
    """Raise :class:`InvalidAdapterError` if a tensor of ``weights`` (of ``keys``, if given)
    holds a NaN or an infinity.

    ``buffer`` is the file already mapped (see :meth:`AdapterReader.check_finite`); otherwise the
    file is mapped here.
    """
    if buffer is None:
        if os.path.getsize(weights) <= header.data_start:
            return
        with open(weights, "rb") as f, map_file(f.fileno(), populate=True) as mm:
            bad = find_non_finite(mm, header, names=keys)
    else:
        bad = find_non_finite(buffer, header, names=keys)
    if bad is not None:
        raise InvalidAdapterError(f"{weights}: tensor {bad!r} has NaN or infinite values; the training diverged or the file is corrupt", path=weights, tensor=bad)


def read_json(path: Path) -> Any:
    return _read_json(path, InvalidAdapterError, what=path.name)


def is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def adapter_files(path: str | os.PathLike[str]) -> tuple[Path, Path, Path]:
    """``(folder, weights file, adapter_config.json)`` of a PEFT LoRA adapter folder, checked to exist.

    For a variant bundle (a folder with ``manifest.json`` and ``nested/``) the folder is its ``nested/``.

    Raises:
        InvalidAdapterError: the folder is missing or a file, or has no safetensors weights (with the
            conversion to run where only pickle weights exist) or no ``adapter_config.json``.
    """
    root = Path(path)
    if not root.exists():
        raise InvalidAdapterError(f"adapter folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise InvalidAdapterError(f"adapter path {str(root)!r} is a file; pass the adapter folder")
    if (root / BUNDLE_MANIFEST_NAME).is_file() and (root / BUNDLE_NESTED_DIR).is_dir():
        # a variant bundle (docs/design.md §2): its root holds the default rank only; the adapter is nested/
        logger.info("%s is a variant bundle: reading its nested adapter from %s/", root, BUNDLE_NESTED_DIR)
        root = root / BUNDLE_NESTED_DIR
    weights = root / WEIGHTS_NAME
    if not weights.exists() and not weights.is_symlink():  # a dangling link is reported where it is opened
        if (root / PICKLE_WEIGHTS_NAME).exists():
            raise InvalidAdapterError(
                f"{root / PICKLE_WEIGHTS_NAME}: pickle weights are refused (unpickling runs arbitrary code); "
                "in a trusted environment load the adapter with PEFT and call save_pretrained(..., safe_serialization=True)"
            )
        inner = sorted(p.name for p in root.iterdir() if p.is_dir() and (p / WEIGHTS_NAME).is_file())
        if inner:  # a folder of adapters: the output of `slice`, a grid of LoRA runs
            shown = ", ".join(f"{n}/" for n in inner[:6]) + (f" and {len(inner) - 6} more" if len(inner) > 6 else "")
            raise InvalidAdapterError(f"{root}: no {WEIGHTS_NAME} here, but it holds adapter folders {shown}: pass one of them", path=root)
        raise InvalidAdapterError(f"{root}: no {WEIGHTS_NAME} found; is this a PEFT LoRA adapter folder?", path=root)
    peft_path = root / PEFT_CONFIG_NAME
    if not peft_path.exists() and not peft_path.is_symlink():
        raise InvalidAdapterError(f"{root}: no {PEFT_CONFIG_NAME} found; is this a PEFT LoRA adapter folder?", path=root)
    return root, weights, peft_path


#: Hints for tensors that are not ``lora_A``/``lora_B`` weights, by a part of their name.
TENSOR_HINTS: tuple[tuple[str, str], ...] = (
    ("lora_magnitude_vector", "a DoRA magnitude vector: DoRA is not supported"),
    ("lora_embedding", "an embedding LoRA: only linear and Conv1D targets are supported"),
    ("modules_to_save", "a module saved whole (modules_to_save): not supported"),
    (".bias", "a bias: adapters that train biases (bias or lora_bias) are not supported"),
)


def lora_tensor_pairs(weights: Path, header: SafetensorsHeader) -> dict[str, tuple[TensorInfo, TensorInfo]]:
    """Module name → ``(lora_A, lora_B)`` of a PEFT LoRA weights file, in file order.

    The one reading of a LoRA file's tensor names that the adapter loader and re-nesting share;
    each then checks the ranks its format allows.

    Raises:
        InvalidAdapterError: a tensor that is not ``<prefix><module>.lora_A/lora_B.weight`` (with a
            hint for DoRA, embedding LoRA, saved modules, biases), no LoRA tensor, a lone
            ``lora_A`` or ``lora_B``, a non-float dtype, a tensor that is not 2-D or has a
            zero-size dimension.
    """
    parts: dict[str, dict[str, TensorInfo]] = {}
    for key, info in header.tensors.items():
        m = _KEY_RE.match(key)
        if m is None:
            hint = next((f" ({text})" for part, text in TENSOR_HINTS if part in key), "")
            raise InvalidAdapterError(f"{weights}: unexpected tensor {key!r}{hint}; expected only {KEY_PREFIX}<module>.lora_A/lora_B.weight", path=weights, tensor=key)
        parts.setdefault(m["module"], {})[m["part"]] = info
    if not parts:
        raise InvalidAdapterError(f"{weights}: holds no LoRA tensors", path=weights)
    out = {}
    for name, p in parts.items():
        for need, other in (("lora_A", "lora_B"), ("lora_B", "lora_A")):
            if need not in p:
                raise InvalidAdapterError(f"{weights}: module {name!r} has {other} but no {need}; the file is incomplete", path=weights)
        for info in (p["lora_A"], p["lora_B"]):
            if info.dtype not in FLOAT_DTYPES:
                raise InvalidAdapterError(f"{weights}: tensor {info.name!r} has dtype {info.dtype}; expected a float type", path=weights, tensor=info.name)
            if len(info.shape) != 2:
                raise InvalidAdapterError(f"{weights}: tensor {info.name!r} has shape {list(info.shape)}; expected 2 dimensions (linear or Conv1D targets)", path=weights, tensor=info.name)
            if 0 in info.shape:
                raise InvalidAdapterError(f"{weights}: tensor {info.name!r} has shape {list(info.shape)}, a zero-size dimension; the file is corrupt", path=weights, tensor=info.name)
        out[name] = (p["lora_A"], p["lora_B"])
    return out

