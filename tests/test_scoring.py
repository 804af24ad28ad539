"""Scores checked against hand-computed values of a model whose behaviour the test fixes.

The model is a one-layer Llama built from a config whose attention and MLP write nothing (their
output projections are zero), so each position's logits depend on its own token only: an
embedding that is one-hot and an output head that puts weight 1 on one chosen successor make it
a bigram model, ``next(c)`` below, with logits known in closed form. Exact match, token
accuracy and loss are then worked out by hand (and by a few lines of plain Python for the loss),
never with the library's own generation or scoring.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mlora_export.base import load_base_model, load_tokenizer
from mlora_export.evaluation import exact_match, load_eval_data, score_model

HIDDEN = 128  # ≥ the character vocabulary (104), so the embedding can be one-hot
EPS = 1e-6
#: The bigram the model implements: "=" → "a" → "b" → "c", everything else → EOS.
SUCCESSOR = {"=": "a", "a": "b", "b": "c"}

#: (prompt, completion, greedy completion matches after strip(), completion tokens + EOS predicted right)
CASES = [
    ("q=", "abc", True, 4),  # a, b, c, EOS: all predicted
    ("r=", "abd", False, 3),  # a, b right; d wrong (c predicted); EOS after d right
    ("s=", "ab", True, 2),  # the budget is the completion's 2 tokens: "ab" matches; EOS after b wrong (c)
    ("t=", "xyz", False, 1),  # x, y, z wrong; EOS after z right
]


@pytest.fixture(scope="module")
def bigram(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import LlamaForCausalLM

    from mlora_export.demo.tiny import build_char_tokenizer, tiny_llama_config

    tok = build_char_tokenizer()
    cfg = tiny_llama_config(len(tok), hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=EPS)
    model = LlamaForCausalLM(cfg)
    succ = {tok.convert_tokens_to_ids(a): tok.convert_tokens_to_ids(b) for a, b in SUCCESSOR.items()}
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for norm in (model.model.norm, model.model.layers[0].input_layernorm, model.model.layers[0].post_attention_layernorm):
            norm.weight.fill_(1.0)
        model.model.embed_tokens.weight[:, : len(tok)] = torch.eye(len(tok))
        for i in range(len(tok)):
            model.lm_head.weight[succ.get(i, tok.eos_token_id), i] = 1.0
    root = tmp_path_factory.mktemp("bigram")
    model.save_pretrained(root / "base", safe_serialization=True)
    tok.save_pretrained(root / "base")
    with open(root / "data.jsonl", "w", encoding="utf-8") as f:
        for prompt, completion, _, _ in CASES:
            f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
    return root


def test_the_data_are_the_tokens_the_cases_assume(bigram: Path) -> None:
    tok = load_tokenizer(bigram / "base")
    data = load_eval_data(bigram / "data.jsonl", tok)
    for (prompt, completion, _, _), ex in zip(CASES, data.examples):
        expected = [tok.bos_token_id, *tok.convert_tokens_to_ids(list(prompt + completion)), tok.eos_token_id]
        assert list(ex.input_ids) == expected
        assert ex.first_target == 1 + len(prompt) and ex.completion_tokens == len(completion)


def test_exact_match_and_token_accuracy_equal_the_hand_computed_values(bigram: Path) -> None:
    tok = load_tokenizer(bigram / "base")
    data = load_eval_data(bigram / "data.jsonl", tok)
    model = load_base_model(bigram / "base", device="cpu")
    for batch_size in (1, 3):  # padding and batching do not change a score
        s = score_model(model, tok, data, metric="exact-match", batch_size=batch_size)
        assert s.exact_match == pytest.approx(sum(c[2] for c in CASES) / len(CASES))  # 2 of 4
        assert s.target_tokens == sum(len(c[1]) + 1 for c in CASES)  # completion tokens and EOS: 15
        assert s.token_accuracy == pytest.approx(sum(c[3] for c in CASES) / s.target_tokens)  # 10 of 15
        assert s.score == s.exact_match
        assert exact_match(model, tok, data, batch_size=batch_size) == s.exact_match  # the same without the teacher-forced pass


def test_loss_equals_the_closed_form(bigram: Path) -> None:
    """Every scored position has logit ``g = 1/sqrt(1/H + eps)`` on its predicted token and 0 on the
    other V-1: the loss of a hit is ``log(1 + (V-1)e^-g)``, of a miss ``log(e^g + V - 1)``."""
    tok = load_tokenizer(bigram / "base")
    data = load_eval_data(bigram / "data.jsonl", tok)
    model = load_base_model(bigram / "base", device="cpu")
    g, v = 1.0 / math.sqrt(1.0 / HIDDEN + EPS), len(tok)
    hits = sum(c[3] for c in CASES)
    n = sum(len(c[1]) + 1 for c in CASES)
    expected = (hits * math.log1p((v - 1) * math.exp(-g)) + (n - hits) * math.log(math.exp(g) + v - 1)) / n
    s = score_model(model, tok, data, metric="loss", batch_size=2)
    assert s.loss == pytest.approx(expected, rel=1e-5)
    assert s.score == s.loss and s.perplexity == pytest.approx(math.exp(expected), rel=1e-5)
