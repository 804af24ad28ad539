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


__all__ = ["ADAPTER_SUFFIX", "adapter_file_name", "write_ort_adapter"]
