"""The nested adapter on disk (DESIGN.md §2): load, validate, read slices, save.

A nested adapter is a folder that is a valid PEFT LoRA adapter at the full rank ``r`` plus a
``matryoshka_config.json``. :class:`NestedAdapter` also opens plain PEFT LoRA folders (a slice
written by :mod:`mlora_export.converters.slice`, or any LoRA adapter): they load as a ``lora``
adapter whose only train rank is their rank, so every converter accepts them too.

Orientation (PEFT): ``lora_A`` is ``[r, in]``, ``lora_B`` is ``[out, r]``; for a ``Conv1D``
target (``fan_in_fan_out``) the delta is transposed to the base weight's ``[in, out]`` in
:func:`orient_delta`, the one place that knows about it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import mmap
import os
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import __version__
from .errors import ConfigError, InvalidAdapterError, RankError
from .method import (
    check_method,
    check_rank_weights,
    check_scaling,
    check_train_ranks,
    lora_diagonal,
    matryoshka_diagonal,
    peft_alpha_for,
    scale,
)
from .safetensors_io import DTYPE_SIZES, SafetensorsHeader, TensorInfo, find_non_finite, read_header, save_tensors
from .validate import is_finite_real, is_int, is_real

if TYPE_CHECKING:
    import torch

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
KEY_PREFIX = "base_model.model."
REQUIRED_FIELDS = ("format", "method", "max_rank", "train_ranks", "scaling", "alpha")
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")

_KEY_RE = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")


@dataclass(frozen=True)
class MatryoshkaConfig:
    """The contents of ``matryoshka_config.json`` (required fields plus kept optional ones).

    ``extra`` holds every other field found on disk (``base_model``, ``created_by``, evaluation
    results…) so that a load/save round trip keeps them. ``rank_weights`` (``nested-loss`` only)
    are the weights over ``train_ranks`` of the per-example rank assignment, normalised to sum 1;
    ``None`` is uniform.
    """

    method: str
    max_rank: int
    train_ranks: tuple[int, ...]
    scaling: str = "sqrt"
    alpha: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)
    rank_weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        check_method(self.method)
        check_scaling(self.scaling)
        object.__setattr__(self, "train_ranks", check_train_ranks(self.train_ranks, self.max_rank))
        if not is_real(self.alpha) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ConfigError(f"alpha must be a positive finite number, got {self.alpha!r}")
        object.__setattr__(self, "alpha", float(self.alpha))
        if self.rank_weights is not None and self.method != "nested-loss":
            raise ConfigError(f"rank weights apply to method 'nested-loss' only, not {self.method!r}")
        object.__setattr__(self, "rank_weights", check_rank_weights(self.rank_weights, self.train_ranks))

    @property
    def p(self) -> list[float] | None:
        """The fixed training diagonal (``None`` for ``dylora``, whose diagonal is sampled per step)."""
        if self.method == "matryoshka":
            return matryoshka_diagonal(self.max_rank, self.train_ranks, self.scaling, self.alpha)
        if self.method == "lora":
            return lora_diagonal(self.max_rank, self.scaling, self.alpha)
        return None

    def scale(self, k: int) -> float:
        """``s(k)`` for this adapter's scaling and alpha."""
        return scale(k, self.scaling, self.alpha)

    @property
    def base_model(self) -> str | None:
        value = self.extra.get("base_model")
        return str(value) if value is not None else None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: required fields, ``p`` recomputed, then the kept optional fields."""
        out: dict[str, Any] = {
            "format": NESTED_FORMAT,
            "method": self.method,
            "max_rank": self.max_rank,
            "train_ranks": list(self.train_ranks),
            "scaling": self.scaling,
            "alpha": self.alpha,
        }
        if self.p is not None:
            out["p"] = self.p
        if self.rank_weights is not None:
            out["rank_weights"] = list(self.rank_weights)
        for k, v in self.extra.items():
            if k not in out and k not in ("p", "format", "rank_weights"):
                out[k] = v
        out.setdefault("created_by", f"mlora-export {__version__}")
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = CONFIG_NAME) -> "MatryoshkaConfig":
        """Validate a parsed ``matryoshka_config.json``; raise :class:`InvalidAdapterError` naming ``source``."""
        if not isinstance(data, Mapping):
            raise InvalidAdapterError(f"{source}: expected a JSON object, found {type(data).__name__}")
        missing = [k for k in REQUIRED_FIELDS if k not in data]
        if missing:
            raise InvalidAdapterError(f"{source}: missing required field(s) {', '.join(missing)} (see DESIGN.md §2)")
        if data["format"] != NESTED_FORMAT:
            raise InvalidAdapterError(f"{source}: format is {data['format']!r}, expected {NESTED_FORMAT!r}")
        max_rank, train_ranks = data["max_rank"], data["train_ranks"]
        if not is_int(max_rank):
            raise InvalidAdapterError(f"{source}: max_rank must be an integer, found {max_rank!r}")
        if not isinstance(train_ranks, list):
            raise InvalidAdapterError(f"{source}: train_ranks must be a list of integers, found {train_ranks!r}")
        extra = {k: v for k, v in data.items() if k not in REQUIRED_FIELDS and k not in ("p", "rank_weights")}
        weights = data.get("rank_weights")
        if weights is not None and not isinstance(weights, list):
            raise InvalidAdapterError(f"{source}: rank_weights must be a list of numbers, found {weights!r}")
        try:
            cfg = cls(
                method=data["method"],
                max_rank=max_rank,
                train_ranks=tuple(train_ranks),
                scaling=data["scaling"],
                alpha=data["alpha"],
                extra=extra,
                rank_weights=tuple(weights) if weights is not None else None,
            )
        except (ConfigError, RankError) as e:
            raise InvalidAdapterError(f"{source}: {e}") from e
        stored_p = data.get("p")
        if stored_p is not None and cfg.method in ("matryoshka", "lora") and (not isinstance(stored_p, list) or len(stored_p) != max_rank):
            # cheap, before the recomputation below, which costs O(max_rank · |T|)
            raise InvalidAdapterError(f"{source}: stored p must be a list of max_rank = {max_rank} numbers; remove 'p' or fix it")
        if stored_p is not None:
            expected = cfg.p
            if expected is None:
                logger.warning("%s: ignoring stored p for method %r (its diagonal is sampled per step)", source, cfg.method)
            elif (
                not isinstance(stored_p, list)
                or len(stored_p) != len(expected)
                or not all(isinstance(a, (int, float)) and math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9) for a, b in zip(stored_p, expected))
            ):
                raise InvalidAdapterError(
                    f"{source}: stored p does not match the value recomputed from method, max_rank, train_ranks, "
                    f"scaling and alpha ({expected[:8]}{'…' if len(expected) > 8 else ''}); the file was edited or "
                    "written by another tool: remove 'p' or fix the other fields"
                )
        return cfg


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


def _map_file(fd: int, *, populate: bool = False) -> "mmap.mmap":
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


def _check_finite(weights: Path, header: SafetensorsHeader, buffer: Any = None, keys: Iterable[str] | None = None) -> None:
    """Raise :class:`InvalidAdapterError` if a tensor of ``weights`` (of ``keys``, if given)
    holds a NaN or an infinity.

    ``buffer`` is the file already mapped (see :meth:`AdapterReader.check_finite`); otherwise the
    file is mapped here.
    """
    if buffer is None:
        if os.path.getsize(weights) <= header.data_start:
            return
        with open(weights, "rb") as f, _map_file(f.fileno(), populate=True) as mm:
            bad = find_non_finite(mm, header, names=keys)
    else:
        bad = find_non_finite(buffer, header, names=keys)
    if bad is not None:
        raise InvalidAdapterError(f"{weights}: tensor {bad!r} has NaN or infinite values; the training diverged or the file is corrupt")


def scratch_bytes(out_features: int, k: int) -> int:
    """Size of the ``scratch`` :meth:`AdapterReader.lora_B_data` needs for a ``[out_features, k]`` result."""
    return 10 * out_features * k  # bfloat16: two uint32 work arrays and the uint16 result


#: numpy type of each float dtype's elements; bfloat16 is handled as its uint16 bit patterns.
_NUMPY_TYPES: dict[str, type[np.generic]] = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16}


def orient_delta(delta: "torch.Tensor", fan_in_fan_out: bool) -> "torch.Tensor":
    """Return ``delta`` (``[out, in]``) in the layout of the base weight: transposed for ``Conv1D``."""
    return delta.T if fan_in_fan_out else delta


def _read_json(path: Path) -> Any:
    from .fs import read_json

    return read_json(path, InvalidAdapterError, what=path.name)


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


#: The ``adapter_config.json`` keys this package reads or copies, and the JSON types PEFT gives
#: them (``None`` allowed where PEFT's default is ``None`` or the key is optional).
_PEFT_TYPES: dict[str, tuple[str, Any]] = {
    "peft_type": ("a string", lambda v: isinstance(v, str)),
    "task_type": ("a string or null", lambda v: v is None or isinstance(v, str)),
    "base_model_name_or_path": ("a string or null", lambda v: v is None or isinstance(v, str)),
    "fan_in_fan_out": ("true or false", lambda v: isinstance(v, bool)),
    "use_rslora": ("true or false", lambda v: isinstance(v, bool)),
    "use_dora": ("true or false", lambda v: isinstance(v, bool)),
    "lora_bias": ("true or false", lambda v: isinstance(v, bool)),
    "inference_mode": ("true or false", lambda v: isinstance(v, bool)),
    "target_modules": ("a string, a list of strings or null", lambda v: v is None or isinstance(v, str) or _is_str_list(v)),
    "modules_to_save": ("a list of strings or null", lambda v: v is None or _is_str_list(v)),
    "exclude_modules": ("a string, a list of strings or null", lambda v: v is None or isinstance(v, str) or _is_str_list(v)),
    "layers_to_transform": ("an integer, a list of integers or null",
                            lambda v: v is None or is_int(v) or (isinstance(v, list) and all(is_int(x) for x in v))),
    "rank_pattern": ("an object", lambda v: v is None or isinstance(v, dict)),
    "alpha_pattern": ("an object", lambda v: v is None or isinstance(v, dict)),
    "lora_dropout": ("a number in [0, 1)", lambda v: is_finite_real(v) and 0 <= v < 1),
    "bias": ("'none', 'all' or 'lora_only'", lambda v: v in ("none", "all", "lora_only")),
    "init_lora_weights": ("true, false or a method name", lambda v: isinstance(v, (bool, str))),
}


#: The largest ``r`` an adapter may declare (far above any LoRA rank in use): a larger one is a
#: corrupt or hostile file, refused before anything of that size is computed.
MAX_LORA_RANK = 1 << 16


def _check_peft_config(cfg: Any, path: Path) -> None:
    """Check ``adapter_config.json``'s kind and the types of every key this package reads or
    copies; nothing is coerced (``"false"`` is not false).

    Raises:
        InvalidAdapterError: naming the key, the expected type and the value found.
    """
    if not isinstance(cfg, dict):
        raise InvalidAdapterError(f"{path}: expected a JSON object, found {type(cfg).__name__}")
    peft_type = cfg.get("peft_type")
    if peft_type != "LORA":
        raise InvalidAdapterError(f"{path}: peft_type is {str(peft_type)[:40]!r}; only LoRA adapters (peft_type 'LORA') are supported")
    for key, (expected, ok) in _PEFT_TYPES.items():
        if key in cfg and not ok(cfg[key]):
            raise InvalidAdapterError(f"{path}: {key} must be {expected}, found {json.dumps(cfg[key])[:60]}; fix the file")
    if cfg.get("use_dora"):
        raise InvalidAdapterError(f"{path}: use_dora is true; DoRA adapters are not supported (their magnitude vector does not slice)")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise InvalidAdapterError(f"{path}: {key} is set; per-module ranks or alphas are not supported, use one r and lora_alpha")
    if cfg.get("lora_bias"):
        raise InvalidAdapterError(f"{path}: lora_bias is true; LoRA adapters with a bias on lora_B are not supported")
    if cfg.get("bias", "none") != "none":
        raise InvalidAdapterError(f"{path}: bias is {cfg['bias']!r}; LoRA adapters that train biases are not supported (use bias 'none')")
    r = cfg.get("r")
    if not is_int(r) or r < 1:
        raise InvalidAdapterError(f"{path}: r must be a positive integer, found {json.dumps(r)[:40]}")
    if r > MAX_LORA_RANK:
        raise InvalidAdapterError(f"{path}: r = {str(r)[:20]}{'…' if len(str(r)) > 20 else ''} is above {MAX_LORA_RANK}, the largest LoRA rank supported")
    alpha = cfg.get("lora_alpha", 8)
    if not is_finite_real(alpha) or alpha <= 0:
        raise InvalidAdapterError(f"{path}: lora_alpha must be a positive number, found {json.dumps(alpha)[:40]}")


def peft_scaling(peft_config: Mapping[str, Any]) -> float:
    """PEFT's own scaling of an adapter config: ``lora_alpha / r`` or ``lora_alpha / sqrt(r)`` (rsLoRA)."""
    r = peft_config["r"]
    alpha = float(peft_config.get("lora_alpha", 8))
    return alpha / math.sqrt(r) if peft_config.get("use_rslora") else alpha / r


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
        # a variant bundle (DESIGN.md §2): its root holds the default rank only; the adapter is nested/
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
            raise InvalidAdapterError(f"{root}: no {WEIGHTS_NAME} here, but it holds adapter folders {shown}: pass one of them")
        raise InvalidAdapterError(f"{root}: no {WEIGHTS_NAME} found; is this a PEFT LoRA adapter folder?")
    peft_path = root / PEFT_CONFIG_NAME
    if not peft_path.exists() and not peft_path.is_symlink():
        raise InvalidAdapterError(f"{root}: no {PEFT_CONFIG_NAME} found; is this a PEFT LoRA adapter folder?")
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
            raise InvalidAdapterError(f"{weights}: unexpected tensor {key!r}{hint}; expected only {KEY_PREFIX}<module>.lora_A/lora_B.weight")
        parts.setdefault(m["module"], {})[m["part"]] = info
    if not parts:
        raise InvalidAdapterError(f"{weights}: holds no LoRA tensors")
    out = {}
    for name, p in parts.items():
        for need, other in (("lora_A", "lora_B"), ("lora_B", "lora_A")):
            if need not in p:
                raise InvalidAdapterError(f"{weights}: module {name!r} has {other} but no {need}; the file is incomplete")
        for info in (p["lora_A"], p["lora_B"]):
            if info.dtype not in FLOAT_DTYPES:
                raise InvalidAdapterError(f"{weights}: tensor {info.name!r} has dtype {info.dtype}; expected a float type")
            if len(info.shape) != 2:
                raise InvalidAdapterError(f"{weights}: tensor {info.name!r} has shape {list(info.shape)}; expected 2 dimensions (linear or Conv1D targets)")
            if 0 in info.shape:
                raise InvalidAdapterError(f"{weights}: tensor {info.name!r} has shape {list(info.shape)}, a zero-size dimension; the file is corrupt")
        out[name] = (p["lora_A"], p["lora_B"])
    return out


class NestedAdapter:
    """A validated nested adapter folder (or plain PEFT LoRA folder) opened for reading.

    Use :meth:`load`; read factors with :meth:`reader`. Nothing but headers and configs is held
    in memory: tensors are read on demand, prefixes only (``safe_open(...).get_slice``).
    """

    def __init__(
        self,
        path: Path,
        config: MatryoshkaConfig,
        peft_config: dict[str, Any],
        modules: dict[str, LoraModule],
        dtype: str,
        *,
        is_nested: bool,
        header: SafetensorsHeader,
        slice_info: dict[str, Any] | None = None,
    ) -> None:
        self.path = path
        self.config = config
        self.peft_config = peft_config
        self.modules = modules
        self.dtype = dtype
        self.is_nested = is_nested
        self.header = header
        self.slice_info = slice_info

    # -- loading --------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike[str], *, check_finite: bool = True) -> "NestedAdapter":
        """Open and validate an adapter folder.

        Raises:
            InvalidAdapterError: missing or corrupt files, pickle-only weights, non-LoRA or DoRA
                configs, shape or rank disagreement, a lone ``lora_A`` or ``lora_B``,
                non-finite weights, or an invalid ``matryoshka_config.json``.
        """
        root, weights, peft_path = adapter_files(path)
        peft_config = _read_json(peft_path)
        _check_peft_config(peft_config, peft_path)

        cfg_path = root / CONFIG_NAME
        slice_info: dict[str, Any] | None = None
        raw_cfg = _read_json(cfg_path) if cfg_path.exists() or cfg_path.is_symlink() else None
        if isinstance(raw_cfg, dict) and raw_cfg.get("format") == SLICE_FORMAT:
            slice_info, raw_cfg = raw_cfg, None
            rank = slice_info.get("rank")
            if rank is not None and (not is_int(rank) or rank != peft_config["r"]):
                raise InvalidAdapterError(f"{cfg_path}: the slice says rank {json.dumps(rank)[:40]} but {PEFT_CONFIG_NAME} has r = {peft_config['r']}")
        # Cheapest checks first: r against max_rank and the weights' shapes (header only) before
        # anything of size max_rank (the diagonal p) is computed.
        r = peft_config["r"]
        if isinstance(raw_cfg, dict):
            max_rank = raw_cfg.get("max_rank")
            if is_int(max_rank) and max_rank != r:
                raise InvalidAdapterError(f"{peft_path}: r = {r} but {CONFIG_NAME} says max_rank = {max_rank}; they must agree")
            stored_p = raw_cfg.get("p")
            if isinstance(stored_p, list) and len(stored_p) != r:
                raise InvalidAdapterError(f"{cfg_path}: stored p has {len(stored_p)} values but max_rank is {r}; remove 'p' or fix the other fields")
        header, modules, dtype = cls._scan_weights(weights, r, check_finite=False)
        if raw_cfg is not None:
            config = MatryoshkaConfig.from_dict(raw_cfg, str(cfg_path))
            is_nested = True
            if peft_config["r"] != config.max_rank:
                raise InvalidAdapterError(
                    f"{peft_path}: r = {peft_config['r']} but {CONFIG_NAME} says max_rank = {config.max_rank}; they must agree"
                )
            expected = config.scale(config.max_rank)
            found = peft_scaling(peft_config)
            if not math.isclose(found, expected, rel_tol=1e-6):
                alpha, rslora = peft_alpha_for(config.max_rank, config.scaling, config.alpha)
                raise InvalidAdapterError(
                    f"{peft_path}: PEFT's scaling is {found:g} but s(r) = {expected:g} for scaling {config.scaling!r}; "
                    f"set lora_alpha = {alpha:g} and use_rslora = {str(rslora).lower()}"
                )
        else:
            r = peft_config["r"]
            alpha = float(peft_config.get("lora_alpha", 8))
            scaling = "sqrt" if peft_config.get("use_rslora") else "rank"
            config = MatryoshkaConfig("lora", r, (r,), scaling, alpha, extra={"base_model": peft_config.get("base_model_name_or_path")})
            is_nested = False

        if check_finite:
            _check_finite(weights, header)
        return cls(root, config, peft_config, modules, dtype, is_nested=is_nested, header=header, slice_info=slice_info)

    @staticmethod
    def _scan_weights(weights: Path, r: int, check_finite: bool) -> tuple[SafetensorsHeader, dict[str, LoraModule], str]:
        header = read_header(weights)
        modules: dict[str, LoraModule] = {}
        dtypes = set()
        for name, (a, b) in lora_tensor_pairs(weights, header).items():
            if a.shape[0] != r:
                raise InvalidAdapterError(f"{weights}: {a.name!r} has shape {list(a.shape)} but the adapter rank is {r}; expected [{r}, in_features]")
            if b.shape[1] != r:
                raise InvalidAdapterError(f"{weights}: {b.name!r} has shape {list(b.shape)} but the adapter rank is {r}; expected [out_features, {r}]")
            dtypes.update((a.dtype, b.dtype))
            modules[name] = LoraModule(name, in_features=a.shape[1], out_features=b.shape[0])
        if len(dtypes) != 1:
            raise InvalidAdapterError(f"{weights}: LoRA tensors mix dtypes {sorted(dtypes)}; save them in one dtype")
        if check_finite:
            _check_finite(weights, header)
        return header, modules, dtypes.pop()

    # -- properties -----------------------------------------------------------------------
    @property
    def max_rank(self) -> int:
        return self.config.max_rank

    @property
    def fan_in_fan_out(self) -> bool:
        """True when the targets are ``Conv1D`` layers whose weight is ``[in, out]`` (GPT-2 style)."""
        return bool(self.peft_config.get("fan_in_fan_out", False))

    @property
    def weights_path(self) -> Path:
        return self.path / WEIGHTS_NAME

    @property
    def base_model(self) -> str | None:
        return self.config.base_model or self.peft_config.get("base_model_name_or_path")

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]

    def torch_dtype(self) -> "torch.dtype":
        from .safetensors_io import torch_dtype

        return torch_dtype(self.dtype)

    def scale(self, k: int) -> float:
        """``s(k)``."""
        return self.config.scale(k)

    def check_rank(self, k: int) -> int:
        """Return ``k`` if ``1 <= k <= r``; warn when it is not a train rank.

        Raises:
            RankError: ``k`` is outside ``[1, r]``.
        """
        if not is_int(k) or not 1 <= k <= self.max_rank:
            raise RankError(f"rank {k!r} is outside [1, {self.max_rank}] for adapter {str(self.path)!r} (max rank {self.max_rank})")
        if k not in self.config.train_ranks:
            logger.warning("rank %d was not trained; the trained ranks are %s", k, list(self.config.train_ranks))
        return k

    def params_at(self, k: int) -> int:
        """Parameter count of the rank-``k`` adapter."""
        return sum(m.params_at(k) for m in self.modules.values())

    def bytes_at(self, k: int) -> int:
        """Bytes of the rank-``k`` tensors on disk (headers excluded)."""
        return self.params_at(k) * self.itemsize

    def target_modules(self) -> list[str]:
        """Names of the adapted modules, in file order."""
        return list(self.modules)

    # -- reading --------------------------------------------------------------------------
    @contextlib.contextmanager
    def reader(self, *, populate: bool = False) -> Iterator["AdapterReader"]:
        """Open the weights file memory-mapped for prefix reads; see :class:`AdapterReader`.

        ``populate`` maps every page at once: faster when most of the file will be read.
        """
        with open(self.weights_path, "rb") as f:
            mm = _map_file(f.fileno(), populate=populate)
            try:
                yield AdapterReader(self, mm)
            finally:
                try:
                    mm.close()
                except BufferError:  # a view is still referenced (by an exception's traceback, say):
                    pass  # the map is released with it

    def summary(self) -> dict[str, Any]:
        """A JSON-able description: method, ranks, scaling, ``p``, targets, per-rank size (and, for a
        re-nested adapter, the share of ``Σ‖ΔW‖²`` each rank keeps)."""
        ranks = sorted(set(self.config.train_ranks) | {self.max_rank})
        energy = self.config.extra.get("energy")  # re-nested adapters: share of Σ‖ΔW‖² kept per rank
        if not (isinstance(energy, list) and len(energy) == self.max_rank):
            energy = None
        return {
            "path": str(self.path),
            "nested": self.is_nested,
            "method": self.config.method,
            "max_rank": self.max_rank,
            "train_ranks": list(self.config.train_ranks),
            "scaling": self.config.scaling,
            "alpha": self.config.alpha,
            "p": self.config.p,
            "dtype": self.dtype,
            "fan_in_fan_out": self.fan_in_fan_out,
            "base_model": self.base_model,
            "target_modules": self.target_modules(),
            "ranks": [
                {"rank": k, "scale": self.scale(k), "params": self.params_at(k), "bytes": self.bytes_at(k),
                 **({"energy": energy[k - 1]} if energy else {})} for k in ranks
            ],
            **({"slice": self._slice_summary()} if self.slice_info else {}),
        }

    def _slice_summary(self) -> dict[str, Any]:
        """What a slice's own ``matryoshka_config.json`` says: its rank, scale mode and the nested adapter it was cut from."""
        info = self.slice_info or {}
        src = info.get("source") if isinstance(info.get("source"), dict) else {}
        keep = ("path", "method", "max_rank", "train_ranks", "scaling", "alpha")
        return {"rank": info.get("rank"), "scale_mode": info.get("scale_mode"), "scale": info.get("scale"),
                "source": {k: src[k] for k in keep if k in src}}


class AdapterReader:
    """Reads rank-``k`` prefixes of LoRA factors from the memory-mapped weights file.

    Tensors are zero-copy views of the file's pages until sliced: ``A[:k]`` reads only its
    first ``k`` rows, ``B[:, :k]`` gathers ``k`` columns into a new contiguous tensor.
    """

    def __init__(self, adapter: NestedAdapter, mm: "mmap.mmap") -> None:
        self.adapter = adapter
        self._mm = mm

    def _view(self, key: str) -> "torch.Tensor":
        import torch

        from .safetensors_io import torch_dtype

        info = self.adapter.header.tensors[key]
        dtype = torch_dtype(info.dtype)
        numel = info.nbytes // DTYPE_SIZES[info.dtype]
        with warnings.catch_warnings():  # the map is read-only; we never write through it
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(self._mm, dtype=dtype, count=numel, offset=self.adapter.header.data_start + info.begin)
        return flat.view(info.shape)

    def check_finite(self, modules: Iterable[str] | None = None) -> None:
        """Raise :class:`InvalidAdapterError` if a tensor (of ``modules``, if given) holds a NaN
        or an infinity: the check :meth:`NestedAdapter.load` makes, over this reader's map, so
        that callers can share it out among threads."""
        keys = None
        if modules is not None:
            keys = [key for name in modules for key in (self.adapter.modules[name].key_a, self.adapter.modules[name].key_b)]
        _check_finite(self.adapter.weights_path, self.adapter.header, self._mm, keys)

    def lora_A_data(self, module: str, k: int) -> np.ndarray:
        """``A[:k, :]`` as a zero-copy, contiguous view of the map (its rows are consecutive in
        the file; bfloat16 as uint16 bit patterns). Delete it before the reader closes."""
        return self._array(self.adapter.modules[module].key_a)[:k]

    def lora_A(self, module: str, k: int) -> "torch.Tensor":
        """``A[:k, :]`` of ``module`` (``[k, in]``, source dtype), a copy of those rows only."""
        return self._view(self.adapter.modules[module].key_a)[:k].clone()

    def lora_B(self, module: str, k: int) -> "torch.Tensor":
        """``B[:, :k]`` of ``module`` (``[out, k]``, source dtype, contiguous copy)."""
        return self._view(self.adapter.modules[module].key_b)[:, :k].contiguous()

    def _array(self, key: str) -> np.ndarray:
        """A zero-copy numpy view of tensor ``key`` in the map (bfloat16 as uint16 bit patterns)."""
        info = self.adapter.header.tensors[key]
        count = info.nbytes // DTYPE_SIZES[info.dtype]
        flat = np.frombuffer(self._mm, dtype=_NUMPY_TYPES[info.dtype], count=count, offset=self.adapter.header.data_start + info.begin)
        return flat.reshape(info.shape)

    def lora_B_data(self, module: str, k: int, factor: float | None = None, scratch: "np.ndarray | None" = None) -> np.ndarray:
        """``B[:, :k]`` (or ``factor · B[:, :k]``) as the raw bytes of a slice file, without torch.

        Scaling is computed in float32 (float64 for a float64 adapter) and rounded once to the
        source dtype, round-to-nearest-even as torch does; the result is contiguous. The unscaled
        full-rank ``B`` is returned as a zero-copy view of the map.

        ``scratch`` (a uint8 array of at least :func:`scratch_bytes` bytes) is where the result is
        computed: a caller writing many tensors from one thread passes the same one each time, so
        no memory is allocated (and page-faulted) per tensor. The result is then a view of it,
        valid until the next call with that scratch.
        """
        key = self.adapter.modules[module].key_b
        info = self.adapter.header.tensors[key]
        if factor is None and k == info.shape[1]:
            return self._array(key)
        shape = (info.shape[0], k)
        n = shape[0] * k

        def buf(dtype: type[np.generic], at: int = 0) -> np.ndarray:
            if scratch is None:
                return np.empty(shape, dtype)
            size = n * np.dtype(dtype).itemsize
            return scratch[at * n: at * n + size].view(dtype).reshape(shape)

        b = self._array(key)[:, :k]
        try:
            if factor is None:
                out = buf(b.dtype.type)
                np.copyto(out, b)
            elif info.dtype == "BF16":  # bits → float32, scale, round to nearest even, back to bits
                u = buf(np.uint32)
                np.left_shift(b, 16, out=u, dtype=np.uint32)
                np.multiply(u.view(np.float32), np.float32(factor), out=u.view(np.float32))
                carry = buf(np.uint32, 4)
                np.right_shift(u, 16, out=carry)
                np.bitwise_and(carry, 1, out=carry)
                np.add(carry, np.uint32(0x7FFF), out=carry)
                np.add(u, carry, out=u)
                np.right_shift(u, 16, out=u)
                out = buf(np.uint16, 8)
                np.copyto(out, u, casting="unsafe")
            elif info.dtype == "F16":
                work = buf(np.float32)
                np.multiply(b, np.float32(factor), out=work, dtype=np.float32)
                out = buf(np.float16, 4)
                np.copyto(out, work, casting="same_kind")
            else:  # F32, F64: in their own precision
                out = buf(b.dtype.type)
                np.multiply(b, b.dtype.type(factor), out=out)
            return out
        finally:
            del b  # release the view of the map

    def delta(self, module: str, k: int, dtype: "torch.dtype | None" = None) -> "torch.Tensor":
        """``ΔW_k = s(k) · B[:, :k] · A[:k, :]``, ``[out, in]``, computed in float32 (DESIGN.md §1).

        Returns float32 unless ``dtype`` is given (then rounded once to it).
        """
        import torch

        a = self.lora_A(module, k).to(torch.float32)
        b = self.lora_B(module, k).to(torch.float32)
        d = (b * self.adapter.scale(k)) @ a
        return d if dtype is None else d.to(dtype)

    def delta_weight(self, module: str, k: int, dtype: "torch.dtype | None" = None) -> "torch.Tensor":
        """:meth:`delta` oriented like the base weight (transposed for ``Conv1D`` targets)."""
        return orient_delta(self.delta(module, k, dtype), self.adapter.fan_in_fan_out)


def build_peft_config(
    *,
    r: int,
    lora_alpha: float,
    use_rslora: bool,
    target_modules: list[str] | str,
    fan_in_fan_out: bool = False,
    base_model: str | None = None,
    task_type: str | None = "CAUSAL_LM",
    lora_dropout: float = 0.0,
    modules_to_save: list[str] | None = None,
) -> dict[str, Any]:
    """A minimal ``adapter_config.json`` that every PEFT release since 0.6 reads.

    Only the keys PEFT needs: unknown keys break older PEFT releases (DESIGN.md §2).
    """
    cfg: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model,
        "r": int(r),
        "lora_alpha": int(lora_alpha) if float(lora_alpha).is_integer() else float(lora_alpha),
        "lora_dropout": lora_dropout,
        "target_modules": sorted(target_modules) if isinstance(target_modules, list) else target_modules,
        "fan_in_fan_out": bool(fan_in_fan_out),
        "bias": "none",
        "inference_mode": True,
        "modules_to_save": modules_to_save,
        "init_lora_weights": True,
    }
    if use_rslora:
        cfg["use_rslora"] = True
    return cfg


def save_nested(
    path: str | os.PathLike[str],
    factors: Mapping[str, tuple["torch.Tensor", "torch.Tensor"]],
    config: MatryoshkaConfig,
    *,
    fan_in_fan_out: bool = False,
    task_type: str | None = "CAUSAL_LM",
    peft_extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a nested adapter into the existing folder ``path`` (callers make it atomic).

    ``factors`` maps module name → ``(A [r, in], B [out, r])``. The result loads with
    :meth:`NestedAdapter.load` and with ``PeftModel.from_pretrained`` at rank ``r``.

    Raises:
        InvalidAdapterError: a factor has the wrong shape for ``config.max_rank``.
    """
    r = config.max_rank
    tensors: dict[str, Any] = {}
    for name, (a, b) in factors.items():
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
            raise InvalidAdapterError(f"module {name!r}: factors {list(a.shape)} / {list(b.shape)} do not have rank {r}")
        tensors[f"{KEY_PREFIX}{name}.lora_A.weight"] = a.detach().cpu().contiguous()
        tensors[f"{KEY_PREFIX}{name}.lora_B.weight"] = b.detach().cpu().contiguous()
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    save_tensors(root / WEIGHTS_NAME, tensors, metadata={"format": "pt"})
    lora_alpha, rslora = peft_alpha_for(r, config.scaling, config.alpha)
    peft_cfg = build_peft_config(
        r=r,
        lora_alpha=lora_alpha,
        use_rslora=rslora,
        target_modules=sorted({n.rsplit(".", 1)[-1] for n in factors}),
        fan_in_fan_out=fan_in_fan_out,
        base_model=config.base_model,
        task_type=task_type,
    )
    if peft_extra:
        peft_cfg.update(peft_extra)
    _write_json(root / PEFT_CONFIG_NAME, peft_cfg)
    _write_json(root / CONFIG_NAME, config.to_dict())
    return root


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


write_json = _write_json
read_json = _read_json
