"""The PEFT side of an adapter folder: checking ``adapter_config.json``, PEFT's scaling, and writing one.

Only the keys PEFT needs are written (unknown keys break older PEFT releases, docs/design.md §2);
every key this package reads is type-checked, nothing is coerced.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import InvalidAdapterError
from ..validate import is_finite_real, is_int
from .files import is_str_list

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
    "target_modules": ("a string, a list of strings or null", lambda v: v is None or isinstance(v, str) or is_str_list(v)),
    "modules_to_save": ("a list of strings or null", lambda v: v is None or is_str_list(v)),
    "exclude_modules": ("a string, a list of strings or null", lambda v: v is None or isinstance(v, str) or is_str_list(v)),
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


def check_peft_config(cfg: Any, path: Path) -> None:
    """Check ``adapter_config.json``'s kind and the types of every key this package reads or
    copies; nothing is coerced (``"false"`` is not false).

    Raises:
        InvalidAdapterError: naming the key, the expected type and the value found.
    """
    if not isinstance(cfg, dict):
        raise InvalidAdapterError(f"{path}: expected a JSON object, found {type(cfg).__name__}", path=path)
    peft_type = cfg.get("peft_type")
    if peft_type != "LORA":
        raise InvalidAdapterError(f"{path}: peft_type is {str(peft_type)[:40]!r}; only LoRA adapters (peft_type 'LORA') are supported", path=path)
    for key, (expected, ok) in _PEFT_TYPES.items():
        if key in cfg and not ok(cfg[key]):
            raise InvalidAdapterError(f"{path}: {key} must be {expected}, found {json.dumps(cfg[key])[:60]}; fix the file", path=path)
    if cfg.get("use_dora"):
        raise InvalidAdapterError(f"{path}: use_dora is true; DoRA adapters are not supported (their magnitude vector does not slice)", path=path)
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise InvalidAdapterError(f"{path}: {key} is set; per-module ranks or alphas are not supported, use one r and lora_alpha", path=path)
    if cfg.get("lora_bias"):
        raise InvalidAdapterError(f"{path}: lora_bias is true; LoRA adapters with a bias on lora_B are not supported", path=path)
    if cfg.get("bias", "none") != "none":
        raise InvalidAdapterError(f"{path}: bias is {cfg['bias']!r}; LoRA adapters that train biases are not supported (use bias 'none')", path=path)
    r = cfg.get("r")
    if not is_int(r) or r < 1:
        raise InvalidAdapterError(f"{path}: r must be a positive integer, found {json.dumps(r)[:40]}", path=path)
    if r > MAX_LORA_RANK:
        raise InvalidAdapterError(f"{path}: r = {str(r)[:20]}{'…' if len(str(r)) > 20 else ''} is above {MAX_LORA_RANK}, the largest LoRA rank supported", path=path)
    alpha = cfg.get("lora_alpha", 8)
    if not is_finite_real(alpha) or alpha <= 0:
        raise InvalidAdapterError(f"{path}: lora_alpha must be a positive number, found {json.dumps(alpha)[:40]}", path=path)


def peft_scaling(peft_config: Mapping[str, Any]) -> float:
    """PEFT's own scaling of an adapter config: ``lora_alpha / r`` or ``lora_alpha / sqrt(r)`` (rsLoRA)."""
    r = peft_config["r"]
    alpha = float(peft_config.get("lora_alpha", 8))
    return alpha / math.sqrt(r) if peft_config.get("use_rslora") else alpha / r


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

    Only the keys PEFT needs: unknown keys break older PEFT releases (docs/design.md §2).
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

