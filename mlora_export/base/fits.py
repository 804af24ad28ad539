"""Does this adapter fit this base? One check for every command that puts an adapter on a base.

Two forms, over the same rule: :func:`check_fits` on a loaded model (evaluation, ONNX export)
checks module types too (a ``Conv1D`` target needs ``fan_in_fan_out``, a ``Linear`` must not
have it); :func:`check_fits_weights` on the weight headers alone (the streaming merge, which never
builds the model) checks each target weight's shape in the base's orientation and its dtype.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..errors import BaseModelError, BaseModelMismatchError
from ..io.safetensors import TensorInfo
from .folder import FLOAT_WEIGHT_DTYPES

if TYPE_CHECKING:
    import torch

    from ..adapter import NestedAdapter


def module_shape(module: "torch.nn.Module") -> tuple[int, int, bool]:
    """``(in_features, out_features, is_conv1d)`` of a ``nn.Linear`` or transformers ``Conv1D``.

    Raises:
        BaseModelMismatchError: the module is neither.
    """
    import torch
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):
        return int(module.weight.shape[0]), int(module.weight.shape[1]), True
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features, False
    raise BaseModelMismatchError(f"module is a {type(module).__name__}, not a Linear or Conv1D layer")


def check_fits(adapter: NestedAdapter, model: Any, *, base: str | None = None) -> None:
    """Check that every adapted module exists in ``model`` with matching shapes and orientation.

    ``base`` names the base in messages (its folder).

    Raises:
        BaseModelMismatchError: a module is missing, is not a Linear/Conv1D, has other shapes, or
            is a Conv1D while the adapter lacks ``fan_in_fan_out`` (or the reverse).
    """
    mods = dict(model.named_modules())
    where = f"adapter {str(adapter.path)!r} does not fit base model" + (f" {base!r}" if base else "")
    missing = [n for n in adapter.modules if n not in mods]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        trained_on = f" ({adapter.base_model!r})" if adapter.base_model else ""
        raise BaseModelMismatchError(
            f"{where}: module {missing[0]!r}{more} not found in the base model (the base does not have it); "
            f"was the adapter trained on another base{trained_on}?"
        )
    for name, lm in adapter.modules.items():
        try:
            fan_in, fan_out, conv1d = module_shape(mods[name])
        except BaseModelMismatchError as e:
            raise BaseModelMismatchError(f"{where}: {name!r}: {e}") from e
        if (fan_in, fan_out) != (lm.in_features, lm.out_features):
            raise BaseModelMismatchError(
                f"{where}: {name!r} is [in {fan_in}, out {fan_out}] in the base but [in {lm.in_features}, out {lm.out_features}] "
                "in the adapter; use the base model the adapter was trained on"
            )
        if conv1d != adapter.fan_in_fan_out:
            raise BaseModelMismatchError(
                f"{where}: {name!r} is {'a Conv1D' if conv1d else 'a Linear'} layer but the adapter has "
                f"fan_in_fan_out = {str(adapter.fan_in_fan_out).lower()}; use the base model the adapter was trained on"
            )


def expected_weight_shape(out_features: int, in_features: int, fan_in_fan_out: bool) -> tuple[int, int]:
    """The base weight's shape for a target: ``[out, in]`` (Linear) or ``[in, out]`` (Conv1D)."""
    return (in_features, out_features) if fan_in_fan_out else (out_features, in_features)


def check_fits_weights(adapter: NestedAdapter, weights: Mapping[str, tuple[str, TensorInfo]], mapping: Mapping[str, str]) -> dict[str, str]:
    """Check the target weights of ``adapter`` in the base's headers; return weight key → module.

    ``weights`` maps a base tensor name to ``(file name, header entry)``; ``mapping`` maps each
    adapter module to its base weight key (see ``resolve_weight_keys`` of the merge).

    Raises:
        BaseModelMismatchError: a weight has another shape (the transpose gets a
            ``fan_in_fan_out`` hint), or two modules map to one weight.
        BaseModelError: a target weight is not a float tensor (a quantized base).
    """
    targets: dict[str, str] = {}
    for name, key in mapping.items():
        file_name, info = weights[key]
        mod = adapter.modules[name]
        expected = expected_weight_shape(mod.out_features, mod.in_features, adapter.fan_in_fan_out)
        if tuple(info.shape) != expected:
            hint = ""
            if tuple(info.shape) == expected[::-1]:
                hint = (
                    " (the transpose: the adapter's fan_in_fan_out is "
                    f"{str(adapter.fan_in_fan_out).lower()}, which does not match this layer's type)"
                )
            raise BaseModelMismatchError(
                f"adapter module {name!r} expects base weight {key!r} of shape {list(expected)} "
                f"([out_features, in_features] = [{mod.out_features}, {mod.in_features}]{', transposed for Conv1D' if adapter.fan_in_fan_out else ''}) "
                f"but {file_name} holds {list(info.shape)}{hint}; is this the base model the adapter was trained on?"
            )
        if info.dtype not in FLOAT_WEIGHT_DTYPES:
            raise BaseModelError(
                f"base weight {key!r} in {file_name} has dtype {info.dtype}; only float weights ({', '.join(FLOAT_WEIGHT_DTYPES)}) "
                "can carry the adapter exactly: use the unquantized base model (merge first, quantize afterwards)"
            )
        targets[key] = name
    if len(targets) != len(mapping):
        raise BaseModelMismatchError("two adapter modules map to the same base weight; the adapter does not fit this base model")
    return targets
