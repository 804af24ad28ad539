"""ONNX export of a nested adapter with the rank as a runtime input (plus fixed, merged and
ONNX Runtime adapter-file exports, and a KV-cache decoder for ONNX Runtime GenAI), verified in
ONNX Runtime.

Modules: :mod:`.kinds` (the export kinds), :mod:`.graph` (wrappers and the exporter call),
:mod:`.ort_adapter` (``.onnx_adapter`` files), :mod:`.verify` (ONNX Runtime vs PyTorch),
:mod:`.common` (:class:`OnnxExportOptions`, the result, the steps every export shares),
:mod:`.export` (:func:`export_onnx`),
:mod:`.genai_graph` (the decoder with ``past_key_values``), :mod:`.genai` (:func:`export_genai`,
``genai_config.json``), :mod:`.latency` (per-rank timing in ONNX Runtime).
"""

from .common import MODEL_NAME, OnnxExportOptions, OnnxExportResult
from .export import EXPORT_KINDS, export_onnx
from .genai import GENAI_CONFIG_NAME, GENAI_KINDS, GenaiExportResult, export_genai

__all__ = [
    "EXPORT_KINDS", "GENAI_CONFIG_NAME", "GENAI_KINDS", "MODEL_NAME", "GenaiExportResult", "OnnxExportOptions", "OnnxExportResult",
    "export_genai", "export_onnx",
]
