"""Re-nesting: the rank-k prefix of a re-nested adapter is each module's best rank-k delta.

Sources are real PEFT LoRA adapters (``get_peft_model`` + ``save_pretrained``, random factors),
with and without ``rank_pattern``/``alpha_pattern``, rsLoRA or plain scaling, on Llama-style
(``nn.Linear``) and GPT-2-style (``Conv1D``, ``fan_in_fan_out``) pico models. The reference is
independent of the library: each module's ``ΔW = s·B·A`` in float64 (its rank and alpha found
with PEFT's own ``get_pattern_key``), truncated by a dense ``torch.linalg.svd``.

Every model here is float32 (a bfloat16 source is loaded by PEFT into a float32 model), so the
tolerances measure the adapter, not bf16 arithmetic: float32 adapters within atol 5e-6 / rtol 1e-5
of the reference logits (measured: at most 5e-7); bfloat16 adapters, whose re-nested factors are
rounded once to bfloat16 (a relative 2^-9 per element), within atol 2e-2 / rtol 2e-2 (measured: at
most 1.5e-2, logits of magnitude ~0.4). Energies match the dense SVD's ``Σσ²`` shares to 1e-10.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file, save_file

from mlora_export.adapter import NestedAdapter
from mlora_export.cli import main
from mlora_export.converters.renest import r_factor, renest_adapter, renest_factors
from mlora_export.converters.slice import slice_adapter
from mlora_export.errors import ConfigError, InvalidAdapterError, RankError
from tests.common import (
    add_deltas,
    build_model,
    poison_weights,
    random_nested,
    sample_ids,
    targets_for,
)

PATTERNS = {  # a layer-specific key and a suffix key, as PEFT matches them
    "llama": ({"layers.0.self_attn.v_proj": 4, "down_proj": 2}, {"q_proj": 5, "layers.1.mlp.up_proj": 20}),
    "gpt2": ({"h.0.attn.c_attn": 4, "c_fc": 2}, {"c_proj": 5}),
}
SLICE_RANKS = (1, 3)
R = 8

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_peft_source(
    path: Path, arch: str, *, patterns: bool = False, rslora: bool = False, dtype: torch.dtype = torch.float32, seed: int = 0, **config: object
) -> Path:
    """Save a PEFT LoRA adapter (r = 8, lora_alpha = 12) with random normal factors to ``path``."""
    rank_pattern, alpha_pattern = PATTERNS[arch] if patterns else ({}, {})
    cfg = LoraConfig(
        r=R, lora_alpha=12, target_modules=targets_for(arch), fan_in_fan_out=arch == "gpt2", use_rslora=rslora,
        rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, task_type="CAUSAL_LM", **config,
    )
    model = get_peft_model(build_model(arch), cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
                param.data = param.data.to(dtype)
    model.save_pretrained(str(path))
    return path


def source_deltas(path: Path) -> dict[str, torch.Tensor]:
    """Each module's ``ΔW = s·B·A`` (float64, ``[out, in]``) as PEFT computes it from ``path``."""
    cfg = json.loads((path / "adapter_config.json").read_text())
    tensors = load_file(str(path / "adapter_model.safetensors"))
    ranks, alphas = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    out = {}
    for key in tensors:
        if not key.endswith(".lora_A.weight"):
            continue
        name = key[len("base_model.model."): -len(".lora_A.weight")]
        r = ranks.get(get_pattern_key(ranks.keys(), name), cfg["r"])
        alpha = alphas.get(get_pattern_key(alphas.keys(), name), cfg["lora_alpha"])
        s = alpha / r**0.5 if cfg.get("use_rslora") else alpha / r
        a, b = tensors[key].double(), tensors[key.replace("lora_A", "lora_B")].double()
        assert a.shape[0] == r
        out[name] = s * (b @ a)
    return out


def truncated(deltas: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Best rank-``k`` approximation of each delta by a dense SVD (float32 for ``add_deltas``)."""
    out = {}
    for name, d in deltas.items():
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        out[name] = ((u[:, :k] * s[:k]) @ vh[:k]).float()
    return out


def dense_energy(deltas: dict[str, torch.Tensor], ranks: int) -> list[float]:
    kept = np.zeros(ranks)
    for d in deltas.values():
        c = np.cumsum(torch.linalg.svdvals(d).numpy() ** 2)
        kept += np.concatenate([c, np.full(max(0, ranks - len(c)), c[-1])])[:ranks]
    total = sum(float((d**2).sum()) for d in deltas.values())
    return list(kept / total)


def peft_logits(arch: str, adapter: Path, ids: torch.Tensor) -> torch.Tensor:
    model = PeftModel.from_pretrained(build_model(arch), str(adapter)).eval()
    with torch.no_grad():
        return model(ids).logits


def close(dtype: torch.dtype) -> dict[str, float]:
    return {"atol": 5e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("patterns", [False, True], ids=["uniform", "rank_pattern"])
@pytest.mark.parametrize("rslora", [False, True], ids=["plain", "rslora"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_rank_k_prefix_is_the_best_rank_k_delta(arch: str, patterns: bool, rslora: bool, dtype: torch.dtype, tmp_path: Path) -> None:
    src = make_peft_source(tmp_path / "src", arch, patterns=patterns, rslora=rslora, dtype=dtype)
    res = renest_adapter(src, tmp_path / "nested")
    assert (res.max_rank, res.source_rank, res.dtype) == (R, R, "BF16" if dtype == torch.bfloat16 else "F32")
    nested = NestedAdapter.load(tmp_path / "nested")
    assert nested.config.method == "svd" and nested.config.scaling == "none" and nested.config.train_ranks == tuple(range(1, R + 1))
    peft_cfg = json.loads((tmp_path / "nested" / "adapter_config.json").read_text())
    assert peft_cfg["r"] == R and peft_cfg["lora_alpha"] == R and "use_rslora" not in peft_cfg and "rank_pattern" not in peft_cfg
    deltas = source_deltas(src)
    # energies: the share of Σ‖ΔW‖² each rank keeps, as the dense SVD gives it
    np.testing.assert_allclose(nested.config.extra["energy"], dense_energy(deltas, R), rtol=1e-10, atol=1e-12)
    assert list(res.energy) == nested.config.extra["energy"]
    ids = sample_ids()
    slice_adapter(nested, list(SLICE_RANKS), tmp_path / "slices")
    for k in SLICE_RANKS:
        want = add_deltas(build_model(arch), truncated(deltas, k))(ids).logits
        torch.testing.assert_close(peft_logits(arch, tmp_path / "slices" / f"r{k}", ids), want, **close(dtype))
    # at k = r: the re-nested adapter is the source adapter, both as PEFT loads them
    torch.testing.assert_close(peft_logits(arch, tmp_path / "nested", ids), peft_logits(arch, src, ids), **close(dtype))


def _sigmas(path: Path) -> dict[str, torch.Tensor]:
    """σ_i = ‖B'[:, i]‖·‖A'[i]‖ of each module of a re-nested adapter (exact for orthogonal factors)."""
    t = load_file(str(path / "adapter_model.safetensors"))
    return {
        k[: -len(".lora_A.weight")]: t[k].double().norm(dim=1) * t[k.replace("lora_A", "lora_B")].double().norm(dim=0)
        for k in t if k.endswith("lora_A.weight")
    }


def test_sorted_zeros_beyond_true_rank_signs_and_byte_identical_reruns(tmp_path: Path) -> None:
    src = make_peft_source(tmp_path / "src", "llama", patterns=True)
    weights = src / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    low = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"  # true rank 3: columns 3… repeat 0…2
    tensors[low][:, 3:6] = tensors[low][:, :3]
    tensors[low][:, 6:] = 0
    zero = "base_model.model.model.layers.0.mlp.gate_proj.lora_B.weight"  # PEFT's own init: B = 0
    tensors[zero].zero_()
    save_file(tensors, str(weights), metadata={"format": "pt"})
    renest_adapter(src, tmp_path / "a", workers=1)
    out = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    for name, sigma in _sigmas(tmp_path / "a").items():
        assert (sigma >= 0).all() and (sigma[:-1] >= sigma[1:] * (1 - 1e-6)).all(), name
        b = out[f"{name}.lora_B.weight"]
        live = sigma > 0
        rows = b.abs().argmax(dim=0)
        assert (b[rows, torch.arange(b.shape[1])][live] > 0).all(), name  # largest-|entry| of each column positive
    low_name = low[: -len(".lora_B.weight")]
    assert torch.count_nonzero(out[f"{low_name}.lora_B.weight"][:, 3:]) == 0 and torch.count_nonzero(out[f"{low_name}.lora_A.weight"][3:]) == 0
    assert torch.count_nonzero(out[f"{low_name}.lora_B.weight"][:, :3].norm(dim=0)) == 3
    zero_name = zero[: -len(".lora_B.weight")]
    assert torch.count_nonzero(out[f"{zero_name}.lora_B.weight"]) == 0 and torch.count_nonzero(out[f"{zero_name}.lora_A.weight"]) == 0
    # rank_pattern modules of rank 4 and 2 are zero-padded to r = 8
    pad = out["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"]
    assert pad.shape[1] == R and torch.count_nonzero(pad[:, 2:]) == 0 and torch.count_nonzero(pad[:, :2].norm(dim=0)) == 2
    # re-running, with any number of threads, gives the same bytes
    renest_adapter(src, tmp_path / "b", workers=3)
    for name in ("adapter_model.safetensors", "adapter_config.json", "matryoshka_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_factors_of_a_rank_above_the_shape() -> None:
    """r > min(out, in): the components beyond min(out, in) are exact zeros, the rest the dense SVD."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((12, 7)), rng.standard_normal((5, 12))
    a_new, b_new, sigma = renest_factors(a, b, 0.5, 12)
    dense = 0.5 * b @ a
    np.testing.assert_allclose(sigma, np.linalg.svd(dense, compute_uv=False), rtol=1e-12)
    assert a_new.shape == (12, 7) and b_new.shape == (5, 12) and not a_new[5:].any() and not b_new[:, 5:].any()
    u, s, vt = np.linalg.svd(dense)
    for k in (1, 3, 5):
        np.testing.assert_allclose(b_new[:, :k] @ a_new[:k], (u[:, :k] * s[:k]) @ vt[:k], atol=1e-12)


@pytest.mark.parametrize("kappa", [1.0, 1e4, 1e9, 0.0], ids=["one-pass", "cholesky-qr2", "householder", "rank-deficient"])
def test_r_factor_and_ill_conditioned_modules(kappa: float) -> None:
    """Every path of the R factor (CholeskyQR, CholeskyQR2, Householder QR) gives the QR's R, and a
    module whose B spans singular values over ``kappa`` re-nests to the dense SVD's truncations."""
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.standard_normal((300, 8)))
    w, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    spread = np.geomspace(1.0, 1.0 / kappa, 8) if kappa else np.array([1.0, 0.5, 0.25, 0, 0, 0, 0, 0])
    b = (q * spread) @ w
    r = r_factor(b)
    assert np.allclose(np.tril(r, -1), 0) and r.shape == (8, 8)
    np.testing.assert_allclose(r.T @ r, b.T @ b, atol=1e-14)
    a = rng.standard_normal((8, 40))
    a_new, b_new, sigma = renest_factors(a, b, 2.0, 8)
    u, s, vt = np.linalg.svd(2.0 * b @ a)
    np.testing.assert_allclose(sigma, s[:8], rtol=1e-9, atol=1e-14 * s[0])
    for k in (1, 2, 3, 5, 8):
        np.testing.assert_allclose(b_new[:, :k] @ a_new[:k], (u[:, :k] * s[:k]) @ vt[:k], atol=1e-12 * s[0])
    if not kappa:
        assert not b_new[:, 3:].any() and not a_new[3:].any()


def test_max_rank_energy_and_dtype(tmp_path: Path) -> None:
    src = make_peft_source(tmp_path / "src", "gpt2")
    full = renest_adapter(src, tmp_path / "full")
    cut = renest_adapter(src, tmp_path / "cut", max_rank=3, energy=0.5, dtype="float16")
    assert cut.max_rank == 3 and cut.source_rank == R and cut.dtype == "F16" and cut.energy == full.energy[:3]
    want = next(k for k, e in enumerate(full.energy, start=1) if e >= 0.5)
    assert cut.energy_rank == want
    cfg = json.loads((tmp_path / "cut" / "matryoshka_config.json").read_text())
    assert cfg["max_rank"] == 3 and cfg["energy_rank"] == want and cfg["energy_target"] == 0.5 and len(cfg["energy"]) == 3
    assert cfg["source"]["format"] == "peft-lora" and cfg["source"]["rank"] == R
    a, b = load_file(str(tmp_path / "full" / "adapter_model.safetensors")), load_file(str(tmp_path / "cut" / "adapter_model.safetensors"))
    for key in a:  # the first 3 components, rounded once to float16
        prefix = a[key][:3] if "lora_A" in key else a[key][:, :3]
        assert b[key].dtype == torch.float16 and torch.allclose(b[key].float(), prefix, rtol=1e-3, atol=1e-3)
    assert (tmp_path / "cut" / "adapter_model.safetensors").stat().st_size < (tmp_path / "full" / "adapter_model.safetensors").stat().st_size / 4
    with pytest.raises(RankError, match=r"outside \[1, 8\]"):
        renest_adapter(src, tmp_path / "x", max_rank=9)
    with pytest.raises(ConfigError, match="energy"):
        renest_adapter(src, tmp_path / "x", energy=1.5)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("method", ["matryoshka", "lora"])
def test_our_own_nested_adapters(method: str, tmp_path: Path) -> None:
    """A nested adapter of ours re-nests from its full-rank delta, as PEFT applies it."""
    nested = random_nested(build_model("llama"), tmp_path / "nested", arch="llama", r=R, method=method, train_ranks=(2, 4, 8) if method == "matryoshka" else (8,))
    res = renest_adapter(nested.path, tmp_path / "svd")
    ids = sample_ids()
    torch.testing.assert_close(peft_logits("llama", tmp_path / "svd", ids), peft_logits("llama", nested.path, ids), atol=2e-5, rtol=1e-4)
    cfg = json.loads((tmp_path / "svd" / "matryoshka_config.json").read_text())
    assert cfg["source"]["method"] == method and cfg["source"]["format"] == "mlora-nested/1" and res.source_rank == R


def test_cli_renest_then_inspect_and_slice(tmp_path: Path) -> None:
    src = make_peft_source(tmp_path / "src", "llama", patterns=True, rslora=True)
    runner = CliRunner()
    res = runner.invoke(main, ["renest", str(src), "--output", str(tmp_path / "nested"), "--energy", "0.9", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["max_rank"] == R and len(data["energy"]) == R and data["energy_rank"] >= 1
    res = runner.invoke(main, ["inspect", str(tmp_path / "nested"), "--json"])
    info = json.loads(res.stdout)
    assert info["method"] == "svd" and [r["energy"] for r in info["ranks"]] == data["energy"]
    res = runner.invoke(main, ["inspect", str(tmp_path / "nested")])
    assert res.exit_code == 0 and "energy" in res.stdout
    res = runner.invoke(main, ["slice", str(tmp_path / "nested"), "--ranks", "4,8", "--output", str(tmp_path / "slices")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["renest", str(src), "--output", str(tmp_path / "nested")])
    assert res.exit_code == 2 and "already exists" in res.stderr


# -- bad inputs: exit 2, one line, nothing written --------------------------------------------------

def _edit_config(path: Path, **changes: object) -> None:
    cfg_path = path / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(changes)
    cfg_path.write_text(json.dumps(cfg))


def _bad_dora(src: Path, tmp: Path) -> Path:
    return make_peft_source(tmp / "bad", "llama", use_dora=True)


def _bad_lora_bias(src: Path, tmp: Path) -> Path:
    return make_peft_source(tmp / "bad", "llama", lora_bias=True)


def _bad_modules_to_save(src: Path, tmp: Path) -> Path:
    return make_peft_source(tmp / "bad", "llama", modules_to_save=["lm_head"])


def _bad_trained_bias(src: Path, tmp: Path) -> Path:
    return make_peft_source(tmp / "bad", "llama", bias="lora_only")


def _bad_pickle(src: Path, tmp: Path) -> Path:
    bad = tmp / "bad"
    shutil.copytree(src, bad)
    (bad / "adapter_model.safetensors").rename(bad / "adapter_model.bin")
    return bad


def _bad_nan(src: Path, tmp: Path) -> Path:
    bad = tmp / "bad"
    shutil.copytree(src, bad)
    poison_weights(bad / "adapter_model.safetensors", {"base_model.model.model.layers.1.mlp.up_proj.lora_A.weight": float("nan")})
    return bad


def _bad_inf_bf16(src: Path, tmp: Path) -> Path:
    bad = make_peft_source(tmp / "bad", "gpt2", dtype=torch.bfloat16)
    poison_weights(bad / "adapter_model.safetensors", {"base_model.model.transformer.h.1.mlp.c_fc.lora_B.weight": float("inf")})
    return bad


def _bad_rank_pattern(src: Path, tmp: Path) -> Path:
    bad = tmp / "bad"
    shutil.copytree(src, bad)
    _edit_config(bad, rank_pattern={"v_proj": 4})  # the file's v_proj factors have rank 8
    return bad


def _bad_shapes(src: Path, tmp: Path) -> Path:
    bad = tmp / "bad"
    shutil.copytree(src, bad)
    weights = bad / "adapter_model.safetensors"
    t = load_file(str(weights))
    key = "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"
    t[key] = t[key][:, :6].contiguous()  # B [out, 6] against A [8, in]
    save_file(t, str(weights))
    return bad


def _bad_lone_a(src: Path, tmp: Path) -> Path:
    bad = tmp / "bad"
    shutil.copytree(src, bad)
    weights = bad / "adapter_model.safetensors"
    t = load_file(str(weights))
    del t["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"]
    save_file(t, str(weights))
    return bad


def _bad_not_lora(src: Path, tmp: Path) -> Path:
    bad = tmp / "bad"
    shutil.copytree(src, bad)
    _edit_config(bad, peft_type="IA3")
    return bad


def _missing(src: Path, tmp: Path) -> Path:
    return tmp / "nowhere"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_bad_dora, "use_dora is set"),
        (_bad_lora_bias, "lora_bias is set"),
        (_bad_modules_to_save, "modules_to_save is set"),
        (_bad_trained_bias, "bias is 'lora_only'"),
        (_bad_pickle, "pickle weights are refused"),
        (_bad_nan, "layers.1.mlp.up_proj.lora_A.weight' has NaN or infinite values"),
        (_bad_inf_bf16, "h.1.mlp.c_fc.lora_B.weight' has NaN or infinite values"),
        (_bad_rank_pattern, r"has rank 8 .* gives it r = 4 \(rank_pattern\)"),
        (_bad_shapes, "whose ranks disagree"),
        (_bad_lone_a, "has lora_A but no lora_B"),
        (_bad_not_lora, "peft_type is 'IA3'"),
        (_missing, "does not exist"),
    ],
    ids=lambda v: v.__name__.strip("_") if callable(v) else "",
)
@pytest.mark.filterwarnings("ignore:`lora_bias=True` was passed", "ignore:Adapter 'default'")  # PEFT, saving the lora_bias source
def test_cli_refuses_bad_inputs(make: object, message: str, tmp_path: Path) -> None:
    import re

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    src = make_peft_source(inputs / "src", "llama")
    bad = make(src, inputs)  # type: ignore[operator]
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["renest", str(bad), "--output", str(out)])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(message, lines[0]), res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs"]  # no output, no temporary folder


def test_cli_refuses_bad_options(tmp_path: Path) -> None:
    src = make_peft_source(tmp_path / "src", "llama")
    runner = CliRunner()
    for args in (["--max-rank", "9"], ["--max-rank", "0"], ["--energy", "0"], ["--energy", "1.2"], ["--dtype", "int8"]):
        res = runner.invoke(main, ["renest", str(src), "--output", str(tmp_path / "out"), *args])
        assert res.exit_code == 2, (args, res.output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_library_errors_are_typed(tmp_path: Path) -> None:
    with pytest.raises(InvalidAdapterError, match="does not exist"):
        renest_adapter(tmp_path / "nowhere", tmp_path / "out")
    with pytest.raises(ConfigError, match="dtype"):
        renest_adapter(tmp_path / "nowhere", tmp_path / "out", dtype="int8")
