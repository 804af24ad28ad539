"""ONNX export of a nested adapter with the rank as a runtime input (plus fixed, merged and
ONNX Runtime adapter-file exports, and a KV-cache decoder for ONNX Runtime GenAI), verified in
ONNX Runtime.

Modules: :mod:`.graph` (wrappers and the exporter call), :mod:`.ort_adapter` (``.onnx_adapter``
files), :mod:`.verify` (ONNX Runtime vs PyTorch), :mod:`.export` (:func:`export_onnx`),
:mod:`.genai_graph` (the decoder with ``past_key_values``), :mod:`.genai` (:func:`export_genai`,
``genai_config.json``).
"""

from .export import EXPORT_KINDS, MODEL_NAME, OnnxExportResult, export_onnx
from .genai import GENAI_CONFIG_NAME, GENAI_KINDS, GenaiExportResult, export_genai

__all__ = ["EXPORT_KINDS", "GENAI_CONFIG_NAME", "GENAI_KINDS", "MODEL_NAME", "GenaiExportResult", "OnnxExportResult", "export_genai", "export_onnx"]
