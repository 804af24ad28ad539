"""ONNX Runtime adapter files (``.onnx_adapter``), one per rank.

An ``adapters`` export takes every LoRA factor as a graph input in Olive's naming and layout
(``<module>.lora_A.weight`` ``[in, k]``, ``<module>.lora_B.weight`` ``[k, out]``, symbolic ``k``;
what ``olive convert-adapters`` writes and ONNX Runtime GenAI's ``Adapters`` feed). A rank-``k``
adapter file holds ``A[:k]ᵀ`` and ``(s(k)·B[:, :k])ᵀ`` (the scale baked into ``B``, in float32)
under those names; ONNX Runtime loads it with ``onnxruntime.LoraAdapter`` and feeds it per run
through ``RunOptions.add_active_adapter``, GenAI through ``Adapters.load`` and
``Generator.set_active_adapter``.

Before issue 14 the names were ``<module>.lora_A`` ``[k, in]`` / ``<module>.lora_B`` ``[out, k]``;
files of that form do not fit exports made since (re-export both).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from ...adapter import NestedAdapter
from .graph import input_factors, lora_input_names

logger = logging.getLogger(__name__)

ADAPTER_SUFFIX = ".onnx_adapter"


def adapter_file_name(k: int) -> str:
    """``r{k}.onnx_adapter``."""
    return f"r{k}{ADAPTER_SUFFIX}"


def write_ort_adapter(adapter: NestedAdapter, k: int, path: str | os.PathLike[str]) -> Path:
    """Write the rank-``k`` ONNX Runtime adapter file of ``adapter`` to ``path``.

    Raises:
        RankError: ``k`` is outside ``[1, r]``.
    """
    import numpy as np
    import onnxruntime as ort

    adapter.check_rank(k)
    params = {}
    for name, a_t, b_t in input_factors(adapter, k):
        key_a, key_b = lora_input_names(name)
        params[key_a] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a_t.numpy()))
        params[key_b] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(b_t.numpy()))
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(k)
    fmt.set_model_version(1)
    fmt.set_parameters(params)
    out = Path(path)
    fmt.export_adapter(str(out))
    logger.info("wrote ONNX Runtime adapter %s (rank %d, %d tensors)", out, k, len(params))
    return out


def add_empty_defaults(model_path: str | os.PathLike[str], adapter: NestedAdapter) -> int:
    """Give every LoRA input of an ``adapters`` export a rank-0 default (``[in, 0]`` / ``[0, out]``).

    ONNX Runtime then treats the inputs as optional: a run without an active adapter (and without
    feeding them) is the base model, and an active adapter overrides the defaults. Returns how
    many defaults were added. External data of the model is left in place.
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path), load_external_data=False)
    present = {i.name for i in model.graph.initializer}
    inputs = {i.name for i in model.graph.input}
    added = 0
    for name, m in adapter.modules.items():
        key_a, key_b = lora_input_names(name)
        for key, shape in ((key_a, (m.in_features, 0)), (key_b, (0, m.out_features))):
            if key in inputs and key not in present:
                model.graph.initializer.append(numpy_helper.from_array(np.zeros(shape, dtype=np.float32), key))
                added += 1
    onnx.save_model(model, str(model_path))
    return added


__all__ = ["ADAPTER_SUFFIX", "add_empty_defaults", "adapter_file_name", "write_ort_adapter", "write_adapter_files"]


def write_adapter_files(adapter: NestedAdapter, ranks: Sequence[int], folder: Path, tick: Callable[[str], None]) -> dict[int, str]:
    """One ``adapters/r{k}.onnx_adapter`` per rank under ``folder`` (created); rank → relative path."""
    files: dict[int, str] = {}
    if ranks:
        (folder / "adapters").mkdir()
        for k in ranks:
            write_ort_adapter(adapter, k, folder / "adapters" / adapter_file_name(k))
            files[k] = f"adapters/{adapter_file_name(k)}"
            tick(f"wrote {files[k]}")
    return files

