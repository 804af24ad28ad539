"""The PEFT side of an adapter folder: the one typed reader of ``adapter_config.json``
(:func:`read_peft_config`), PEFT's scaling and target matching, and writing one.

Only the keys PEFT needs are written (unknown keys break older PEFT releases, docs/design.md §2);
every key this package reads is type-checked, nothing is coerced (``"false"`` is not false).
Every command that reads an adapter (inspect, slice, merge, renest, gguf, onnx, bundle, pull)
reads its ``adapter_config.json`` through :func:`read_peft_config`, so one file is accepted or
refused the same way by all of them.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..errors import InvalidAdapterError
from ..method import MAX_SCALE
from ..validate import is_finite_real, is_int
from .files import is_str_list, read_json


def _str_or_str_list(v: Any) -> bool:
    return v is None or isinstance(v, str) or is_str_list(v)


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
    "use_qalora": ("true or false", lambda v: isinstance(v, bool)),
    "use_bdlora": ("true or false", lambda v: v is None or isinstance(v, (bool, dict))),
    "target_modules": ("a string, a list of strings or null", _str_or_str_list),
    "modules_to_save": ("a list of strings or null", lambda v: v is None or is_str_list(v)),
    "exclude_modules": ("a string, a list of strings or null", _str_or_str_list),
    "layers_to_transform": ("an integer, a list of integers or null",
                            lambda v: v is None or is_int(v) or (isinstance(v, list) and all(is_int(x) for x in v))),
    "layers_pattern": ("a string, a list of strings or null", _str_or_str_list),
    "rank_pattern": ("an object", lambda v: v is None or isinstance(v, dict)),
    "alpha_pattern": ("an object", lambda v: v is None or isinstance(v, dict)),
    "lora_dropout": ("a number in [0, 1)", lambda v: is_finite_real(v) and 0 <= v < 1),
    "bias": ("'none', 'all' or 'lora_only'", lambda v: v in ("none", "all", "lora_only")),
    "init_lora_weights": ("true, false or a method name", lambda v: isinstance(v, (bool, str))),
}

#: Settings whose delta is not ``s·B·A`` on the targeted weights alone (or that carry weights
#: besides ``lora_A``/``lora_B``): refused by every command when set, with the reason.
REFUSED_SETTINGS: dict[str, str] = {
    "use_dora": "DoRA adapters are not supported (their magnitude vector rescales the whole weight, not a low-rank delta)",
    "lora_bias": "LoRA adapters with a bias on lora_B are not supported",
    "trainable_token_indices": "adapters with trainable tokens are not supported",
    "target_parameters": "LoRA on nn.Parameter targets is not supported",
    "layer_replication": "adapters with layer_replication are not supported",
    "alora_invocation_tokens": "activated LoRA (aLoRA, applied to some tokens only) is not supported",
    "use_qalora": "QALoRA adapters are not supported",
    "use_bdlora": "block-diagonal LoRA is not supported",
    "arrow_config": "Arrow routing over several LoRA experts is not supported",
    "kasa_config": "KaSA adapters are not supported",
    "velora_config": "VeLoRA adapters are not supported",
    "monteclora_config": "MonteCLoRA adapters are not supported",
}
#: Refused where the output is a new adapter that cannot carry them (re-nesting).
MODULES_TO_SAVE_REASON = "adapters with modules_to_save (fully trained modules stored beside the LoRA factors) are not supported"

#: The largest ``r`` an adapter may declare (far above any LoRA rank in use): a larger one is a
#: corrupt or hostile file, refused before anything of that size is computed.
MAX_LORA_RANK = 1 << 16

#: ``target_modules`` that PEFT expands to every linear layer of the model (see :func:`untargeted_modules`).
ALL_LINEAR = "all-linear"


def _shown(value: Any, limit: int = 60) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def read_peft_config(path: Path, *, patterns: bool = False, refuse: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Read and check ``adapter_config.json`` (strict JSON, then :func:`check_peft_config`).

    Raises:
        InvalidAdapterError: naming ``path``, the key, what was expected and what was found.
    """
    cfg = read_json(path)
    check_peft_config(cfg, path, patterns=patterns, refuse=refuse)
    return cfg  # type: ignore[no-any-return]


def check_peft_config(cfg: Any, path: Path, *, patterns: bool = False, refuse: Mapping[str, str] | None = None) -> None:
    """Check ``adapter_config.json``'s kind and the types of every key this package reads or
    copies; nothing is coerced (``"false"`` is not false). ``r`` must be a positive integer up
    to :data:`MAX_LORA_RANK`; PEFT's scale ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA) at
    most :data:`~mlora_export.method.MAX_SCALE`. ``patterns`` accepts ``rank_pattern`` and
    ``alpha_pattern`` (checked: positive integer ranks, positive alphas, valid regular
    expressions); without it they are refused. ``refuse`` adds settings to refuse when set.

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
            raise InvalidAdapterError(f"{path}: {key} must be {expected}, found {_shown(cfg[key])}; fix the file", path=path)
    for key, reason in {**REFUSED_SETTINGS, **(refuse or {})}.items():
        if cfg.get(key):
            raise InvalidAdapterError(f"{path}: {key} is set ({_shown(cfg[key], 40)}); {reason}", path=path)
    if not patterns:
        for key in ("rank_pattern", "alpha_pattern"):
            if cfg.get(key):
                raise InvalidAdapterError(f"{path}: {key} is set; per-module ranks or alphas are not supported, use one r and lora_alpha", path=path)
    if cfg.get("bias", "none") != "none":
        raise InvalidAdapterError(f"{path}: bias is {cfg['bias']!r}; LoRA adapters that train biases are not supported (use bias 'none')", path=path)
    r: int = cfg.get("r")  # type: ignore[assignment]  # checked just below
    _check_rank(r, "r", path)
    alpha = cfg.get("lora_alpha", 8)
    if not is_finite_real(alpha) or alpha <= 0:
        raise InvalidAdapterError(f"{path}: lora_alpha must be a positive number, found {_shown(alpha, 40)}", path=path)
    _check_scale(alpha, r, bool(cfg.get("use_rslora")), "lora_alpha", path)
    if patterns:
        _check_patterns(cfg, path)
    for key in ("target_modules", "exclude_modules"):
        if isinstance(cfg.get(key), str) and cfg[key] != ALL_LINEAR:
            _check_regex(cfg[key], key, path)
    layers = cfg.get("layers_pattern")
    for pattern in [layers] if isinstance(layers, str) else layers or []:
        _check_regex(pattern, "layers_pattern", path)


def _check_rank(r: Any, key: str, path: Path) -> None:
    if not is_int(r) or r < 1:
        raise InvalidAdapterError(f"{path}: {key} must be a positive integer, found {_shown(r, 40)}", path=path)
    if r > MAX_LORA_RANK:
        raise InvalidAdapterError(f"{path}: {key} = {str(r)[:20]}{'…' if len(str(r)) > 20 else ''} is above {MAX_LORA_RANK}, the largest LoRA rank supported", path=path)


def _check_scale(alpha: float, r: int, rslora: bool, key: str, path: Path) -> None:
    """PEFT's scale ``alpha / r`` (or ``/ sqrt(r)``) must be at most :data:`MAX_SCALE`."""
    s = float(alpha) / (math.sqrt(r) if rslora else r)
    if s > MAX_SCALE:
        raise InvalidAdapterError(
            f"{path}: {key} = {float(alpha):g} makes PEFT's scale {s:g}, above {MAX_SCALE:g}, the largest scale supported; "
            "no LoRA scales its delta by that much: fix the file", path=path)


def _check_regex(pattern: str, key: str, path: Path) -> None:
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        raise InvalidAdapterError(f"{path}: {key} {_shown(pattern, 40)} is not a valid regular expression ({e})", path=path) from e


def _check_patterns(cfg: Mapping[str, Any], path: Path) -> None:
    """``rank_pattern`` values are ranks, ``alpha_pattern`` values positive numbers, keys valid regular expressions."""
    for key, valid, expected in (("rank_pattern", lambda v: is_int(v) and 1 <= v <= MAX_LORA_RANK, f"integers in [1, {MAX_LORA_RANK}]"),
                                 ("alpha_pattern", lambda v: is_finite_real(v) and v > 0, "positive numbers")):
        pattern = cfg.get(key) or {}
        for name, value in pattern.items():
            if not valid(value):
                raise InvalidAdapterError(f"{path}: {key}[{name[:60]!r}] is {_shown(value, 40)}; expected {expected}", path=path)
            try:
                re.compile(rf"(.*\.)?({name})$")
            except (re.error, RecursionError, OverflowError) as e:
                raise InvalidAdapterError(f"{path}: {key} key {name[:60]!r} is not a valid regular expression ({e})", path=path) from e


def pattern_key(pattern_keys: Iterable[str], key: str) -> str:
    """The ``rank_pattern``/``alpha_pattern`` key that applies to module ``key``, as PEFT picks it
    (``peft.utils.other.get_pattern_key``): the first pattern ``p`` for which ``key`` matches
    ``(.*\\.)?(p)$``, else ``key`` itself (patterns are checked by :func:`check_peft_config`)."""
    for p in pattern_keys:
        if re.match(rf"(.*\.)?({p})$", key):
            return p
    return key


def module_scale(cfg: Mapping[str, Any], name: str, path: Path) -> tuple[int, float]:
    """``(r_m, s_m)`` of module ``name``: its rank and PEFT's scale, patterns matched as PEFT does.

    Raises:
        InvalidAdapterError: the module's scale is above :data:`~mlora_export.method.MAX_SCALE`.
    """
    ranks, alphas = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    r = int(ranks.get(pattern_key(ranks, name), cfg["r"]))
    alpha = float(alphas.get(pattern_key(alphas, name), cfg.get("lora_alpha", 8)))
    rslora = bool(cfg.get("use_rslora"))
    _check_scale(alpha, r, rslora, f"the alpha of module {name!r}", path)
    return r, (alpha / math.sqrt(r) if rslora else alpha / r)


def _named(key: str, names: Any) -> bool:
    """PEFT's list rule: ``key`` is one of ``names`` or ends with ``.<name>``."""
    return key in names or any(key.endswith(f".{n}") for n in names)


def peft_targets(cfg: Mapping[str, Any], key: str) -> bool:
    """Whether PEFT would put a LoRA layer on the module ``key`` under ``cfg``, by PEFT's own
    rule (``peft.tuners.tuners_utils.check_target_module_exists``): ``exclude_modules`` first,
    then ``target_modules`` (a string is a regular expression that must match the whole name, a
    list names modules by their full name or last parts), narrowed by ``layers_to_transform``
    and ``layers_pattern``. ``"all-linear"`` and a missing ``target_modules`` are taken to
    cover every stored module (which modules they pick depends on the model)."""
    exclude = cfg.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str) and re.fullmatch(exclude, key):
            return False
        if not isinstance(exclude, str) and _named(key, exclude):
            return False
    target = cfg.get("target_modules")
    if target is None or target == ALL_LINEAR:
        return True
    if isinstance(target, str):
        return re.fullmatch(target, key) is not None
    if key in target:
        return True
    if not _named(key, target):
        return False
    indexes = cfg.get("layers_to_transform")
    if indexes is None or indexes == []:
        return True
    layers = cfg.get("layers_pattern")
    match = None
    if not layers:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for pattern in [layers] if isinstance(layers, str) else layers:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == indexes if is_int(indexes) else index in indexes


def check_targets(cfg: Mapping[str, Any], modules: Iterable[str], path: Path) -> None:
    """Refuse stored LoRA modules that PEFT would not apply (:func:`peft_targets`): a converter
    applying them would compute another model than ``PeftModel.from_pretrained``.

    Raises:
        InvalidAdapterError: naming the first such module, how many there are and ``target_modules``.
    """
    names = list(modules)
    try:
        missed = [m for m in names if not peft_targets(cfg, m)]
    except re.error as e:  # layers_pattern is spliced into PEFT's own expression: it may not compile there
        raise InvalidAdapterError(f"{path}: layers_pattern {_shown(cfg.get('layers_pattern'), 40)} does not make a valid regular expression ({e})", path=path) from e
    if missed:
        more = f" and {len(missed) - 1} more of the {len(names)}" if len(missed) > 1 else ""
        raise InvalidAdapterError(
            f"{path}: the weights hold module {missed[0]!r}{more}, which target_modules {_shown(cfg.get('target_modules'))}"
            f"{' (with exclude_modules / layers_to_transform)' if cfg.get('exclude_modules') or cfg.get('layers_to_transform') not in (None, []) else ''}"
            " does not select, so PEFT would not apply it; fix target_modules or remove those tensors", path=path)


def peft_scaling(peft_config: Mapping[str, Any]) -> float:
    """PEFT's own scaling of an adapter config: ``lora_alpha / r`` or ``lora_alpha / sqrt(r)`` (rsLoRA)."""
    r = peft_config["r"]
    alpha = float(peft_config.get("lora_alpha", 8))
    return alpha / math.sqrt(r) if peft_config.get("use_rslora") else alpha / r


def _legacy_dropout(legacy: dict[str, Any]) -> float:
    """The ``lora_dropout`` an older call of :func:`build_peft_config` passed (0 without one).

    Raises:
        TypeError: another keyword.
    """
    unknown = [k for k in legacy if k != "lora_dropout"]
    if unknown:
        raise TypeError(f"build_peft_config() got an unexpected keyword argument {unknown[0]!r}")
    if not legacy:
        return 0.0
    warnings.warn("build_peft_config(lora_dropout=...) is deprecated: the configs written are for inference; the keyword goes "
                  "in the next release", DeprecationWarning, stacklevel=3)
    return float(legacy["lora_dropout"])


def build_peft_config(
    *,
    r: int,
    lora_alpha: float,
    use_rslora: bool,
    target_modules: list[str] | str,
    fan_in_fan_out: bool = False,
    base_model: str | None = None,
    task_type: str | None = "CAUSAL_LM",
    modules_to_save: list[str] | None = None,
    **legacy: Any,
) -> dict[str, Any]:
    """A minimal ``adapter_config.json`` that every PEFT release since 0.6 reads.

    Only the keys PEFT needs: unknown keys break older PEFT releases (docs/design.md §2). The
    configs we write are for inference: ``lora_dropout`` is 0 (a ``lora_dropout=`` keyword still
    works for one release, with a ``DeprecationWarning``).
    """
    lora_dropout = _legacy_dropout(legacy)
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

