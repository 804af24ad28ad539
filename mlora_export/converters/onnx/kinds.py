"""The kinds of ONNX export, and what each kind's graph takes as input.

One small type instead of string tests spread over the package: a kind says whether the rank is a
graph input (``lora_rank``), whether the LoRA factors are graph inputs (adapter files choose the
rank), whether the rank is fixed at export, and whether the graph is a decoder with a KV cache for
ONNX Runtime GenAI. It is a ``str`` enum, so it is written to JSON and compared with its name as it is.
"""

from __future__ import annotations

from enum import Enum


class ExportKind(str, Enum):
    """``dynamic``: rank input; ``fixed``: rank-``k`` factors as constants; ``merged``: ``W + ΔW_k``
    folded in; ``adapters``: factors as inputs; ``genai`` / ``genai-adapters``: the same two as a
    decoder with a KV cache."""

    DYNAMIC = "dynamic"
    FIXED = "fixed"
    MERGED = "merged"
    ADAPTERS = "adapters"
    GENAI = "genai"
    GENAI_ADAPTERS = "genai-adapters"

    def __str__(self) -> str:
        return self.value

    @property
    def rank_input(self) -> bool:
        """The graph has the ``lora_rank`` input: the rank is chosen per run."""
        return self in (ExportKind.DYNAMIC, ExportKind.GENAI)

    @property
    def factor_inputs(self) -> bool:
        """The LoRA factors are graph inputs: an adapter file (one per train rank) chooses the rank."""
        return self in (ExportKind.ADAPTERS, ExportKind.GENAI_ADAPTERS)

    @property
    def fixed_rank(self) -> bool:
        """The rank is fixed when exporting (the export takes a rank)."""
        return self in (ExportKind.FIXED, ExportKind.MERGED)

    @property
    def decoder(self) -> bool:
        """A decoder with ``past_key_values`` inputs and ``present`` outputs, for ONNX Runtime GenAI."""
        return self in (ExportKind.GENAI, ExportKind.GENAI_ADAPTERS)


#: The kinds without a KV cache, in the order the docs list them.
EXPORT_KINDS: tuple[str, ...] = tuple(k.value for k in ExportKind if not k.decoder)
