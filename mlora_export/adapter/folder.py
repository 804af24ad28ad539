"""The nested adapter folder: open and validate it (:class:`NestedAdapter`), and write one (:func:`save_nested`).

A nested adapter is a folder that is a valid PEFT LoRA adapter at the full rank ``r`` plus a
``matryoshka_config.json``. :class:`NestedAdapter` also opens plain PEFT LoRA folders (a slice
written by :mod:`mlora_export.converters.slice`, or any LoRA adapter): they load as a ``lora``
adapter whose only train rank is their rank, so every converter accepts them too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, InvalidAdapterError, RankError
from ..method import MAX_SCALE, Scaling, peft_alpha_for
from ..io.jsonio import dumps, write_json
from ..io.safetensors import DTYPE_SIZES, SafetensorsHeader, read_header, save_tensors
from ..validate import is_finite_real, is_int
from .config import MatryoshkaConfig
from .files import (
    CONFIG_NAME,
    KEY_PREFIX,
    NESTED_FORMAT,
    PEFT_CONFIG_NAME,
    SLICE_FORMAT,
    WEIGHTS_NAME,
    LoraModule,
    adapter_files,
    lora_tensor_pairs,
    map_file,
    read_json,
)
from .files import (
    check_finite as _check_finite,
)
from .peft_config import build_peft_config, check_targets, peft_scaling, read_peft_config

if TYPE_CHECKING:
    import torch

    from .reader import AdapterReader

logger = logging.getLogger(__name__)


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
        peft_config = read_peft_config(peft_path)

        cfg_path = root / CONFIG_NAME
        slice_info: dict[str, Any] | None = None
        raw_cfg = read_json(cfg_path) if cfg_path.exists() or cfg_path.is_symlink() else None
        if isinstance(raw_cfg, dict) and raw_cfg.get("format") == SLICE_FORMAT:
            slice_info, raw_cfg = raw_cfg, None
            rank = slice_info.get("rank")
            if rank is not None and (not is_int(rank) or rank != peft_config["r"]):
                raise InvalidAdapterError(f"{cfg_path}: the slice says rank {json.dumps(rank)[:40]} but {PEFT_CONFIG_NAME} has r = {peft_config['r']}", path=cfg_path)
        # Cheapest checks first: r against max_rank and the weights' shapes (header only) before
        # anything of size max_rank (the diagonal p) is computed.
        r = peft_config["r"]
        if isinstance(raw_cfg, dict):
            max_rank = raw_cfg.get("max_rank")
            if is_int(max_rank) and max_rank != r:
                raise InvalidAdapterError(f"{peft_path}: r = {r} but {CONFIG_NAME} says max_rank = {max_rank}; they must agree", path=peft_path)
            stored_p = raw_cfg.get("p")
            if isinstance(stored_p, list) and len(stored_p) != r:
                raise InvalidAdapterError(f"{cfg_path}: stored p has {len(stored_p)} values but max_rank is {r}; remove 'p' or fix the other fields", path=cfg_path)
        header, modules, dtype = cls._scan_weights(weights, r, check_finite=False)
        check_targets(peft_config, modules, peft_path)
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
            scaling: Scaling = "sqrt" if peft_config.get("use_rslora") else "rank"
            try:
                config = MatryoshkaConfig("lora", r, (r,), scaling, alpha, extra={"base_model": peft_config.get("base_model_name_or_path")})
            except ConfigError as e:  # lora_alpha is s(1) of a plain adapter (s(k) = lora_alpha / k): bounded as every scale is
                raise InvalidAdapterError(
                    f"{peft_path}: lora_alpha = {alpha:g} is the scale of this plain LoRA adapter's rank 1 (lora_alpha / k at rank k), "
                    f"above {MAX_SCALE:g}, the largest scale supported; fix the file", path=peft_path) from e
            is_nested = False

        if check_finite:
            _check_finite(weights, header)
        return cls(root, config, peft_config, modules, dtype, is_nested=is_nested, header=header, slice_info=slice_info)

    @staticmethod
    def _scan_weights(weights: Path, r: int, check_finite: bool) -> tuple[SafetensorsHeader, dict[str, LoraModule], str]:
        header = read_header(weights)
        modules: dict[str, LoraModule] = {}
        dtypes: set[str] = set()
        for name, (a, b) in lora_tensor_pairs(weights, header).items():
            if a.shape[0] != r:
                raise InvalidAdapterError(f"{weights}: {a.name!r} has shape {list(a.shape)} but the adapter rank is {r}; expected [{r}, in_features]", path=weights)
            if b.shape[1] != r:
                raise InvalidAdapterError(f"{weights}: {b.name!r} has shape {list(b.shape)} but the adapter rank is {r}; expected [out_features, {r}]", path=weights)
            dtypes.update((a.dtype, b.dtype))
            modules[name] = LoraModule(name, in_features=a.shape[1], out_features=b.shape[0])
        if len(dtypes) != 1:
            raise InvalidAdapterError(f"{weights}: LoRA tensors mix dtypes {sorted(dtypes)}; save them in one dtype", path=weights)
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

    def scale(self, k: int) -> float:
        """``s(k)``."""
        return self.config.scale(k)

    def check_rank(self, k: int) -> int:
        """Return ``k`` if ``1 <= k <= r``; warn when it is not a train rank.

        Raises:
            RankError: ``k`` is outside ``[1, r]``.
        """
        if not is_int(k) or not 1 <= k <= self.max_rank:
            raise RankError(f"rank {k!r} is outside [1, {self.max_rank}] for adapter {str(self.path)!r} (max rank {self.max_rank})", path=self.path, rank=k)
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
        from .reader import AdapterReader

        with open(self.weights_path, "rb") as f:
            mm = map_file(f.fileno(), populate=populate)
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
        if not (isinstance(energy, list) and len(energy) == self.max_rank and all(is_finite_real(e) for e in energy)):
            energy = None  # informational: a value of another type is not shown
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
        src: dict[str, Any] = info["source"] if isinstance(info.get("source"), dict) else {}
        keep = ("path", "method", "max_rank", "train_ranks", "scaling", "alpha")
        return {"rank": info.get("rank"), "scale_mode": info.get("scale_mode"), "scale": info.get("scale") if is_finite_real(info.get("scale")) else None,
                "source": {k: src[k] for k in keep if k in src}}


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
    write_json(root / PEFT_CONFIG_NAME, peft_cfg)
    write_json(root / CONFIG_NAME, config.to_dict())
    return root


def record_in_config(adapter_dir: str | os.PathLike[str], section: str, key: str, entry: Any) -> Path:
    """Set ``section[key] = entry`` in a nested adapter's ``matryoshka_config.json``, atomically
    (a temporary file in the folder, then a rename; the file's mode is kept).

    Other fields, and other keys of ``section``, are kept; an entry under the same key is replaced.

    Raises:
        InvalidAdapterError: the folder has no nested ``matryoshka_config.json`` (format ``mlora-nested/1``).
    """
    return record_many_in_config(adapter_dir, section, {key: entry})


def record_many_in_config(adapter_dir: str | os.PathLike[str], section: str, entries: dict[str, Any]) -> Path:
    """Set ``section[key] = entry`` for every item of ``entries`` in one atomic rewrite (see :func:`record_in_config`).

    Raises:
        InvalidAdapterError: the folder has no nested ``matryoshka_config.json`` (format ``mlora-nested/1``).
    """
    path = Path(adapter_dir) / CONFIG_NAME
    data = read_json(path)  # strict: a key twice, NaN, a pipe in its place... are refused
    if not isinstance(data, dict) or data.get("format") != NESTED_FORMAT:
        raise InvalidAdapterError(f"{path}: not a nested adapter config ({NESTED_FORMAT}); results are recorded for nested adapters only", path=path)
    current = data.get(section)
    data[section] = {**(current if isinstance(current, dict) else {}), **entries}
    fd, tmp = tempfile.mkstemp(prefix=f".{CONFIG_NAME}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, path.stat().st_mode & 0o777)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(dumps(data))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
