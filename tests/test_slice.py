"""The exactness contract of slicing: a slice loaded by real PEFT equals ΔW_k applied by hand.

Tolerances: float32 logits within atol 2e-5 / rtol 1e-4 of the float32 reference; bfloat16 slices
are checked bit-for-bit on their tensors (A prefix exact, baked B = bf16(float32(s(k)·B))) and
their logits within atol 3e-2 / rtol 3e-2 of a float32 reference, the error of bf16 arithmetic.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from peft import PeftModel
from safetensors.torch import load_file

from mlora_export.adapter import NestedAdapter
from mlora_export.cli import main
from mlora_export.converters.slice import slice_adapter
from tests.common import (
    apply_delta_by_hand,
    build_model,
    poison_weights,
    random_nested,
    sample_ids,
)

RANKS = [1, 3, 8]


def _reference_logits(arch: str, dtype: torch.dtype, adapter: NestedAdapter, k: int, ids: torch.Tensor) -> torch.Tensor:
    """Base weights (as stored in ``dtype``) upcast to float32, plus ΔW_k in float32."""
    base32 = build_model(arch, dtype).to(torch.float32)
    return apply_delta_by_hand(base32, adapter, k)(ids).logits


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("scaling", ["none", "rank", "sqrt"])
@pytest.mark.parametrize("scale_mode", ["baked", "native"])
def test_slice_matches_definition(arch: str, dtype: torch.dtype, scaling: str, scale_mode: str, tmp_path: Path) -> None:
    base = build_model(arch, dtype)
    nested = random_nested(base, tmp_path / "nested", arch=arch, r=8, scaling=scaling, alpha=2.0, dtype=dtype)
    results = slice_adapter(nested, RANKS, tmp_path / "slices", scale_mode=scale_mode)
    assert [r.rank for r in results] == RANKS
    src = load_file(str(nested.weights_path))
    ids = sample_ids()
    for k in RANKS:
        folder = tmp_path / "slices" / f"r{k}"
        cfg = json.loads((folder / "adapter_config.json").read_text())
        assert cfg["r"] == k
        if scale_mode == "baked":
            assert cfg["lora_alpha"] == k and "use_rslora" not in cfg
        assert "rank_pattern" not in cfg and "alpha_pattern" not in cfg
        assert json.loads((folder / "matryoshka_config.json").read_text())["rank"] == k
        # tensors: exact prefix of A; B prefix, baked = one rounding of s(k)·B in float32
        out = load_file(str(folder / "adapter_model.safetensors"))
        s = nested.scale(k)
        for name in nested.modules:
            ka, kb = f"base_model.model.{name}.lora_A.weight", f"base_model.model.{name}.lora_B.weight"
            assert out[ka].dtype == dtype and out[ka].is_contiguous()
            assert torch.equal(out[ka], src[ka][:k])
            want_b = src[kb][:, :k]
            if scale_mode == "baked":
                want_b = (want_b.float() * s).to(dtype)
            assert torch.equal(out[kb], want_b)
        # logits through real PEFT
        peft_model = PeftModel.from_pretrained(build_model(arch, dtype), str(folder)).eval()
        with torch.no_grad():
            got = peft_model(ids).logits.float()
            ref = _reference_logits(arch, dtype, nested, k, ids)
        if dtype == torch.float32:
            torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
        else:
            torch.testing.assert_close(got, ref, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=["f16", "f64"])
@pytest.mark.parametrize("scale_mode", ["baked", "native"])
def test_slice_tensors_other_float_dtypes(dtype: torch.dtype, scale_mode: str, tmp_path: Path) -> None:
    """float16 and float64 adapters: exact prefixes, and baked B rounded once from float32 (float64 kept)."""
    nested = random_nested(build_model("llama"), tmp_path / "nested", arch="llama", r=8, scaling="sqrt", dtype=dtype)
    slice_adapter(nested, RANKS, tmp_path / "slices", scale_mode=scale_mode)
    src = load_file(str(nested.weights_path))
    for k in RANKS:
        out = load_file(str(tmp_path / "slices" / f"r{k}" / "adapter_model.safetensors"))
        for name in nested.modules:
            ka, kb = f"base_model.model.{name}.lora_A.weight", f"base_model.model.{name}.lora_B.weight"
            assert torch.equal(out[ka], src[ka][:k])
            want_b = src[kb][:, :k]
            if scale_mode == "baked":
                work = torch.float64 if dtype == torch.float64 else torch.float32
                want_b = (want_b.to(work) * nested.scale(k)).to(dtype)
            assert out[kb].dtype == dtype and torch.equal(out[kb], want_b)


def test_nested_folder_is_a_peft_adapter_at_full_rank(tmp_path: Path) -> None:
    base = build_model("gpt2")
    nested = random_nested(base, tmp_path / "nested", arch="gpt2", r=8, scaling="sqrt")
    peft_model = PeftModel.from_pretrained(build_model("gpt2"), str(nested.path)).eval()
    ids = sample_ids()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, apply_delta_by_hand(base, nested, 8)(ids).logits, atol=2e-5, rtol=1e-4)


def test_slice_of_slice_and_all(tmp_path: Path) -> None:
    base = build_model("llama")
    nested = random_nested(base, tmp_path / "nested", arch="llama", r=8, train_ranks=(2, 4, 8))
    res = slice_adapter(nested.path, "all", tmp_path / "slices")
    assert [r.rank for r in res] == [2, 4, 8]
    assert sorted(p.name for p in (tmp_path / "slices").iterdir()) == ["r2", "r4", "r8"]
    # a slice is a plain PEFT adapter: it loads as a one-rank "lora" adapter with the same delta
    sl = NestedAdapter.load(tmp_path / "slices" / "r4")
    assert sl.max_rank == 4 and not sl.is_nested
    with sl.reader() as a, nested.reader() as b:
        name = next(iter(nested.modules))
        torch.testing.assert_close(a.delta(name, 4), b.delta(name, 4), atol=1e-6, rtol=1e-5)


def test_cli_slice_and_inspect(tmp_path: Path) -> None:
    base = build_model("llama")
    random_nested(base, tmp_path / "nested", arch="llama", r=8, train_ranks=(1, 2, 4, 8))
    runner = CliRunner()
    res = runner.invoke(main, ["slice", str(tmp_path / "nested"), "--ranks", "8,2,2", "--output", str(tmp_path / "s"), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert [d["rank"] for d in data] == [2, 8]
    # existing output: refused without --force, replaced with it
    res = runner.invoke(main, ["slice", str(tmp_path / "nested"), "--ranks", "4", "--output", str(tmp_path / "s")])
    assert res.exit_code == 2 and "already exists" in res.output and "--force" in res.output
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["r2", "r8"]
    res = runner.invoke(main, ["slice", str(tmp_path / "nested"), "--ranks", "4", "--output", str(tmp_path / "s"), "--force"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["r4"]
    # untrained rank: allowed with a warning naming the trained ones
    res = runner.invoke(main, ["slice", str(tmp_path / "nested"), "--ranks", "3", "--output", str(tmp_path / "s3")])
    assert res.exit_code == 0 and "[1, 2, 4, 8]" in res.output
    # inspect
    res = runner.invoke(main, ["inspect", str(tmp_path / "nested"), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["method"] == "matryoshka" and info["max_rank"] == 8 and len(info["p"]) == 8
    assert [r["rank"] for r in info["ranks"]] == [1, 2, 4, 8] and info["ranks"][0]["params"] * 4 == info["ranks"][-1]["bytes"] / 8
    res = runner.invoke(main, ["inspect", str(tmp_path / "nested")])
    assert res.exit_code == 0 and "matryoshka" in res.output and "train ranks: 1, 2, 4, 8" in res.output


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--ranks", "0"], "must be at least 1"), (["--ranks", "16"], r"outside \[1, 8\]"), (["--ranks", "a,b"], "not an integer"),
     (["--ranks", "4", "--scale-mode", "fused"], "fused"), (["--ranks", "2,9"], r"\[9\] are outside")],
)
def test_cli_slice_bad_ranks(args: list[str], message: str, tmp_path: Path) -> None:
    random_nested(build_model("llama"), tmp_path / "nested", arch="llama", r=8)
    res = CliRunner().invoke(main, ["slice", str(tmp_path / "nested"), "--output", str(tmp_path / "s"), *args])
    assert res.exit_code == 2, res.output
    assert __import__("re").search(message, res.output), res.output
    assert not (tmp_path / "s").exists()


def test_failure_midway_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault injection: the second slice fails while being written; no output folder remains."""
    import mlora_export.converters.slice as slice_mod

    nested = random_nested(build_model("llama"), tmp_path / "nested", arch="llama", r=8)
    calls = {"n": 0}

    class FlakyWriter(slice_mod.SafetensorsWriter):
        def write_at(self, index: int, *tensors: object) -> None:
            calls["n"] += 1
            if calls["n"] == 5:
                raise OSError("disk full (injected)")
            super().write_at(index, *tensors)

    monkeypatch.setattr(slice_mod, "SafetensorsWriter", FlakyWriter)
    with pytest.raises(OSError, match="injected"):
        slice_adapter(nested, [2, 4], tmp_path / "s", workers=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nested"]


def test_cli_slice_unusable_output_locations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An output under a file, in a read-only folder, or where the temporary folder cannot be made: exit 2, nothing left."""
    import os

    import mlora_export.fs as fs_mod

    random_nested(build_model("llama"), tmp_path / "nested", arch="llama", r=8)
    runner = CliRunner()
    (tmp_path / "afile").write_text("x")
    res = runner.invoke(main, ["slice", str(tmp_path / "nested"), "--ranks", "2", "--output", str(tmp_path / "afile" / "sub" / "s")])
    assert res.exit_code == 2 and "is a file, not a folder" in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    # root ignores folder permissions: make the check see what a normal user would
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == ro and mode & os.W_OK else real_access(p, mode, **kw))
    res = runner.invoke(main, ["slice", str(tmp_path / "nested"), "--ranks", "2", "--output", str(ro / "s")])
    assert res.exit_code == 2 and "not writable" in res.stderr and list(ro.iterdir()) == [], res.stderr

    real_mkdir = os.mkdir

    def refuse(path: object, *args: object, **kwargs: object) -> None:
        if ".tmp-" in str(path):
            raise PermissionError(13, "Permission denied", str(path))
        real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(fs_mod.os, "mkdir", refuse)
    res = runner.invoke(main, ["slice", str(tmp_path / "nested"), "--ranks", "2", "--output", str(tmp_path / "s")])
    assert res.exit_code == 2 and "cannot create output" in res.stderr and "Permission denied" in res.stderr, res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "nested", "ro"]


def test_slice_files_do_not_depend_on_thread_count(tmp_path: Path) -> None:
    """However the modules are shared out among threads (one, two, three, more than there are
    ranks), each slice file is byte-for-byte the same, its reported size is its size on disk, and
    the progress reports only grow, up to the total."""
    nested = random_nested(build_model("gpt2", torch.bfloat16), tmp_path / "nested", arch="gpt2", r=8, dtype=torch.bfloat16)
    files = {}
    for workers in (1, 2, 3, 6):
        progress: list[tuple[int, int]] = []
        results = slice_adapter(nested, [1, 2, 3, 5, 8], tmp_path / f"w{workers}", workers=workers, progress=lambda d, t: progress.append((d, t)))  # noqa: B023 - called in this iteration
        for r in results:
            assert r.bytes == (r.path / "adapter_model.safetensors").stat().st_size
        dones = [d for d, _ in progress]
        assert len(progress) == len(nested.modules) and dones == sorted(dones)
        assert progress[-1] == (sum(nested.bytes_at(k) for k in (1, 2, 3, 5, 8)),) * 2
        files[workers] = {r.rank: (r.path / "adapter_model.safetensors").read_bytes() for r in results}
    assert files[2] == files[1] and files[3] == files[1] and files[6] == files[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_slicing_checks_the_whole_source_for_nan(dtype: torch.dtype, workers: int, tmp_path: Path) -> None:
    """Slicing loads the adapter without the NaN/inf pass and makes it in its threads instead: a
    bad value anywhere (even in rows no requested rank reads) still fails the slice, naming the
    first bad tensor in file order, and leaves nothing behind."""
    from mlora_export.errors import InvalidAdapterError
    from mlora_export.io.safetensors import read_header

    nested = random_nested(build_model("llama", dtype), tmp_path / "nested", arch="llama", r=8, dtype=dtype)
    order = list(read_header(nested.weights_path).tensors)
    late, early = order[-3], order[len(order) // 2]
    poison_weights(nested.weights_path, {late: float("nan"), early: float("-inf")})
    with pytest.raises(InvalidAdapterError, match=f"tensor '{early}' has NaN or infinite values"):
        slice_adapter(nested.path, [1], tmp_path / "out", workers=workers)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nested"]
    res = CliRunner().invoke(main, ["slice", str(nested.path), "--ranks", "2,4", "--output", str(tmp_path / "out")])
    assert res.exit_code == 2 and early in res.output and "Traceback" not in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nested"]


def test_a_failing_thread_stops_the_others(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When one thread fails, the others stop at their next module instead of writing on."""
    import threading
    import time

    import mlora_export.converters.slice as slice_mod

    nested = random_nested(build_model("llama"), tmp_path / "nested", arch="llama", r=8)
    failed = threading.Event()
    writes_after_failure = {"n": 0}
    real_slicer = slice_mod._module_slicer

    def slicer(*args: object) -> object:
        real_work = real_slicer(*args)  # type: ignore[arg-type]

        def work(index: int, name: str) -> None:
            try:
                real_work(index, name)
            except OSError:
                failed.set()  # map_modules raises the stop flag as soon as this returns
                raise

        return work

    class Writer(slice_mod.SafetensorsWriter):
        def write_at(self, index: int, *tensors: object) -> None:
            module = index // 2
            if module == 3:  # whichever thread takes module 3 fails
                raise OSError("disk full (injected)")
            if module > 3:  # the other thread only goes on once it has failed (and the stop flag is up)
                assert failed.wait(10)
                time.sleep(0.2)
                writes_after_failure["n"] += 1
            super().write_at(index, *tensors)

    monkeypatch.setattr(slice_mod, "_module_slicer", slicer)
    monkeypatch.setattr(slice_mod, "SafetensorsWriter", Writer)
    with pytest.raises(OSError, match="injected"):
        slice_adapter(nested, [4, 8], tmp_path / "s", workers=2)
    assert writes_after_failure["n"] <= 2  # the module it was at (2 rank files), not the 10 left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nested"]


def test_reader_keeps_the_original_error_when_a_view_is_alive(tmp_path: Path) -> None:
    """A view of the map still referenced when the reader closes (by an exception's traceback,
    say) must not turn the real error into a ``BufferError``."""
    nested = random_nested(build_model("llama"), tmp_path / "nested", arch="llama", r=8)
    with pytest.raises(RuntimeError, match="boom"):
        with nested.reader(populate=True) as rd:
            view = rd.lora_A_data(next(iter(nested.modules)), 2)
            assert view.shape[0] == 2
            raise RuntimeError("boom")
