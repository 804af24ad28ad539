"""A tiny Llama-style causal LM and a character-level tokenizer, built locally (no download).

The demo and the tests need a real ``transformers`` model folder that loads with
``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``: this module writes
one from a :class:`transformers.LlamaConfig` and a ``tokenizers`` word-level model over single
characters, wrapped in :class:`transformers.PreTrainedTokenizerFast`.
"""

from __future__ import annotations

import logging
import os
import string
from typing import Any, Literal

from ..fs import atomic_output_dir

logger = logging.getLogger(__name__)

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK)
#: Printable ASCII without the other whitespace, plus newline.
CHARACTERS: str = "".join(c for c in string.printable if c not in "\t\r\x0b\x0c")

#: The default shape: about 0.1 M parameters, fast on a CPU.
TINY_SHAPE: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 128,
}


def build_char_tokenizer() -> Any:
    """A character-level ``PreTrainedTokenizerFast``: one token per character, ``<s>`` prepended.

    Ids: ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, ``<unk>`` 3, then :data:`CHARACTERS`.
    """
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in CHARACTERS:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
    # one piece per character; "." would leave a run of newlines as one (unknown) piece
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK, padding_side="right"
    )


def tiny_llama_config(vocab_size: int, **overrides: Any) -> Any:
    """A :class:`transformers.LlamaConfig` of :data:`TINY_SHAPE` (``overrides`` replace any field)."""
    from transformers import LlamaConfig

    shape = {**TINY_SHAPE, **overrides}
    return LlamaConfig(
        vocab_size=vocab_size,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        **shape,
    )


#: Byte-level BPE with no merges: one token per byte (so per ASCII character, as the character
#: tokenizer), in the standard ``tokenizer.json`` form that llama.cpp's converter and ONNX Runtime
#: GenAI read; 3 special tokens + 256 bytes.
BYTE_VOCAB_SIZE = 259


def build_byte_tokenizer() -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` of :data:`BYTE_VOCAB_SIZE` tokens, ``<s>`` prepended.

    Ids: ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, then the 256 byte symbols (one token per ASCII
    character, as :func:`build_char_tokenizer`), in the ``tokenizer.json`` form llama.cpp and ONNX
    Runtime GenAI read.
    """
    from tokenizers import processors

    from .bpe_tokenizer import build_byte_bpe_tokenizer

    tok = build_byte_bpe_tokenizer(BYTE_VOCAB_SIZE, corpus=["a"])  # 259 tokens leave no room for merges
    # <s> first, as the character tokenizer does (the tiny model's attention leans on it)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tok.convert_tokens_to_ids(BOS))]
    )
    return tok


def build_tiny_model(
    output: str | os.PathLike[str], *, seed: int = 0, force: bool = False, head_std: float | None = None,
    tokenizer: Literal["char", "byte-bpe"] = "char", **overrides: Any,
) -> dict[str, Any]:
    """Write a randomly initialised tiny causal LM and its tokenizer to ``output`` (safetensors).

    The weights are a function of ``seed`` (torch's global random state is left as it was).
    ``head_std`` is the standard deviation of the output head (default ``hidden_size ** -0.5``);
    ``overrides`` replace fields of :data:`TINY_SHAPE`. ``tokenizer``: ``char`` (:func:`build_char_tokenizer`)
    or ``byte-bpe`` (a byte-level BPE of :data:`BYTE_VOCAB_SIZE` tokens, the format llama.cpp and
    ONNX Runtime GenAI read). Returns ``{"path", "params", "vocab_size", "tokenizer", "config"}``.

    Raises:
        OutputExistsError: ``output`` exists and ``force`` is false.
    """
    import torch
    from transformers import LlamaForCausalLM

    if tokenizer == "byte-bpe":
        tok = build_byte_tokenizer()
    elif tokenizer == "char":
        tok = build_char_tokenizer()
    else:
        raise ValueError(f"unknown tokenizer {tokenizer!r}: expected 'char' or 'byte-bpe'")
    config = tiny_llama_config(len(tok), **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        with torch.no_grad():
            # transformers' default init (std 0.02) leaves a frozen output head able to move the logits by
            # about ±1 only, so an adapter could barely lower the loss; give the head unit-scale logits instead.
            model.lm_head.weight.normal_(0.0, head_std if head_std is not None else config.hidden_size**-0.5)
    params = sum(p.numel() for p in model.parameters())
    with atomic_output_dir(output, force) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    logger.info("wrote a tiny Llama-style model (%d parameters) to %s", params, output)
    return {"path": str(output), "params": params, "vocab_size": len(tok), "tokenizer": tokenizer, "config": {**TINY_SHAPE, **overrides}}


__all__ = ["BYTE_VOCAB_SIZE", "CHARACTERS", "TINY_SHAPE", "build_byte_tokenizer", "build_char_tokenizer", "build_tiny_model", "tiny_llama_config"]
