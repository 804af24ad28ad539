"""llama.cpp LoRA adapters (GGUF), one file per rank, written with llama.cpp's own ``gguf`` package.

The file at rank ``k`` is what llama.cpp's ``convert_lora_to_gguf.py`` writes for the rank-``k``
PEFT slice of the same adapter (docs/design.md §2), tensor for tensor, with its metadata
(``general.type = adapter``, ``adapter.type = lora``, ``adapter.lora.alpha``, ``general.name``,
``general.architecture``, ``general.quantization_version``), without writing the slice first:

- names: the PEFT module name is mapped by ``gguf.get_tensor_name_map(arch, n_layers)``
  (``model.layers.0.self_attn.q_proj`` → ``blk.0.attn_q.weight``) plus ``.lora_a`` / ``.lora_b``;
  a module llama.cpp cannot map is refused.
- tensors: ``lora_a = A[:k]`` (``[k, in]``) and ``lora_b = B[:, :k]`` (``[out, k]``); with the
  default ``baked`` scale mode ``B`` is multiplied by ``s(k)`` (rounded once to the adapter's dtype,
  as the baked slice is) and ``alpha = k``; ``native`` keeps the exact prefix and writes
  ``alpha = s(k)·k``. llama.cpp scales by ``alpha / k``, so both apply ``ΔW_k = s(k)·B[:, :k]·A[:k]``.
- Llama-family query and key rows are permuted as the converter permutes the base's weights
  (llama.cpp's rotary layout), so they need the base's head counts (``config.json``).
- GPT-2 ``Conv1D`` targets (``fan_in_fan_out``): PEFT's ``A`` and ``B`` are already in the
  ``[out, in]`` orientation that llama.cpp's GPT-2 weights have, so they are written as they are.
  (The converter transposes them like a ``Conv1D`` weight, which llama.cpp then rejects as
  "tensor has incorrect shape": see docs/deploy.md.)

The architecture comes from the base model's ``config.json`` (``architectures[0]``): the base
folder (or the ``config.json`` alone) given by the caller, or the adapter's recorded base when
that is a local folder. For a base that is not local, ``arch`` names it (``llama``, ``qwen2``, ``gpt2``…);
Llama-family bases still need the ``config.json`` for their head counts.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..adapter import AdapterReader, NestedAdapter
from ..adapter.ranks import SCALE_MODES, check_scale_mode, resolve_ranks
from ..adapter.rounding import finite_in
from ..errors import (
    BaseModelError,
    BaseModelMismatchError,
    ConfigError,
    NonFiniteOutputError,
    UnsupportedArchitectureError,
)
from ..fs import atomic_output_dir, check_free_space, check_output_path, check_written
from ..io.jsonio import read_json
from ..method import peft_alpha_for
from ..params import merge_legacy, param
from ..progress import Progress
from ..validate import is_int

logger = logging.getLogger(__name__)


#: Output tensor types, as ``convert_lora_to_gguf.py --outtype`` names them.
OUT_TYPES: tuple[str, ...] = ("f32", "f16", "bf16", "q8_0")
#: The out type that keeps an adapter of this safetensors dtype exactly.
_DEFAULT_OUT_TYPE = {"F32": "f32", "F64": "f32", "F16": "f16", "BF16": "bf16"}
#: ``general.name`` of each file: ``{adapter}`` is the adapter folder's name, ``{rank}`` the rank.
DEFAULT_NAME = "{adapter}-r{rank}"


@dataclass(frozen=True)
class ArchSpec:
    """How llama.cpp's converter treats one Hugging Face architecture."""

    gguf_arch: str  #: ``gguf.MODEL_ARCH`` member name, e.g. ``"LLAMA"``
    rope_permute: bool = False  #: q/k rows permuted to llama.cpp's rotary layout (LlamaModel.permute)
    prefix: str = ""  #: prepended to module names before mapping (headless ``*Model`` classes)


#: The Hugging Face architectures whose LoRA adapters this module writes: those of llama.cpp's
#: converter classes ``LlamaModel``, ``Qwen2Model``, ``Qwen3Model`` and ``GPT2Model`` (conversion/).
ARCHITECTURES: dict[str, ArchSpec] = {
    "LlamaForCausalLM": ArchSpec("LLAMA", rope_permute=True),
    "LLaMAForCausalLM": ArchSpec("LLAMA", rope_permute=True),
    "MistralForCausalLM": ArchSpec("LLAMA", rope_permute=True),
    "LlamaModel": ArchSpec("LLAMA", rope_permute=True, prefix="model."),
    "Qwen2ForCausalLM": ArchSpec("QWEN2"),
    "Qwen2Model": ArchSpec("QWEN2", prefix="model."),
    "Qwen3ForCausalLM": ArchSpec("QWEN3"),
    "GPT2LMHeadModel": ArchSpec("GPT2"),
}
#: ``arch=`` names (llama.cpp's architecture names and ``config.json`` model types) → the architecture.
ARCH_ALIASES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}


@dataclass(frozen=True)
class GGUFBase:
    """What the export needs to know of the base model."""

    architecture: str  #: Hugging Face architecture, a key of :data:`ARCHITECTURES`
    n_layers: int | None  #: the base's block count (``None``: not known; the adapter's layers are taken as they are)
    n_head: int | None = None
    n_head_kv: int | None = None
    source: str = ""  #: where it was read from, for messages
    hidden: int | None = None  #: ``hidden_size`` (``n_embd``)
    intermediate: int | None = None  #: ``intermediate_size`` (``n_inner``)
    head_dim: int | None = None  #: ``head_dim`` when the config gives one

    @property
    def spec(self) -> ArchSpec:
        return ARCHITECTURES[self.architecture]


@dataclass(frozen=True)
class GGUFResult:
    """One written ``.gguf`` file."""

    rank: int
    path: Path
    alpha: float
    scale: float
    tensors: int
    bytes: int
    out_type: str
    architecture: str

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "path": str(self.path), "alpha": self.alpha, "scale": self.scale, "tensors": self.tensors,
                "bytes": self.bytes, "out_type": self.out_type, "architecture": self.architecture}


def _supported() -> str:
    return ", ".join(sorted(ARCHITECTURES))


def _architecture_named(arch: str) -> str:
    name = ARCH_ALIASES.get(arch.lower(), arch)
    if name not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"architecture {arch!r} is not supported for GGUF export: expected one of {', '.join(sorted(ARCH_ALIASES))} "
            f"or a Hugging Face architecture ({_supported()})",
            architecture=arch,
        )
    return name


#: The deepest base accepted (the deepest public models have about 130 blocks): a larger block
#: count, or a layer index in an adapter's module names at or above it, is a corrupt or hostile file.
MAX_LAYERS = 10_000
#: The largest size or head count a config may give (far above any model's).
MAX_HPARAM = 1 << 24


def _hparam(config: Mapping[str, Any], keys: Sequence[str], source: str, limit: int = MAX_HPARAM) -> int | None:
    """The first of ``keys`` the config has, which must be a positive integer up to ``limit``; ``None`` when none is there.

    Raises:
        BaseModelError: the value is of another type (``"32"``, ``32.0``, ``true``), zero, negative or above ``limit``.
    """
    for key in keys:
        if key not in config or config[key] is None:
            continue
        value = config[key]
        if not is_int(value) or not 1 <= value <= limit:
            raise BaseModelError(f"{source}: {key} must be a positive integer (at most {limit:,}), found {json.dumps(value)[:40]}; "
                                 "fix the base model's config.json")
        return value  # type: ignore[no-any-return]
    return None


def base_from_config(config: Mapping[str, Any], *, arch: str | None = None, source: str = "config") -> GGUFBase:
    """The :class:`GGUFBase` of a base model's ``config.json`` (``arch`` overrides its ``architectures``).

    Raises:
        UnsupportedArchitectureError: the architecture is not one llama.cpp's converter handles here.
        BaseModelError: the config names no architecture and ``arch`` is not given.
    """
    if "text_config" in config and isinstance(config["text_config"], Mapping):  # as the converter reads it
        config = {**config, **config["text_config"]}
    if arch is not None:
        name = _architecture_named(arch)
    else:
        archs = config.get("architectures")
        if isinstance(archs, list) and archs and isinstance(archs[0], str):
            name = archs[0]
        elif isinstance(config.get("model_type"), str) and config["model_type"] in ARCH_ALIASES:
            name = ARCH_ALIASES[config["model_type"]]
        else:
            raise BaseModelError(f"{source}: names no 'architectures' (or known 'model_type'); give the architecture, e.g. arch='llama'")
        if name not in ARCHITECTURES:
            raise UnsupportedArchitectureError(
                f"{source}: architecture {name!r} is not supported for GGUF export; supported: {_supported()}", architecture=name
            )
    base = GGUFBase(
        architecture=name,
        n_layers=_hparam(config, ("n_layers", "num_hidden_layers", "n_layer", "num_layers"), source, MAX_LAYERS),
        n_head=_hparam(config, ("n_heads", "num_attention_heads", "n_head"), source),
        n_head_kv=_hparam(config, ("n_kv_heads", "num_key_value_heads"), source),
        source=source,
        hidden=_hparam(config, ("hidden_size", "n_embd", "d_model"), source),
        intermediate=_hparam(config, ("intermediate_size", "n_inner"), source),
        head_dim=_hparam(config, ("head_dim",), source),
    )
    if base.n_head is not None and base.n_head_kv is not None and (base.n_head_kv > base.n_head or base.n_head % base.n_head_kv):
        raise BaseModelError(f"{source}: {base.n_head_kv} key/value heads do not divide {base.n_head} attention heads; fix the base model's config.json")
    if base.n_head is not None and base.hidden is not None and base.head_dim is None and base.hidden % base.n_head:
        raise BaseModelError(f"{source}: hidden size {base.hidden} is not a multiple of its {base.n_head} attention heads; fix the base model's config.json")
    return base


def _config_file(path: Path) -> Path:
    return path / "config.json" if path.is_dir() else path


def resolve_base(
    adapter: NestedAdapter, base_model: str | os.PathLike[str] | Mapping[str, Any] | None = None, *, arch: str | None = None
) -> GGUFBase:
    """Find the base model's architecture and sizes for ``adapter``.

    ``base_model`` is the base folder, its ``config.json`` alone, or that config as a mapping;
    without it, the adapter's recorded base is used when it is a local folder with a
    ``config.json``. With only ``arch`` (a base that is not local), the block count comes from
    the adapter's module names.

    Raises:
        BaseModelError: the given base has no readable ``config.json``, or no base is found and
            ``arch`` is not given, or a Llama-family base has no head counts.
        UnsupportedArchitectureError: see :func:`base_from_config`.
    """
    config: Mapping[str, Any] | None = None
    source = ""
    if isinstance(base_model, Mapping):
        config, source = base_model, "the base model config"
    elif base_model is not None:
        path = _config_file(Path(base_model))
        if not path.is_file():
            raise BaseModelError(f"base model {str(base_model)!r} has no config.json; give the base model folder or its config.json")
        config, source = read_json(path, BaseModelError, "base model config"), str(path)
    else:
        recorded = adapter.base_model
        if recorded and (Path(recorded) / "config.json").is_file():
            path = Path(recorded) / "config.json"
            config, source = read_json(path, BaseModelError, "base model config"), str(path)
    if config is not None and not isinstance(config, Mapping):
        raise BaseModelError(f"{source}: expected a JSON object")
    if config is None:
        if arch is None:
            recorded = adapter.base_model
            raise BaseModelError(
                f"the base model of {str(adapter.path)!r} ({recorded!r}) is not a local folder with a config.json; "
                "give the base folder or its config.json, or name the architecture (e.g. llama, qwen2, gpt2)"
            )
        base = GGUFBase(_architecture_named(arch), n_layers=None, source=f"arch {arch!r}")
    else:
        base = base_from_config(config, arch=arch, source=source)
    if base.spec.rope_permute and base.n_head is None:
        raise BaseModelError(
            f"{base.source}: a {base.architecture} adapter needs the base's num_attention_heads (llama.cpp permutes "
            "its query and key rows); give the base folder or its config.json"
        )
    return base


_LAYER = re.compile(r"\.(\d+)\.")


def _layer_of(module: str) -> int | None:
    """The block index in a module name (its first numbered part: ``model.layers.3.mlp.up_proj`` → 3)."""
    m = _LAYER.search(f".{module}.")
    return int(m.group(1)) if m and len(m.group(1)) <= 9 else (MAX_LAYERS if m else None)


def _n_layers(adapter: NestedAdapter, base: GGUFBase) -> int:
    """Blocks the tensor-name map covers: those the adapter's modules name (checked against the
    base by :func:`check_base_fits`), never a count read from a config (building the map costs
    about 1.5 ms per block)."""
    found = [i for name in adapter.modules if (i := _layer_of(name)) is not None]
    return min(max(found) + 1, MAX_LAYERS) if found else 1


#: ``(in_features, out_features)`` of each target module kind, as names of the base's sizes (see
#: :func:`_expected_shape`): the Llama family (Llama, Mistral, Qwen2, Qwen3) and GPT-2's ``Conv1D``
#: targets (whose ``attn.c_proj`` and ``mlp.c_proj`` share a last name).
_LLAMA_SHAPES = {"q_proj": ("h", "q"), "k_proj": ("h", "kv"), "v_proj": ("h", "kv"), "o_proj": ("q", "h"),
                 "gate_proj": ("h", "i"), "up_proj": ("h", "i"), "down_proj": ("i", "h")}
_GPT2_SHAPES = {"attn.c_attn": ("h", "3h"), "attn.c_proj": ("h", "h"), "mlp.c_fc": ("h", "i"), "mlp.c_proj": ("i", "h")}


def _expected_shape(module: str, base: GGUFBase) -> tuple[int | None, int | None] | None:
    """``(in, out)`` the base gives module ``module`` (a part is ``None`` where the config lacks the
    size; ``None`` for a module kind not checked here). Sizes: hidden ``h``, intermediate ``i``,
    query width ``q = heads · head_dim``, key/value width ``kv = kv_heads · head_dim``."""
    h, n_head = base.hidden, base.n_head
    if base.spec.gguf_arch == "GPT2":
        table = _GPT2_SHAPES
        kind = next((k for k in table if module == k or module.endswith("." + k)), None)
        sizes = {"h": h, "3h": 3 * h if h else None, "i": base.intermediate or (4 * h if h else None)}
    else:
        table = _LLAMA_SHAPES
        kind = module.rsplit(".", 1)[-1]
        head = base.head_dim or (h // n_head if h and n_head else None)
        sizes = {"h": h, "i": base.intermediate, "q": n_head * head if n_head and head else None,
                 "kv": (base.n_head_kv or n_head) * head if n_head and head else None}
    if kind not in table:
        return None
    a, b = table[kind]
    return sizes[a], sizes[b]


def check_base_fits(adapter: NestedAdapter, base: GGUFBase) -> None:
    """Check the base's config against the adapter's tensors before any of its numbers is used:
    every module's block index below :data:`MAX_LAYERS` (one at or above the base's block count
    has no llama.cpp name: :func:`tensor_names`), every module's ``(in, out)`` what the base's
    sizes and head counts give it, and the query and key rows a whole number of (even) heads
    where llama.cpp permutes them.

    Raises:
        BaseModelMismatchError: naming the module, what the base gives and what the adapter holds.
        BaseModelError: a layer index beyond any model.
    """
    for name, m in adapter.modules.items():
        layer = _layer_of(name)
        if layer is not None and layer >= MAX_LAYERS:
            raise BaseModelError(f"{str(adapter.path)!r}: module {name!r} names block {layer}, beyond any model ({MAX_LAYERS:,} blocks); the adapter is corrupt")
        expected = _expected_shape(name, base)
        if expected is not None:
            for axis, want, got in (("in", expected[0], m.in_features), ("out", expected[1], m.out_features)):
                if want is not None and want != got:
                    raise BaseModelMismatchError(
                        f"{str(adapter.path)!r}: module {name!r} has {got} {axis}put features but {base.source} gives {want} "
                        f"({base.architecture}: hidden {base.hidden}, {base.n_head} heads, {base.n_head_kv or base.n_head} key/value heads); "
                        "is this the base model the adapter was trained on?")
        if base.spec.rope_permute and base.n_head is not None and name.endswith(("q_proj", "k_proj")):
            heads = base.n_head if name.endswith("q_proj") else (base.n_head_kv or base.n_head)
            if m.out_features % (2 * heads):
                raise BaseModelMismatchError(
                    f"{str(adapter.path)!r}: module {name!r} has {m.out_features} output rows, not a whole number of {heads} "
                    f"heads of even size as llama.cpp's rotary layout needs ({base.source}); is this the base model the adapter was trained on?")


def tensor_names(adapter: NestedAdapter, base: GGUFBase) -> dict[str, str]:
    """PEFT module name → GGUF base tensor name (``blk.0.attn_q.weight``), by llama.cpp's tensor-name map.

    Raises:
        UnsupportedArchitectureError: a module has no llama.cpp name (listed, with the architecture).
    """
    import gguf

    arch = getattr(gguf.MODEL_ARCH, base.spec.gguf_arch)
    tmap = gguf.get_tensor_name_map(arch, _n_layers(adapter, base))
    names: dict[str, str] = {}
    unmapped: list[str] = []
    for module in adapter.modules:
        key = base.spec.prefix + module.replace("language_model.", "") + ".weight"
        layer = _layer_of(module)
        beyond = layer is not None and base.n_layers is not None and layer >= base.n_layers  # no such block in the base
        new = None if beyond else tmap.get_name(key, try_suffixes=(".weight", ".bias"))
        if new is None:
            unmapped.append(module)
        else:
            names[module] = new
    if unmapped:
        more = f" and {len(unmapped) - 3} more" if len(unmapped) > 3 else ""
        raise UnsupportedArchitectureError(
            f"{str(adapter.path)!r}: llama.cpp's {base.spec.gguf_arch.lower()} tensor map has no name for module(s) "
            f"{', '.join(unmapped[:3])}{more}; llama.cpp cannot apply a LoRA on them (retrain without these targets)",
            architecture=base.architecture,
            modules=tuple(unmapped),
        )
    return names


def _rope_permute(b: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` on the output rows of ``B`` (``[out, k]``)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return b.reshape(n_head, 2, b.shape[0] // n_head // 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape)


def _as_float(data: np.ndarray, dtype: str) -> np.ndarray:
    """A copy as float32 (float16 stays float16), as the converter converts its tensors before quantizing."""
    if dtype == "BF16":  # uint16 bit patterns → float32, exactly
        return (data.astype(np.uint32) << 16).view(np.float32)
    if dtype == "F16":
        return np.array(data, dtype=np.float16)
    with np.errstate(over="ignore"):  # a float64 value beyond float32's range is refused by _quantize
        return np.array(data, dtype=np.float32)


#: The float type whose range bounds each out type (Q8_0 stores its block scales, and its fallback rows, in float16).
_RANGE_OF = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "F16"}


def _quantize(name: str, data: np.ndarray, out_type: str) -> tuple[np.ndarray, Any]:
    """``gguf.quants.quantize`` to the out type; Q8_0 falls back to F16 where a row does not fit, as the converter does.

    Raises:
        NonFiniteOutputError: a value is not finite in the out type (checked before it is converted).
    """
    import gguf

    if not finite_in(data, _RANGE_OF[out_type]):
        raise NonFiniteOutputError(
            f"GGUF tensor {name!r} would hold infinite or NaN values as {out_type}: the adapter's scale or weights are too "
            "large for it; choose a wider out type or fix the adapter; nothing was written", tensor=name)

    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[out_type]
    try:
        return gguf.quants.quantize(data, qtype), qtype
    except gguf.QuantError as e:
        logger.warning("%s: %s, falling back to F16", name, e)
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.F16), gguf.GGMLQuantizationType.F16


#: How ``s(k)`` is expressed, as for slices (docs/design.md §2).


def format_name(name: str, adapter: NestedAdapter, k: int) -> str:
    """``general.name`` of the rank-``k`` file: ``name`` with ``{adapter}`` and ``{rank}`` filled in.

    Raises:
        ConfigError: ``name`` has another ``{field}`` or unbalanced braces.
    """
    try:
        return name.format(adapter=adapter.path.name, rank=k)
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"name {name!r}: only {{adapter}} and {{rank}} can be filled in ({e}); double a literal brace: {{{{ }}}}") from e


def check_out_type(out_type: str | None, adapter: NestedAdapter) -> str:
    """The out type to write (``None``: the one that keeps the adapter's dtype).

    Raises:
        ConfigError: unknown out type.
    """
    if out_type is None:
        return _DEFAULT_OUT_TYPE.get(adapter.dtype, "f32")
    if out_type not in OUT_TYPES:
        raise ConfigError(f"unknown GGUF out type {out_type!r}: expected one of {', '.join(OUT_TYPES)}")
    return out_type


def gguf_alpha(adapter: NestedAdapter, k: int, scale_mode: str) -> float:
    """``adapter.lora.alpha`` at rank ``k``: ``k`` (baked) or ``s(k)·k`` (native); llama.cpp scales by ``alpha / k``."""
    return float(k) if scale_mode == "baked" else float(peft_alpha_for(k, adapter.config.scaling, adapter.config.alpha)[0])


def _lora_tensors(reader: AdapterReader, k: int, base: GGUFBase, names: Mapping[str, str], scale_mode: str) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """``(gguf base name, lora_a [k, in], lora_b [out, k])`` per module in file order, as float arrays."""
    adapter = reader.adapter
    factor = adapter.scale(k) if scale_mode == "baked" else None
    for module, gguf_name in names.items():
        a = _as_float(reader.lora_A_data(module, k), adapter.dtype)
        b = _as_float(reader.lora_B_data(module, k, factor), adapter.dtype)  # baked: rounded once to the adapter's dtype, as the slice
        if base.spec.rope_permute and base.n_head is not None:
            if module.endswith("q_proj"):
                b = _rope_permute(b, base.n_head, base.n_head)
            elif module.endswith("k_proj"):
                b = _rope_permute(b, base.n_head, base.n_head_kv)
        yield gguf_name, a, b


def write_gguf(
    adapter: NestedAdapter,
    k: int,
    path: str | os.PathLike[str],
    base: GGUFBase,
    *,
    scale_mode: str = "baked",
    out_type: str | None = None,
    name: str = DEFAULT_NAME,
    reader: AdapterReader | None = None,
) -> GGUFResult:
    """Write the rank-``k`` llama.cpp LoRA adapter of ``adapter`` to the file ``path`` (not atomic:
    :func:`export_gguf` writes into a temporary folder).

    Raises:
        RankError: ``k`` is outside ``[1, r]``.
        ConfigError: unknown scale mode or out type.
        UnsupportedArchitectureError: a module llama.cpp cannot map.
    """
    import gguf

    check_scale_mode(scale_mode)
    adapter.check_rank(k)
    out_type = check_out_type(out_type, adapter)
    if reader is None:
        with adapter.reader() as rd:
            return write_gguf(adapter, k, path, base, scale_mode=scale_mode, out_type=out_type, name=name, reader=rd)
    names = tensor_names(adapter, base)
    alpha = gguf_alpha(adapter, k, scale_mode)
    arch = getattr(gguf.MODEL_ARCH, base.spec.gguf_arch)
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[arch])
    # the key order of convert_lora_to_gguf.py: type, name, alpha, quantization version
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_name(format_name(name, adapter, k))
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    count = 0
    for gguf_name, a, b in _lora_tensors(reader, k, base, names, scale_mode):
        for suffix, data in ((".lora_a", a), (".lora_b", b)):
            qdata, qtype = _quantize(gguf_name + suffix, data, out_type)
            writer.add_tensor(gguf_name + suffix, qdata, raw_dtype=qtype)
            count += 1
    writer.write_header_to_file(path=Path(path))
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    assert writer.fout is not None
    expected = writer.fout[0].tell()  # where the writer believes the file ends
    writer.close()
    # The gguf package writes tensors with numpy's tofile, which drops what a full disk refuses
    # without an error: a file shorter than the writer believes is that (or an I/O error).
    check_written(path, expected)
    size = Path(path).stat().st_size
    logger.info("wrote rank %d GGUF adapter (%d tensors, %s, alpha %g) to %s", k, count, out_type, alpha, path)
    return GGUFResult(k, Path(path), alpha, adapter.scale(k), count, size, out_type, base.architecture)


def check_gguf_export(
    adapter: NestedAdapter,
    ranks: Iterable[int] | str,
    *,
    base_model: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    arch: str | None = None,
    out_type: str | None = None,
    name: str = DEFAULT_NAME,
) -> tuple[tuple[int, ...], str, GGUFBase]:
    """Every check :func:`export_gguf` makes on its options and the base before it writes a byte
    (the ranks, the out type, the name template, the base's architecture and tensor names), so
    a caller with more expensive work to do first (``write_bundle``) can make them up front.

    Returns ``(ranks, out_type, base)``, resolved.

    Raises:
        RankError, ConfigError, BaseModelError, UnsupportedArchitectureError: see :func:`export_gguf`.
    """
    ks = resolve_ranks(adapter, ranks if isinstance(ranks, str) else list(ranks))
    out_type = check_out_type(out_type, adapter)
    format_name(name, adapter, ks[0])
    base = resolve_base(adapter, base_model, arch=arch)
    check_base_fits(adapter, base)  # before any of the config's numbers is used
    tensor_names(adapter, base)  # refuse unmappable modules before anything is written
    return ks, out_type, base


@dataclass(frozen=True)
class GgufOptions:
    """How :func:`export_gguf` writes each rank: the architecture (for a base that is not local),
    the tensor type, the scale mode and each file's ``general.name``."""

    arch: str | None = param(
        None, flag="--arch",
        help="Name the architecture (llama, mistral, qwen2, qwen3, gpt2) for a base that is not local; Llama-family bases "
             "still need --base-model (head counts).")
    out_type: str | None = param(None, flag="--outtype", choices=OUT_TYPES,
                                 help="Tensor type, as convert_lora_to_gguf.py --outtype. [default: the adapter's dtype]")
    scale_mode: str = param(
        "baked", flag="--scale-mode", choices=SCALE_MODES, show_default=True,
        help="baked: s(k) folded into lora_b, alpha = k; native: exact prefix, alpha = s(k)·k. llama.cpp applies alpha/k either way.")
    name: str = param(DEFAULT_NAME, flag="--name", show_default=True,
                      help="general.name of each file ({adapter}: the adapter folder's name, {rank}: the rank).")


def export_gguf(
    adapter: NestedAdapter | str | os.PathLike[str],
    ranks: Iterable[int] | str,
    output: str | os.PathLike[str],
    options: GgufOptions | None = None,
    *,
    base_model: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    force: bool = False,
    progress: Progress | None = None,
    **legacy: Any,
) -> list[GGUFResult]:
    """Write ``output/r{k}.gguf``, a llama.cpp LoRA adapter, for each rank in ``ranks`` (``"all"`` = the train ranks).

    Load one with ``llama-cli -m base.gguf --lora output/r8.gguf``. ``base_model`` and the
    options' ``arch``: see :func:`resolve_base`; ``out_type`` (:class:`GgufOptions`): one of
    :data:`OUT_TYPES` (default: the adapter's dtype); ``name``: ``general.name`` of each file, with
    ``{adapter}`` and ``{rank}`` filled in. The folder appears at once when every file is written
    (temporary sibling, then renamed). The options passed as keywords of this function still
    work for one release, with a ``DeprecationWarning``.

    Raises:
        InvalidAdapterError: the adapter folder is invalid, or a weight is NaN or infinite.
        RankError: a rank is outside ``[1, r]``, or none is given.
        ConfigError: unknown scale mode or out type.
        BaseModelError, UnsupportedArchitectureError: see :func:`resolve_base` and :func:`tensor_names`.
        OutputExistsError: ``output`` exists and ``force`` is false.
        OutputPathError: ``output`` is, holds or lies inside an input.
        InsufficientDiskError: not enough free disk for the files, or the disk filled up while writing them.
    """
    opts = merge_legacy(options, GgufOptions, legacy, "export_gguf")
    check_scale_mode(opts.scale_mode)
    inputs = [adapter.path if isinstance(adapter, NestedAdapter) else adapter]
    if base_model is not None and not isinstance(base_model, Mapping):
        inputs.append(base_model)
    check_output_path(output, force, inputs)
    nested = adapter if isinstance(adapter, NestedAdapter) else NestedAdapter.load(adapter)
    ks, out_type, base = check_gguf_export(nested, ranks, base_model=base_model, arch=opts.arch, out_type=opts.out_type, name=opts.name)
    total = sum(nested.bytes_at(k) for k in ks)
    check_free_space(Path(output).absolute().parent, total)
    done = 0
    results = []
    with atomic_output_dir(output, force, inputs, needed_bytes=total) as tmp, nested.reader() as reader:
        for k in ks:
            results.append(write_gguf(nested, k, tmp / f"r{k}.gguf", base, scale_mode=opts.scale_mode, out_type=out_type, name=opts.name, reader=reader))
            done += nested.bytes_at(k)
            if progress is not None:
                progress(done, total)
    final = Path(output)
    return [GGUFResult(r.rank, final / r.path.name, r.alpha, r.scale, r.tensors, r.bytes, r.out_type, r.architecture) for r in results]


__all__ = [
    "ARCHITECTURES",
    "ARCH_ALIASES",
    "DEFAULT_NAME",
    "OUT_TYPES",
    "SCALE_MODES",
    "ArchSpec",
    "GGUFBase",
    "GGUFResult",
    "GgufOptions",
    "base_from_config",
    "check_gguf_export",
    "check_out_type",
    "check_scale_mode",
    "export_gguf",
    "format_name",
    "gguf_alpha",
    "resolve_base",
    "resolve_ranks",
    "tensor_names",
    "write_gguf",
]
