"""A small byte-level BPE tokenizer in the standard ``tokenizer.json`` format, built locally.

ONNX Runtime GenAI (onnxruntime-extensions) and llama.cpp's converter read byte-level BPE
tokenizers (the GPT-2 / Llama 3 / Qwen2 family); the character-level WordLevel tokenizer of
:mod:`mlora_export.demo.tiny` is rejected by GenAI (a space maps to −1). Tests and benchmarks of the
GenAI export use this one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

#: ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2: the ids of :func:`mlora_export.demo.tiny.tiny_llama_config`.
BPE_SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<s>", "</s>")
#: A default training text: enough pairs for a few dozen merges over the 256 byte symbols.
DEFAULT_CORPUS: tuple[str, ...] = (
    "hello world, the quick brown fox jumps over the lazy dog.",
    "nested adapters slice into every rank; the first k components are a rank-k adapter.",
    "onnx runtime generates with a key value cache, one token at a time.",
)


def build_byte_bpe_tokenizer(
    vocab_size: int = 320, corpus: Iterable[str] = DEFAULT_CORPUS * 20, special_tokens: Sequence[str] = BPE_SPECIAL_TOKENS,
) -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` of at most ``vocab_size`` tokens trained on ``corpus``.

    Ids: ``special_tokens`` first (by default ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2), then the 256 byte
    symbols, then the merges. Deterministic for a given corpus. No special tokens are added on encode.

    Raises:
        ValueError: ``vocab_size`` below ``256 + len(special_tokens)`` (every byte needs a token).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(special_tokens):
        raise ValueError(f"vocab_size {vocab_size} is too small for a byte-level BPE: at least {256 + len(special_tokens)} needed")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(special_tokens), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer)
    names = dict(zip(("pad_token", "bos_token", "eos_token"), special_tokens))
    return PreTrainedTokenizerFast(tokenizer_object=tok, **names)


__all__ = ["BPE_SPECIAL_TOKENS", "DEFAULT_CORPUS", "build_byte_bpe_tokenizer"]
