"""The model the ONNX benchmarks share: a Llama-shaped base with random weights and a random
rank-64 all-linear nested adapter (train ranks 8, 16, 32, 64).

Hidden 512, 8 layers, 8 heads, intermediate 1376, vocabulary 32000: about 59 M parameters, large
enough that the LoRA ops show in a timing, small enough to export in a minute. Imported by the
scripts next to it (``python benchmarks/bench_onnx.py`` puts this folder on ``sys.path``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

HIDDEN, INTER, LAYERS, HEADS, VOCAB = 512, 1376, 8, 8, 32000
RANK = 64
TRAIN_RANKS = (8, 16, 32, 64)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_llama_nested(work: Path, *, config: Mapping[str, Any] | None = None, tokenizer: Any = None) -> tuple[Path, Path]:
    """Write ``work/base`` (the base model, ``config`` added to its ``LlamaConfig``, and
    ``tokenizer`` saved next to it when given) and ``work/nested`` (the adapter, method
    ``matryoshka``, ``sqrt`` scaling, factors of std 0.02); return both folders. Seeded: the same
    call writes the same weights."""
    import torch
    import transformers as tf

    from mlora_export.adapter import MatryoshkaConfig, save_nested

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=HEADS, max_position_embeddings=1024, tie_word_embeddings=False, **dict(config or {}),
    )
    model = tf.LlamaForCausalLM(cfg).eval()
    base = work / "base"
    model.save_pretrained(base)
    if tokenizer is not None:
        tokenizer.save_pretrained(base)
    gen = torch.Generator().manual_seed(1)
    factors = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS:
            factors[name] = (torch.randn(RANK, mod.in_features, generator=gen) * 0.02, torch.randn(mod.out_features, RANK, generator=gen) * 0.02)
    nested = work / "nested"
    save_nested(nested, factors, MatryoshkaConfig("matryoshka", RANK, TRAIN_RANKS, "sqrt", 1.0))
    return base, nested
