"""ONNX Runtime adapter files (``.onnx_adapter``), one per rank.

An ``adapters`` export takes every LoRA factor as a graph input (``<module>.lora_A`` ``[k, in]``,
``<module>.lora_B`` ``[out, k]``, symbolic ``k``). A rank-``k`` adapter file holds ``A[:k]`` and
``s(k)·B[:, :k]`` (the scale baked into ``B``, in float32) under those names; ONNX Runtime loads
it with ``onnxruntime.LoraAdapter`` and feeds it per run through
``RunOptions.add_active_adapter`` — the multi-LoRA mechanism of ONNX Runtime GenAI.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ...adapter import NestedAdapter

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
    import torch

    adapter.check_rank(k)
    s = adapter.scale(k)
    params = {}
    with adapter.reader() as rd:
        for name in adapter.modules:
            a = rd.lora_A(name, k).to(torch.float32).numpy()
            b = (rd.lora_B(name, k).to(torch.float32) * s).numpy()
            params[f"{name}.lora_A"] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a))
            params[f"{name}.lora_B"] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(b))
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(k)
    fmt.set_model_version(1)
    fmt.set_parameters(params)
    out = Path(path)
    fmt.export_adapter(str(out))
    logger.info("wrote ONNX Runtime adapter %s (rank %d, %d tensors)", out, k, len(params))
    return out


def add_empty_defaults(model_path: str | os.PathLike[str], adapter: NestedAdapter) -> int:
    """Give every LoRA input of an ``adapters`` export a rank-0 default (``[0, in]`` / ``[out, 0]``).

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
        for key, shape in ((f"{name}.lora_A", (0, m.in_features)), (f"{name}.lora_B", (m.out_features, 0))):
            if key in inputs and key not in present:
                model.graph.initializer.append(numpy_helper.from_array(np.zeros(shape, dtype=np.float32), key))
                added += 1
    onnx.save_model(model, str(model_path))
    return added


__all__ = ["ADAPTER_SUFFIX", "add_empty_defaults", "adapter_file_name", "write_ort_adapter"]
