"""The ONNX export's verification (mlora_export/converters/onnx/verify.py): a float64 reference,
a tolerance set by float32 PyTorch's own distance to it, real text from the tokenizer, the greedy
token at every position.

It must never fail a correct export (the real model, SmolLM2-135M-Instruct, whose 30 layers put
float32 PyTorch itself 1e-2 away from float64 on random ids: tests/test_real_model.py) and must
still refuse a wrong graph (a wrong scale at one rank, on pico models: the graph's ``s(k)`` patched).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mlora_export.converters.onnx import export_onnx
from mlora_export.converters.onnx import genai_graph, graph
from mlora_export.converters.onnx.verify import (
    ATOL,
    FLOAT32_FACTOR,
    RTOL,
    Reference,
    as_float64,
    compare,
    reference_logits,
    text_inputs,
)
from mlora_export.errors import ExportError
from tests.common import build_model, random_nested

pytest.importorskip("onnxruntime")

TRAIN_RANKS = (1, 2, 4, 8)


# -- compare: the tolerance and the greedy token ---------------------------------------------


def _ref(logits: list[list[float]], err: float = 0.0) -> Reference:
    return Reference(np.asarray([logits], dtype=np.float64), err)


def test_tolerance_is_the_floor_plus_float32_error() -> None:
    ref = _ref([[0.0, 10.0, 1.0], [3.0, 0.0, -1.0]], err=0.01)
    want_tol = ATOL + RTOL * 10.0 + FLOAT32_FACTOR * 0.01
    ok = compare(1, ref.logits.astype(np.float32) + np.float32(0.9 * want_tol), ref)
    assert ok.ok and ok.tolerance == pytest.approx(want_tol) and ok.float32_error == 0.01
    assert (ok.argmax_equal, ok.positions, ok.argmax_wrong) == (2, 2, 0)
    bad = compare(1, ref.logits + 1.5 * want_tol, ref)
    assert not bad.ok and bad.max_abs_diff == pytest.approx(1.5 * want_tol)


def test_greedy_token_judged_outside_near_ties_only() -> None:
    # row 0: a near tie (gap 1e-5 <= 2·tol), row 1: a clear winner
    ref = _ref([[5.0, 5.00001, 0.0], [0.0, 0.0, 7.0]])
    flipped_tie = ref.logits.copy()
    flipped_tie[0, 0, 0] += 2e-5  # within tolerance, argmax changes inside the tie
    c = compare(2, flipped_tie, ref)
    assert c.ok and (c.argmax_equal, c.positions, c.argmax_wrong) == (1, 2, 0)
    # a changed winner at a clear position is counted (and, being beyond tolerance, fails)
    wrong = ref.logits.copy()
    wrong[0, 1] = [8.0, 0.0, 7.0]
    c = compare(2, wrong, ref)
    assert not c.ok and (c.argmax_equal, c.argmax_wrong) == (1, 1)
    # a huge tolerance makes every position a near tie: nothing is judged, nothing is wrong
    c = compare(2, wrong, ref, atol=10.0)
    assert c.ok and c.argmax_wrong == 0


def test_shape_mismatch_and_nan_fail() -> None:
    ref = _ref([[0.0, 1.0]])
    assert not compare(0, np.zeros((1, 2, 2)), ref).ok
    assert not compare(0, np.full((1, 1, 2), np.nan), ref).ok


def test_as_float64_restores_every_bit_and_ties() -> None:
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(cfg).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with as_float64(model) as m:
        assert all(p.dtype == torch.float64 for p in m.parameters())
        assert m.lm_head.weight is m.model.embed_tokens.weight
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_text_inputs_from_the_tokenizer_or_random(tmp_path: Path) -> None:
    from mlora_export.demo.bpe_tokenizer import build_byte_bpe_tokenizer

    tok = build_byte_bpe_tokenizer(320)
    tok.save_pretrained(tmp_path / "tok")
    feeds, source = text_inputs(tmp_path / "tok", vocab=320, batch=2, seq=16)
    assert source == "text" and feeds["input_ids"].shape == (2, 16) and feeds["attention_mask"].all()
    assert tok.decode(feeds["input_ids"][0].tolist()).startswith("The capital of France")
    # ids the model's vocabulary cannot hold, or no tokenizer: random ids
    assert text_inputs(tmp_path / "tok", vocab=100, batch=2, seq=8)[1] == "random"
    feeds, source = text_inputs(tmp_path / "none", vocab=96, batch=3, seq=5)
    assert source == "random" and feeds["input_ids"].shape == (3, 5)


def test_reference_float32_error_is_tiny_on_a_pico_model(tmp_path: Path) -> None:
    """On 2 layers float32 is within ~1e-6 of float64, so the floor (1e-4) sets the tolerance."""
    from mlora_export.adapter import NestedAdapter

    model = build_model("llama")
    nested = random_nested(model, tmp_path / "nested", arch="llama", r=8, train_ranks=TRAIN_RANKS)
    feeds = {"input_ids": np.arange(3, 19, dtype=np.int64).reshape(2, 8), "attention_mask": np.ones((2, 8), dtype=np.int64)}
    refs = reference_logits(model, "causal-lm", NestedAdapter.load(nested.path), [0, 2, 8], feeds)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # back in float32
    for k, r in refs.items():
        assert r.logits.dtype == np.float64 and r.float32_error < 1e-5, (k, r.float32_error)
    assert np.abs(refs[8].logits - refs[0].logits).max() > 0.1  # the adapter matters


# -- a wrong graph is refused ------------------------------------------------------------------


def _wrong_scale_at(rank: int, factor: float, real: object) -> object:
    def scale(k: torch.Tensor, scaling: str, alpha: float) -> torch.Tensor:
        s = real(k, scaling, alpha)  # type: ignore[operator]
        return torch.where(k == rank, s * factor, s)

    return scale


@pytest.mark.parametrize("factor", [0.5, 1.01])
def test_wrong_scale_at_one_rank_is_refused(factor: float, tmp_path: Path, base_dirs, monkeypatch: pytest.MonkeyPatch) -> None:
    """s(2) off by a factor in the dynamic graph: rank 2, and only rank 2, fails; nothing is written."""
    nested = random_nested(build_model("llama"), tmp_path / "nested", arch="llama", r=8, train_ranks=TRAIN_RANKS)
    monkeypatch.setattr(graph, "scale_tensor", _wrong_scale_at(2, factor, graph.scale_tensor))
    out = tmp_path / "out"
    with pytest.raises(ExportError) as e:
        export_onnx(nested.path, base_dirs["llama"], out)
    msg = str(e.value)
    assert "rank 2 max abs diff" in msg and not any(f"rank {k} " in msg for k in (0, 1, 4, 8)), msg
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["nested"]


def test_wrong_scale_in_the_genai_decoder_is_refused_on_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The decoder with a KV cache, verified on text from its byte-level BPE tokenizer: a 1 % wrong s(4) fails."""
    import transformers as tf

    from mlora_export.demo.bpe_tokenizer import build_byte_bpe_tokenizer

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = tf.LlamaForCausalLM(cfg).eval()
    base = tmp_path / "base"
    model.save_pretrained(base)
    build_byte_bpe_tokenizer(320).save_pretrained(base)
    nested = random_nested(model, tmp_path / "nested", arch="llama", r=8, train_ranks=TRAIN_RANKS, std=0.2)
    monkeypatch.setattr(genai_graph, "scale_tensor", _wrong_scale_at(4, 1.01, genai_graph.scale_tensor))
    with pytest.raises(ExportError) as e:
        export_onnx(nested.path, base, tmp_path / "out", genai=True)
    assert "rank 4 max abs diff" in str(e.value) and "rank 2 " not in str(e.value), str(e.value)
    assert not (tmp_path / "out").exists()
