"""Loading and validating the nested adapter format (docs/design.md §2), good and bad folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from mlora_export.adapter import MatryoshkaConfig, NestedAdapter
from mlora_export.cli import main
from mlora_export.errors import InvalidAdapterError
from tests.common import build_model, random_nested


@pytest.fixture(scope="module")
def llama_nested(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("nested") / "llama"
    random_nested(build_model("llama"), d, arch="llama", r=8, train_ranks=(1, 2, 4, 8), scaling="sqrt")
    return d


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "adapter"
    shutil.copytree(src, dst)
    return dst


def _edit_json(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            data.pop(k, None)
        else:
            data[k] = v
    path.write_text(json.dumps(data))


def test_load_roundtrip(llama_nested: Path) -> None:
    ad = NestedAdapter.load(llama_nested)
    assert ad.is_nested and ad.max_rank == 8 and ad.config.train_ranks == (1, 2, 4, 8)
    assert ad.config.method == "matryoshka" and ad.config.scaling == "sqrt"
    assert len(ad.modules) == 14 and not ad.fan_in_fan_out
    q = ad.modules["model.layers.0.self_attn.q_proj"]
    assert (q.in_features, q.out_features) == (32, 32)
    assert ad.params_at(4) == 4 * sum(m.in_features + m.out_features for m in ad.modules.values())
    with ad.reader() as rd:
        a = rd.lora_A("model.layers.0.mlp.down_proj", 3)
        b = rd.lora_B("model.layers.0.mlp.down_proj", 3)
        assert a.shape == (3, 48) and b.shape == (32, 3) and b.is_contiguous()
        full = load_file(str(llama_nested / "adapter_model.safetensors"))
        ref = (1 / 3**0.5) * full["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"][:, :3] @ full[
            "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"][:3]
        torch.testing.assert_close(rd.delta("model.layers.0.mlp.down_proj", 3), ref)


def test_optional_fields_not_required(llama_nested: Path, tmp_path: Path) -> None:
    """A folder written by another tool, with only the required fields, loads."""
    d = _copy(llama_nested, tmp_path)
    _edit_json(d / "matryoshka_config.json", p=None, created_by=None, base_model=None)
    ad = NestedAdapter.load(d)
    assert ad.config.p is not None and len(ad.config.p) == 8


def test_unknown_fields_kept(llama_nested: Path, tmp_path: Path) -> None:
    d = _copy(llama_nested, tmp_path)
    _edit_json(d / "matryoshka_config.json", evaluation={"loss": [1.0]})
    ad = NestedAdapter.load(d)
    assert ad.config.to_dict()["evaluation"] == {"loss": [1.0]}


def test_plain_peft_adapter_loads_as_lora(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build_model("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(tmp_path / "plain")
    ad = NestedAdapter.load(tmp_path / "plain")
    assert not ad.is_nested and ad.config.method == "lora" and ad.max_rank == 4
    assert ad.scale(4) == pytest.approx(2.0)


# -- bad folders: each gets one clear error ------------------------------------------------------

def _break_missing_weights(d: Path) -> None:
    (d / "adapter_model.safetensors").unlink()


def _break_pickle_only(d: Path) -> None:
    (d / "adapter_model.safetensors").rename(d / "adapter_model.bin")


def _break_missing_config(d: Path) -> None:
    (d / "adapter_config.json").unlink()


def _break_bad_json(d: Path) -> None:
    (d / "matryoshka_config.json").write_text('{"format": "mlora-nested/1", ')


def _break_truncated(d: Path) -> None:
    f = d / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])


def _break_garbage(d: Path) -> None:
    (d / "adapter_model.safetensors").write_bytes(b"\x00" * 3)


def _rewrite(d: Path, fn) -> None:  # type: ignore[no-untyped-def]
    f = d / "adapter_model.safetensors"
    t = load_file(str(f))
    fn(t)
    save_file(t, str(f))


def _break_a_without_b(d: Path) -> None:
    _rewrite(d, lambda t: t.pop("base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"))


def _break_rank_mismatch(d: Path) -> None:
    def fn(t: dict) -> None:
        k = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        t[k] = t[k][:4].clone()
    _rewrite(d, fn)


def _break_b_rank(d: Path) -> None:
    def fn(t: dict) -> None:
        k = "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"
        t[k] = t[k][:, :6].clone()
    _rewrite(d, fn)


def _break_nan(d: Path) -> None:
    def fn(t: dict) -> None:
        k = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"
        t[k] = t[k].clone()
        t[k][0, 0] = float("nan")
    _rewrite(d, fn)


def _break_dora(d: Path) -> None:
    _edit_json(d / "adapter_config.json", use_dora=True)


def _break_non_lora(d: Path) -> None:
    _edit_json(d / "adapter_config.json", peft_type="IA3")


def _break_train_ranks_out(d: Path) -> None:
    _edit_json(d / "matryoshka_config.json", train_ranks=[1, 2, 16], p=None)


def _break_train_ranks_no_r(d: Path) -> None:
    _edit_json(d / "matryoshka_config.json", train_ranks=[1, 2, 4], p=None)


def _break_p(d: Path) -> None:
    _edit_json(d / "matryoshka_config.json", p=[1.0] * 8)


def _break_required(d: Path) -> None:
    _edit_json(d / "matryoshka_config.json", scaling=None)


def _break_r_disagrees(d: Path) -> None:
    _edit_json(d / "adapter_config.json", r=4)


def _break_peft_scaling(d: Path) -> None:
    _edit_json(d / "adapter_config.json", lora_alpha=16)


def _break_extra_tensor(d: Path) -> None:
    def fn(t: dict) -> None:
        t["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(32)
    _rewrite(d, fn)


BREAKAGES = {
    "missing weights": (_break_missing_weights, "no adapter_model.safetensors"),
    "pickle only": (_break_pickle_only, "pickle weights are refused"),
    "missing adapter_config": (_break_missing_config, "no adapter_config.json"),
    "bad json": (_break_bad_json, "not valid JSON"),
    "truncated safetensors": (_break_truncated, "truncated"),
    "garbage safetensors": (_break_garbage, "not a safetensors file"),
    "A without B": (_break_a_without_b, "has lora_A but no lora_B"),
    "A rank vs config": (_break_rank_mismatch, r"shape \[4, 32\] but the adapter rank is 8"),
    "B rank vs config": (_break_b_rank, r"shape \[16, 6\] but the adapter rank is 8"),
    "non-finite": (_break_nan, "NaN or infinite"),
    "dora": (_break_dora, "DoRA adapters are not supported"),
    "non-lora": (_break_non_lora, "only LoRA adapters"),
    "train ranks outside": (_break_train_ranks_out, r"outside \[1, 8\]"),
    "train ranks without r": (_break_train_ranks_no_r, "max rank 8 is not among the train ranks"),
    "p mismatch": (_break_p, "stored p does not match"),
    "missing required": (_break_required, "missing required field"),
    "r disagrees": (_break_r_disagrees, "r = 4 but matryoshka_config.json says max_rank = 8"),
    "peft scaling": (_break_peft_scaling, "PEFT's scaling"),
    "dora tensor": (_break_extra_tensor, "DoRA"),
}


@pytest.mark.parametrize("case", list(BREAKAGES))
def test_bad_adapter_rejected(case: str, llama_nested: Path, tmp_path: Path) -> None:
    breaker, message = BREAKAGES[case]
    d = _copy(llama_nested, tmp_path)
    breaker(d)
    with pytest.raises(InvalidAdapterError, match=message):
        NestedAdapter.load(d)
    # through the CLI: exit code 2, one clear line, nothing written
    out = tmp_path / "slices"
    res = CliRunner().invoke(main, ["slice", str(d), "--ranks", "2", "--output", str(out)])
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error: ") and "Traceback" not in res.output
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_missing_folder(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["inspect", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "does not exist" in res.output
    f = tmp_path / "file"
    f.write_text("x")
    res = CliRunner().invoke(main, ["inspect", str(f)])
    assert res.exit_code == 2 and "is a file" in res.output


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="alpha must be a positive"):
        MatryoshkaConfig("matryoshka", 4, (1, 4), "sqrt", -1.0)
    with pytest.raises(ValueError, match="unknown method"):
        MatryoshkaConfig("vera", 4, (4,))


def test_debug_traceback_only_when_asked(llama_nested: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = _copy(llama_nested, tmp_path)
    _break_dora(d)
    res = CliRunner().invoke(main, ["inspect", str(d)])
    assert res.exit_code == 2 and "Traceback" not in res.output
    monkeypatch.setenv("MLORA_DEBUG", "1")
    res = CliRunner().invoke(main, ["inspect", str(d)])
    assert res.exit_code == 2 and "Traceback" in res.output and "DoRA" in res.output


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), None])
def test_find_non_finite_every_dtype_and_chunk_edge(tmp_path: Path, dtype: torch.dtype, bad: float | None) -> None:
    """The finite check is exact: it finds one bad value at a chunk edge in any float dtype, and
    finite tensors whose sum overflows (the fast path's blind spot) are not flagged."""
    import mmap

    from mlora_export.io.safetensors import find_non_finite, read_header

    big = torch.finfo(dtype).max
    tensors = {
        "ok": torch.ones(3, 5, dtype=dtype),
        "huge": torch.full((4, 4), big, dtype=dtype),  # finite, but its sum overflows
        "ints": torch.full((7,), 2**31 - 1, dtype=torch.int32),  # all exponent bits set if read as float32
        "target": torch.zeros(50, dtype=dtype),
    }
    if bad is not None:
        tensors["target"][9] = bad  # the first element of a chunk (size 3), the last one (size 10)
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    header = read_header(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        for chunk in (3, 10, 1 << 22):
            assert find_non_finite(mm, header, chunk_elements=chunk) == (None if bad is None else "target")


@pytest.mark.parametrize("scaling", ["sqrt", "rank", "none"])
def test_configs_express_s_k_without_rslora_and_old_rslora_folders_still_load(tmp_path: Path, scaling: str) -> None:
    """docs/design.md §2: lora_alpha = s(k)·k, no use_rslora (llama.cpp's converter ignores it), for the
    nested adapter's own config and for native slices; a folder written with use_rslora still loads."""
    import math

    from mlora_export.adapter import peft_scaling
    from mlora_export.converters.slice import slice_adapter

    adapter = random_nested(build_model("llama"), tmp_path / "nested", arch="llama", r=8, train_ranks=(2, 8), scaling=scaling, alpha=1.5)
    cfg = json.loads((adapter.path / "adapter_config.json").read_text())
    assert "use_rslora" not in cfg and math.isclose(cfg["lora_alpha"] / cfg["r"], adapter.scale(8), rel_tol=1e-12)
    slice_adapter(adapter, [2], tmp_path / "slices", scale_mode="native")
    native = json.loads((tmp_path / "slices" / "r2" / "adapter_config.json").read_text())
    assert "use_rslora" not in native and math.isclose(native["lora_alpha"] / native["r"], adapter.scale(2), rel_tol=1e-12)
    # the old form (sqrt via use_rslora, lora_alpha = alpha) loads with the same scaling
    if scaling == "sqrt":
        old = {**cfg, "lora_alpha": 1.5, "use_rslora": True}
        (adapter.path / "adapter_config.json").write_text(json.dumps(old))
        again = NestedAdapter.load(adapter.path)
        assert math.isclose(peft_scaling(again.peft_config), adapter.scale(8), rel_tol=1e-12)


def test_a_folder_of_adapters_names_them(tmp_path: Path) -> None:
    """`inspect ./slices` (a folder of adapter folders) says which folders to pass, not only "not found"."""
    from mlora_export.converters.slice import slice_adapter

    adapter = random_nested(build_model("llama"), tmp_path / "nested", arch="llama", r=8, train_ranks=(2, 8))
    slice_adapter(adapter, [2, 8], tmp_path / "slices")
    res = CliRunner().invoke(main, ["inspect", str(tmp_path / "slices")])
    assert res.exit_code == 2
    assert "no adapter_model.safetensors here, but it holds adapter folders r2/, r8/: pass one of them" in res.stderr


def test_inspect_a_slice_shows_what_it_was_cut_from(tmp_path: Path) -> None:
    from mlora_export.converters.slice import slice_adapter

    adapter = random_nested(build_model("llama"), tmp_path / "nested", arch="llama", r=8, train_ranks=(2, 8), scaling="sqrt")
    slice_adapter(adapter, [2], tmp_path / "slices", scale_mode="native")
    res = CliRunner().invoke(main, ["inspect", str(tmp_path / "slices" / "r2")])
    assert res.exit_code == 0, res.output
    assert f"kind: PEFT slice at rank 2 (native, s(k) = 0.707107) of a matryoshka adapter, max rank 8, scaling sqrt, from {tmp_path / 'nested'}" in res.stdout
    info = json.loads(CliRunner().invoke(main, ["inspect", str(tmp_path / "slices" / "r2"), "--json"]).stdout)
    assert info["slice"]["rank"] == 2 and info["slice"]["source"]["method"] == "matryoshka" and info["slice"]["source"]["max_rank"] == 8
