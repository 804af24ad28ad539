"""Streaming merge (issue 3): merged weights and logits against real PEFT, layout preservation,
prefix resolution, every bad input through the CLI, and injected failures that leave nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from mlora_export.cli import main as cli
from mlora_export.converters import merge as merge_mod
from mlora_export.converters.merge import merge_adapter, resolve_weight_keys
from mlora_export.converters.slice import slice_adapter
from mlora_export.errors import BaseModelMismatchError, OutputExistsError, RankError
from mlora_export.io.safetensors import read_header, save_tensors
from tests.common import build_model, random_nested, sample_ids, tiny_config

RANKS = (2, 8)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Pico bases (llama/gpt2 × float32/bfloat16 × single file/many shards), one nested adapter
    per architecture, and its PEFT slices at RANKS."""
    root = tmp_path_factory.mktemp("merge")
    out: dict[str, Path] = {}
    for arch in ("llama", "gpt2"):
        for dname, dt in DTYPES.items():
            model = build_model(arch, dt)
            single = root / f"base-{arch}-{dname}-single"
            model.save_pretrained(single)
            sharded = root / f"base-{arch}-{dname}-sharded"
            model.save_pretrained(sharded, max_shard_size="20KB")
            out[f"{arch}-{dname}-single"] = single
            out[f"{arch}-{dname}-sharded"] = sharded
        random_nested(build_model(arch), root / f"nested-{arch}", arch=arch)
        out[f"nested-{arch}"] = root / f"nested-{arch}"
        slice_adapter(root / f"nested-{arch}", RANKS, root / f"slices-{arch}")
        out[f"slices-{arch}"] = root / f"slices-{arch}"
    return out


def _load(path: Path, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def _peft_logits(base: Path, slice_dir: Path, dtype: torch.dtype) -> torch.Tensor:
    from peft import PeftModel

    model = PeftModel.from_pretrained(_load(base, dtype), slice_dir).eval()
    with torch.no_grad():
        return model(sample_ids()).logits


def _state(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _expected_weights(base: Path, nested: Path, k: int, fan_in_fan_out: bool, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """docs/design.md §1 by hand from the raw files: W + s(k)·B[:, :k]·A[:k] in float32, rounded once."""
    from mlora_export.adapter import NestedAdapter

    adapter = NestedAdapter.load(nested)
    factors = load_file(str(nested / "adapter_model.safetensors"))
    state = _state(base)
    s = adapter.scale(k)
    out = {}
    for name in adapter.modules:
        w = state[f"{name}.weight"]
        a = factors[f"base_model.model.{name}.lora_A.weight"][:k].float()
        b = factors[f"base_model.model.{name}.lora_B.weight"][:, :k].float()
        delta = s * (b @ a)
        if fan_in_fan_out:
            delta = delta.T
        out[f"{name}.weight"] = (w.float() + delta).to(dtype or w.dtype)
    return out


# -- correctness against real PEFT ---------------------------------------------------------


@pytest.mark.parametrize("layout", ["single", "sharded"])
@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merged_logits_match_peft(work: dict[str, Path], tmp_path: Path, arch: str, dname: str, layout: str) -> None:
    dt = DTYPES[dname]
    base = work[f"{arch}-{dname}-{layout}"]
    for k in RANKS:
        out = tmp_path / f"merged-r{k}"
        res = merge_adapter(work[f"nested-{arch}"], base, k, out)
        expected = _expected_weights(base, work[f"nested-{arch}"], k, arch == "gpt2")
        assert res.rank == k and res.merged_tensors == len(expected)
        merged = _load(out, dt)  # plain transformers, no code of ours
        with torch.no_grad():
            got = merged(sample_ids()).logits
        ref = _peft_logits(base, work[f"slices-{arch}"] / f"r{k}", dt)
        tol = {} if dt == torch.float32 else {"atol": 3e-2, "rtol": 3e-2}
        torch.testing.assert_close(got.float(), ref.float(), **tol)
        # the weights themselves: the one-rounding reference, up to float32 rounding of the sum
        # (which can move a bfloat16 result by one unit in the last place, 2**-7 relative)
        state = _state(out)
        wtol = {"rtol": 1e-6, "atol": 1e-6} if dt == torch.float32 else {"rtol": 2**-7, "atol": 1e-6}
        for key, want in expected.items():
            assert state[key].dtype == want.dtype
            torch.testing.assert_close(state[key], want, **wtol)


def test_merge_from_plain_peft_slice(work: dict[str, Path], tmp_path: Path) -> None:
    """A slice folder (plain PEFT LoRA) is a valid input and gives the nested merge at its rank."""
    base = work["llama-float32-sharded"]
    merge_adapter(work["slices-llama"] / "r8", base, 8, tmp_path / "from-slice")
    merge_adapter(work["nested-llama"], base, 8, tmp_path / "from-nested")
    a, b = _state(tmp_path / "from-slice"), _state(tmp_path / "from-nested")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key])


# -- layout: shard names, index, tensor order, untouched bytes ----------------------------


def test_layout_and_untouched_bytes_preserved(work: dict[str, Path], tmp_path: Path) -> None:
    base = tmp_path / "base"
    shutil.copytree(work["gpt2-bfloat16-sharded"], base)
    (base / "tokenizer.json").write_text('{"version": "1.0"}')
    (base / "special_tokens_map.json").write_text("{}")
    (base / "pytorch_model.bin").write_bytes(b"not a pickle")  # never copied: un-merged weights
    (base / "original").mkdir()
    (base / "original" / "consolidated.00.pth").write_bytes(b"x")
    out = tmp_path / "merged"
    progress: list[tuple[int, int]] = []
    threads = torch.get_num_threads()
    res = merge_adapter(work["nested-gpt2"], base, 8, out, progress=lambda d, t: progress.append((d, t)))
    assert torch.get_num_threads() == threads  # restored after the merge
    base_files = sorted(p.name for p in base.iterdir() if p.is_file() and p.suffix != ".bin")
    assert sorted(p.name for p in out.iterdir()) == base_files
    assert set(res.skipped_files) >= {"pytorch_model.bin", "original/"}
    shards = sorted(p.name for p in base.glob("*.safetensors"))
    assert len(shards) > 3 and res.shards and sorted(res.shards) == shards
    for name in ("model.safetensors.index.json", "config.json", "generation_config.json", "tokenizer.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    targets = {f"{m}.weight" for m in ("transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc",
                                       "transformer.h.0.mlp.c_proj", "transformer.h.1.attn.c_attn", "transformer.h.1.attn.c_proj",
                                       "transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj")}
    seen_targets = 0
    for shard in shards:
        hb, ho = read_header(base / shard), read_header(out / shard)
        assert list(hb.tensors) == list(ho.tensors), shard  # same tensors, same order
        assert hb.metadata == ho.metadata
        rb, ro = (base / shard).read_bytes(), (out / shard).read_bytes()
        for name, ib in hb.tensors.items():
            io = ho.tensors[name]
            assert (ib.dtype, ib.shape, ib.nbytes) == (io.dtype, io.shape, io.nbytes)
            bytes_b = rb[hb.data_start + ib.begin : hb.data_start + ib.end]
            bytes_o = ro[ho.data_start + io.begin : ho.data_start + io.end]
            if name in targets:
                seen_targets += 1
                assert bytes_b != bytes_o, name
            else:
                assert bytes_b == bytes_o, name
    assert seen_targets == len(targets) == res.merged_tensors
    dones = [d for d, _ in progress]
    assert dones == sorted(dones) and progress[-1][0] == progress[-1][1] == sum(
        read_header(base / s).tensors[n].nbytes for s in shards for n in read_header(base / s).tensors
    )


def test_dtype_casts_whole_output(work: dict[str, Path], tmp_path: Path) -> None:
    base = work["llama-float32-sharded"]
    out = tmp_path / "merged-bf16"
    merge_adapter(work["nested-llama"], base, 8, out, dtype="bfloat16")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16"
    state, base_state = _state(out), _state(base)
    assert all(t.dtype == torch.bfloat16 for t in state.values())
    expected = _expected_weights(base, work["nested-llama"], 8, False, torch.bfloat16)
    for key, t in state.items():
        if key in expected:  # one rounding of the float32 sum (to one bfloat16 ulp, see above)
            torch.testing.assert_close(t, expected[key], rtol=2**-7, atol=1e-6)
        else:
            assert torch.equal(t, base_state[key].to(torch.bfloat16)), key
    index = json.loads((out / "model.safetensors.index.json").read_text())
    base_index = json.loads((base / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == base_index["weight_map"]
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in state.values()) == base_index["metadata"]["total_size"] // 2
    merged = _load(out, torch.bfloat16)
    ref = _peft_logits(base, work["slices-llama"] / "r8", torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(merged(sample_ids()).logits.float(), ref.float(), atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("kernel", ["c", "numpy"])
@pytest.mark.parametrize("src, dtype", [("bfloat16", "float32"), ("bfloat16", "float16"), ("float16", "bfloat16"), ("float32", "float16")])
def test_dtype_casts_between_every_float_dtype(
    work: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, src: str, dtype: str, kernel: str
) -> None:
    """The compiled kernel, and where it is not built numpy's (bfloat16 ↔ float32) and torch's
    (float16), cast alike: merged weights are the one-rounding reference, untouched tensors exactly
    torch's cast of the base's."""
    if kernel not in merge_mod.mk.KERNELS:
        pytest.skip("the compiled kernel is not built")
    if kernel == "numpy":
        monkeypatch.setattr(merge_mod.mk, "KERNELS", ("numpy",))
    base = work[f"llama-{src}-sharded"]
    out = tmp_path / "merged"
    merge_adapter(work["nested-llama"], base, 8, out, dtype=dtype)
    dt = DTYPES[dtype]
    state, base_state = _state(out), _state(base)
    expected = _expected_weights(base, work["nested-llama"], 8, False, dt)
    for key, t in state.items():
        assert t.dtype == dt, key
        if key in expected:
            torch.testing.assert_close(t, expected[key], rtol=2**-7, atol=1e-6)
        else:
            assert torch.equal(t, base_state[key].to(dt)), key


@pytest.mark.parametrize("dname, cast", [("bfloat16", "float32"), ("float32", "bfloat16"), ("float16", "bfloat16"), ("bfloat16", "float16")])
def test_merge_without_torch(work: dict[str, Path], tmp_path: Path, dname: str, cast: str) -> None:
    """A bfloat16, float16 or float32 base is merged (and cast between them) without importing
    torch or transformers: their import would cost more than a small-rank merge. A fresh process,
    through the CLI."""
    import subprocess
    import sys

    out = tmp_path / "merged"
    code = (
        "import sys\n"
        "from mlora_export.cli import main\n"
        "try:\n"
        f"    main([{str(work['nested-llama'])!r}, '--base-model', {str(work[f'llama-{dname}-sharded'])!r}, '--rank', '8',"
        f" '--output', {str(out)!r}, '--dtype', {cast!r}], prog_name='mlora-export', standalone_mode=False)\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code.replace("main([", "main(['merge', ")], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout
    assert (out / "model.safetensors.index.json").exists()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fallback_kernels_merge_alike(work: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, arch: str) -> None:
    """Where the compiled kernel is not built (no C compiler at install), numpy merges bfloat16 and
    float32 bases and torch float16 ones: the same one-rounding weights as the compiled kernel's,
    for ``nn.Linear`` and ``Conv1D`` targets."""
    monkeypatch.setattr(merge_mod.mk, "KERNELS", ("numpy",))
    for dname, dt in DTYPES.items():
        base = work[f"{arch}-{dname}-sharded"]
        out = tmp_path / f"merged-{dname}"
        merge_adapter(work[f"nested-{arch}"], base, 8, out)
        state = _state(out)
        wtol = {"rtol": 1e-6, "atol": 1e-6} if dt == torch.float32 else {"rtol": 2**-7, "atol": 1e-6}
        for key, want in _expected_weights(base, work[f"nested-{arch}"], 8, arch == "gpt2").items():
            assert state[key].dtype == dt
            torch.testing.assert_close(state[key], want, **wtol)


# -- module name ↔ weight key resolution --------------------------------------------------


def test_resolve_weight_keys_rules() -> None:
    mods = ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    exact = {f"{m}.weight" for m in mods} | {"transformer.wte.weight"}
    assert resolve_weight_keys(mods, exact)[1:] == ("", "")
    hub_gpt2 = {"h.0.attn.c_attn.weight", "h.1.attn.c_attn.weight", "wte.weight"}  # openai-community/gpt2 layout
    mapping, strip, add = resolve_weight_keys(mods, hub_gpt2)
    assert (strip, add) == ("transformer.", "") and mapping[mods[1]] == "h.1.attn.c_attn.weight"
    bare = ["layers.0.self_attn.q_proj", "layers.1.self_attn.q_proj"]  # adapter trained on a bare LlamaModel
    mapping, strip, add = resolve_weight_keys(bare, {"model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"})
    assert (strip, add) == ("", "model.") and mapping[bare[0]] == "model.layers.0.self_attn.q_proj.weight"
    with pytest.raises(BaseModelMismatchError, match=r"'transformer.h.1.attn.c_attn'.*1 of 2 targets missing"):
        resolve_weight_keys(mods, {"transformer.h.0.attn.c_attn.weight"})
    with pytest.raises(BaseModelMismatchError, match="more than one way"):
        resolve_weight_keys(["x.q"], {"a.q.weight", "b.q.weight"})


def test_merge_into_checkpoint_without_model_prefix(work: dict[str, Path], tmp_path: Path) -> None:
    """A GPT-2 checkpoint stored as the Hub's gpt2 is (``h.0…``, no ``transformer.``) merges and loads."""
    src = work["gpt2-float32-single"]
    base = tmp_path / "gpt2-hub-layout"
    base.mkdir()
    shutil.copy(src / "config.json", base / "config.json")
    save_tensors(base / "model.safetensors", {k.removeprefix("transformer."): v for k, v in load_file(str(src / "model.safetensors")).items()}, {"format": "pt"})
    res = merge_adapter(work["nested-gpt2"], base, 8, tmp_path / "merged")
    assert res.key_prefix == {"strip": "transformer.", "add": ""}
    assert "h.0.attn.c_attn.weight" in read_header(tmp_path / "merged" / "model.safetensors").tensors
    with torch.no_grad():
        got = _load(tmp_path / "merged", torch.float32)(sample_ids()).logits
    torch.testing.assert_close(got, _peft_logits(src, work["slices-gpt2"] / "r8", torch.float32))


# -- bad inputs through the CLI: exit 2, a clear message, nothing written ------------------


def _no_output(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "temporary sibling left behind"


def _run(*args: str) -> tuple[int, str, str]:
    res = CliRunner().invoke(cli, ["merge", *args])
    return res.exit_code, res.stdout, res.stderr


@pytest.fixture(scope="module")
def bad_bases(work: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad-bases")
    pickle_only = root / "pickle-only"
    pickle_only.mkdir()
    shutil.copy(work["llama-float32-single"] / "config.json", pickle_only / "config.json")
    (pickle_only / "pytorch_model.bin").write_bytes(b"\x80\x04 would run code if unpickled")
    empty = root / "empty"
    empty.mkdir()
    shutil.copy(work["llama-float32-single"] / "config.json", empty / "config.json")
    truncated = root / "truncated"
    shutil.copytree(work["llama-float32-single"], truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    missing_shard = root / "missing-shard"
    shutil.copytree(work["llama-float32-sharded"], missing_shard)
    sorted(missing_shard.glob("model-*.safetensors"))[-1].unlink()
    import transformers as tf

    cfg = tiny_config("llama")
    cfg.intermediate_size = 64
    torch.manual_seed(0)
    other_shape = root / "other-shape"
    tf.LlamaForCausalLM(cfg).save_pretrained(other_shape)
    return {"pickle": pickle_only, "empty": empty, "truncated": truncated, "missing": missing_shard, "shape": other_shape}


@pytest.mark.parametrize(
    "case, expected",
    [
        ("rank-too-big", "outside [1, 8]"),
        ("rank-zero", "outside [1, 8]"),
        ("no-base", "does not exist"),
        ("pickle", "pickle weights are refused"),
        ("empty", "no model.safetensors"),
        ("truncated", "re-download"),
        ("missing", "missing from"),
        ("wrong-arch", "has no weight 'model.layers.0.self_attn.q_proj.weight'"),
        ("shape", "expects base weight 'model.layers.0.mlp.gate_proj.weight' of shape [48, 32]"),
        ("bad-adapter", "does not exist"),
        ("output-under-file", "is a file, not a folder"),
    ],
)
def test_cli_bad_inputs(work: dict[str, Path], bad_bases: dict[str, Path], tmp_path: Path, case: str, expected: str) -> None:
    nested, base, rank = work["nested-llama"], work["llama-float32-single"], "8"
    if case == "rank-too-big":
        rank = "9"
    elif case == "rank-zero":
        rank = "0"
    elif case == "no-base":
        base = tmp_path / "nope"
    elif case == "wrong-arch":
        base = work["gpt2-float32-single"]
    elif case == "bad-adapter":
        nested = tmp_path / "no-adapter"
    elif case in bad_bases:
        base = bad_bases[case]
    out = tmp_path / "out"
    if case == "output-under-file":
        (tmp_path / "afile").write_text("x")
        out = tmp_path / "afile" / "out"
    before = sorted(p.name for p in tmp_path.iterdir())
    code, stdout, stderr = _run(str(nested), "--base-model", str(base), "--rank", rank, "--output", str(out))
    assert code == 2, (stdout, stderr)
    assert stderr.startswith("error: ") and expected in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no temporary sibling
    if case == "output-under-file":
        return
    if case == "pickle":
        assert "save_pretrained" in stderr
    if case == "shape":
        assert "[64, 32]" in stderr
    _no_output(out)


def test_cli_output_rules(work: dict[str, Path], tmp_path: Path) -> None:
    nested, base = str(work["nested-llama"]), work["llama-float32-single"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, stderr = _run(nested, "--base-model", str(base), "--rank", "8", "--output", str(out))
    assert code == 2 and "--force" in stderr and (out / "keep.txt").exists()
    # --force never replaces the base model or the adapter themselves
    copy = tmp_path / "base-copy"
    shutil.copytree(base, copy)
    code, _, stderr = _run(nested, "--base-model", str(copy), "--rank", "8", "--output", str(copy), "--force")
    assert code == 2 and "is the input" in stderr and "(--base-model)" in stderr
    assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in base.iterdir())
    code, _, stderr = _run(nested, "--base-model", str(base), "--rank", "8", "--output", str(out), "--dtype", "float8")
    assert code == 2 and "float8" in stderr
    code, stdout, stderr = _run(nested, "--base-model", str(base), "--rank", "8", "--output", str(out), "--force", "--json")
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["rank"] == 8 and summary["shards"] == ["model.safetensors"] and summary["merged_tensors"] == 14
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_cli_help_has_example() -> None:
    res = CliRunner().invoke(cli, ["merge", "--help"])
    assert res.exit_code == 0 and "mlora-export merge ./nested --base-model" in res.stdout


def test_cli_unwritable_output(work: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only output folder, and a location where the temporary sibling cannot be created: exit 2, nothing left."""
    import os

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    real_access = os.access
    # root ignores folder permissions: make the check see what a normal user would
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == ro and mode & os.W_OK else real_access(p, mode, **kw))
    try:
        args = (str(work["nested-llama"]), "--base-model", str(work["llama-float32-single"]), "--rank", "8")
        code, _, stderr = _run(*args, "--output", str(ro / "out"))
        assert code == 2 and "not writable" in stderr and str(ro) in stderr, stderr
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)

    real_mkdir = os.mkdir

    def refuse(path: object, *args: object, **kwargs: object) -> None:
        if ".tmp-" in str(path):
            raise PermissionError(13, "Permission denied", str(path))
        real_mkdir(path, *args, **kwargs)

    import mlora_export.fs as fs_mod

    monkeypatch.setattr(fs_mod.os, "mkdir", refuse)  # the temporary sibling cannot be created
    code, _, stderr = _run(*args, "--output", str(tmp_path / "out"))
    assert code == 2 and "cannot create output" in stderr and "Permission denied" in stderr, stderr
    _no_output(tmp_path / "out")


def test_cli_insufficient_disk(work: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import collections

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    out = tmp_path / "out"
    code, _, stderr = _run(str(work["nested-llama"]), "--base-model", str(work["llama-float32-single"]), "--rank", "8", "--output", str(out))
    assert code == 2 and "not enough free disk" in stderr
    _no_output(out)


def test_library_errors_are_typed(work: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(RankError):
        merge_adapter(work["nested-llama"], work["llama-float32-single"], 9, tmp_path / "o")
    with pytest.raises(OutputExistsError):
        merge_adapter(work["nested-llama"], work["llama-float32-single"], 8, work["nested-llama"], force=True)
    _no_output(tmp_path / "o")


# -- failures in the middle of the merge leave nothing -----------------------------------


@pytest.mark.parametrize("exc", [OSError("disk on fire"), KeyboardInterrupt()])
def test_failure_mid_merge_leaves_no_output(work: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
    """Fault injection: the low-level shard writer fails after the first shard was written."""
    real = merge_mod.write_safetensors
    calls = []

    def flaky(*args: object, **kwargs: object) -> int:
        calls.append(args[0])
        if len(calls) == 2:
            raise exc
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(merge_mod, "write_safetensors", flaky)
    out = tmp_path / "out"
    with pytest.raises(type(exc)):
        merge_adapter(work["nested-llama"], work["llama-float32-sharded"], 8, out)
    assert len(calls) == 2
    _no_output(out)
    # through the CLI: an unexpected error is exit 1, still nothing written
    if isinstance(exc, OSError):
        calls.clear()
        code, _, stderr = _run(str(work["nested-llama"]), "--base-model", str(work["llama-float32-sharded"]), "--rank", "8", "--output", str(out))
        assert code == 1 and "disk on fire" in stderr
        _no_output(out)


@pytest.mark.parametrize("read", ["map", "pread"])
def test_failure_inside_a_worker_leaves_no_output(work: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, read: str) -> None:
    """Fault injection: a read in a worker thread fails mid-shard; the error surfaces, nothing is left.

    Both ways the base is read: mapped (the compiled and numpy kernels) and ``pread`` (torch: float64
    bases, or float16 where the compiled kernel is not built, as here)."""
    count = [0]
    if read == "pread":
        monkeypatch.setattr(merge_mod.mk, "KERNELS", ("numpy",))
        base = work["llama-float16-sharded"]
        real = merge_mod.os.preadv

        def flaky(fd: int, buffers: list, offset: int) -> int:  # type: ignore[type-arg]
            count[0] += 1
            if count[0] == 12:
                raise OSError("read error")
            return real(fd, buffers, offset)

        monkeypatch.setattr(merge_mod.os, "preadv", flaky)
    else:
        base = work["llama-float32-sharded"]

        class FlakyRegion(merge_mod.MappedRegion):
            def __init__(self, fd: int, nbytes: int, offset: int) -> None:
                count[0] += 1
                if count[0] == 12:
                    raise OSError("read error")
                super().__init__(fd, nbytes, offset)

        monkeypatch.setattr(merge_mod, "MappedRegion", FlakyRegion)
    out = tmp_path / "out"
    threads = torch.get_num_threads()
    with pytest.raises(OSError, match="read error"):
        merge_adapter(work["nested-llama"], base, 8, out)
    _no_output(out)
    assert torch.get_num_threads() == threads  # the one-thread setting of the merge is undone on failure too


# -- the demo stage ------------------------------------------------------------------------


def test_demo_stage(work: dict[str, Path], tmp_path: Path) -> None:
    from mlora_export.demo import STAGES, DemoContext

    ctx = DemoContext(output=tmp_path / "final", root=tmp_path / "root", slice_ranks=RANKS)
    ctx.root.mkdir()
    shutil.copytree(work["llama-float32-single"], ctx.base_dir)
    shutil.copytree(work["nested-llama"], ctx.nested_dir)
    shutil.copytree(work["slices-llama"], ctx.slices_dir)
    stage = next(s for s in STAGES if s.name == "merge")
    report = stage.resolve()(ctx)
    assert (ctx.root / "merged-r8" / "model.safetensors").exists()
    assert report.data["rank"] == 8 and report.data["max_abs_logit_diff_vs_peft"] < 1e-4
    assert "merged-r8" in report.lines[0]
