"""ONNX export of a nested adapter with the rank as a runtime input (plus fixed, merged and
ONNX Runtime adapter-file exports), verified in ONNX Runtime.

Modules: :mod:`.graph` (wrappers and the exporter call), :mod:`.ort_adapter` (``.onnx_adapter``
files), :mod:`.verify` (ONNX Runtime vs PyTorch), :mod:`.export` (:func:`export_onnx`).
"""

from .export import EXPORT_KINDS, MODEL_NAME, OnnxExportResult, export_onnx

__all__ = ["EXPORT_KINDS", "MODEL_NAME", "OnnxExportResult", "export_onnx"]
