"""ONNX export: ONNX Runtime vs PyTorch (docs/design.md §1 reference applied by hand) for every export
kind, llama / gpt2 (Conv1D) / bert (classifier); ORT adapter files; clamping; CLI bad inputs.

Each (arch, kind) is exported once per module and checked with one ORT session for all ranks.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mlora_export.cli.main import main
from mlora_export.converters.onnx import OnnxExportOptions, export_onnx
from tests.common import apply_delta_by_hand, build_model, random_nested

onnxruntime = pytest.importorskip("onnxruntime")

ARCHS = ("llama", "gpt2", "bert")
KINDS = ("dynamic", "fixed", "merged", "adapters")
#: Each arch exercises another scaling so that s(k) in the graph is checked for all three.
SCALING = {"llama": "sqrt", "gpt2": "rank", "bert": "none"}
FIXED_RANK = 4
R = 8
TRAIN_RANKS = (1, 2, 4, 8)
SHAPES = ((1, 5), (3, 11))  # two batch sizes, two sequence lengths


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="module")
def nested_dirs(workdir: Path) -> dict[str, Path]:
    out = {}
    for arch in ARCHS:
        d = workdir / f"nested-{arch}"
        random_nested(build_model(arch), d, arch=arch, r=R, train_ranks=TRAIN_RANKS, scaling=SCALING[arch], alpha=2.0 if arch == "bert" else 1.0)
        out[arch] = d
    return out


@pytest.fixture(scope="module")
def exports(workdir: Path, nested_dirs: dict[str, Path], base_dirs: dict[str, Path]) -> Callable[[str, str], Path]:
    """``get(arch, kind)`` → export folder, exported once per module (with built-in verification)."""
    cache: dict[tuple[str, str], Path] = {}

    def get(arch: str, kind: str) -> Path:
        if (arch, kind) not in cache:
            out = workdir / f"{arch}-{kind}"
            kw = {"dynamic": {}, "fixed": {"rank": FIXED_RANK}, "merged": {"rank": FIXED_RANK, "merged": True},
                  "adapters": {"adapters_per_rank": True}}[kind]
            res = export_onnx(nested_dirs[arch], base_dirs[arch], out, OnnxExportOptions(**kw))
            assert res.checks and all(c.ok for c in res.checks)
            cache[(arch, kind)] = out
        return cache[(arch, kind)]

    return get


def feeds(batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed + 100 * batch + seq)
    ids = rng.integers(3, 96, size=(batch, seq), dtype=np.int64)
    mask = np.ones_like(ids)
    if batch > 1:
        mask[0, -2:] = 0  # right padding in one row
    return {"input_ids": ids, "attention_mask": mask}


def reference(arch: str, adapter_dir: Path, k: int, f: dict[str, np.ndarray], base_dtype: torch.dtype = torch.float32) -> np.ndarray:
    """Float32 logits of the base (saved in ``base_dtype``) with ΔW_k of docs/design.md §1 added by hand."""
    from mlora_export.adapter import NestedAdapter

    model = build_model(arch, base_dtype).float()  # what the exporter loads: the saved weights, upcast
    if k > 0:
        model = apply_delta_by_hand(model, NestedAdapter.load(adapter_dir), k)
    kwargs = {} if arch == "bert" else {"use_cache": False}
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(f["input_ids"]), attention_mask=torch.from_numpy(f["attention_mask"]), **kwargs).logits.numpy()


def session(folder: Path) -> "onnxruntime.InferenceSession":
    opts = onnxruntime.SessionOptions()
    opts.intra_op_num_threads = 1
    return onnxruntime.InferenceSession(str(folder / "model.onnx"), opts, providers=["CPUExecutionProvider"])


def run_adapter(sess: "onnxruntime.InferenceSession", f: dict[str, np.ndarray], path: Path) -> np.ndarray:
    lora = onnxruntime.LoraAdapter()
    lora.Load(str(path))
    ro = onnxruntime.RunOptions()
    ro.add_active_adapter(lora)
    return sess.run(["logits"], f, run_options=ro)[0]


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float(np.abs(a - b).max())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_ort_matches_pytorch(arch: str, kind: str, exports, nested_dirs) -> None:
    folder = exports(arch, kind)
    sess = session(folder)
    ranks = {"dynamic": (0, *TRAIN_RANKS), "adapters": TRAIN_RANKS}.get(kind, (FIXED_RANK,))
    for batch, seq in SHAPES:
        f = feeds(batch, seq)
        for k in ranks:
            ref = reference(arch, nested_dirs[arch], k, f)
            if kind == "dynamic":
                got = sess.run(["logits"], {**f, "lora_rank": np.array(k, dtype=np.int64)})[0]
            elif kind == "adapters":
                got = run_adapter(sess, f, folder / "adapters" / f"r{k}.onnx_adapter")
            else:
                got = sess.run(["logits"], f)[0]
            assert max_diff(got, ref) <= 1e-4, (arch, kind, k, batch, seq)
    info = json.loads((folder / "export_info.json").read_text())
    assert info["kind"] == kind and info["outputs"] == ["logits"]
    names = [i.name for i in sess.get_inputs()]
    assert names[:2] == ["input_ids", "attention_mask"]
    assert ("lora_rank" in names) == (kind == "dynamic")


@pytest.mark.parametrize("arch, kind, k", [("gpt2", "fixed", 1), ("llama", "merged", R)])
def test_fixed_and_merged_at_edge_ranks(arch: str, kind: str, k: int, tmp_path: Path, nested_dirs, base_dirs) -> None:
    """Fixed and merged exports at the lowest and the full rank too (the main test uses FIXED_RANK);
    exported through the CLI with --no-verify (no ONNX Runtime check there), checked here by hand."""
    out = tmp_path / "out"
    args = ["onnx", str(nested_dirs[arch]), "--base-model", str(base_dirs[arch]), "--output", str(out), "--rank", str(k), "--no-verify"]
    res = CliRunner().invoke(main, args + (["--merged"] if kind == "merged" else []))
    assert res.exit_code == 0, res.output
    assert "not verified" in res.stdout and json.loads((out / "export_info.json").read_text())["verification"] == []
    sess = session(out)
    for batch, seq in SHAPES:
        f = feeds(batch, seq)
        assert max_diff(sess.run(["logits"], f)[0], reference(arch, nested_dirs[arch], k, f)) <= 1e-4, (arch, kind, k, batch, seq)


def test_dynamic_rank_clamps_out_of_range(exports, nested_dirs) -> None:
    """lora_rank < 0 behaves as 0 (the base model), lora_rank > r as r; documented in the README."""
    sess = session(exports("llama", "dynamic"))
    f = feeds(2, 6)

    def at(k: int) -> np.ndarray:
        return sess.run(["logits"], {**f, "lora_rank": np.array(k, dtype=np.int64)})[0]

    base = reference("llama", nested_dirs["llama"], 0, f)
    assert max_diff(at(0), base) <= 1e-4
    np.testing.assert_array_equal(at(-5), at(0))
    np.testing.assert_array_equal(at(R + 100), at(R))
    assert max_diff(at(R), base) > 1e-2  # the adapter does something
    # an untrained rank in range is computed exactly too (slice at 3)
    assert max_diff(at(3), reference("llama", nested_dirs["llama"], 3, f)) <= 1e-4


def test_onnx_adapter_files_round_trip(exports, nested_dirs) -> None:
    """read_adapter gives Olive's <module>.lora_A.weight = A[:k]ᵀ [in, k] and lora_B.weight = (s(k)·B[:, :k])ᵀ [k, out];
    running it equals the fixed-rank export; no adapter = base."""
    from mlora_export.adapter import NestedAdapter

    folder = exports("llama", "adapters")
    nested = NestedAdapter.load(nested_dirs["llama"])
    for k in TRAIN_RANKS:
        fmt = onnxruntime.AdapterFormat.read_adapter(str(folder / "adapters" / f"r{k}.onnx_adapter"))
        params = {n: v.numpy() for n, v in fmt.get_parameters().items()}
        assert len(params) == 2 * len(nested.modules)
        with nested.reader() as rd:
            for name in nested.modules:
                np.testing.assert_allclose(params[f"{name}.lora_A.weight"], rd.lora_A(name, k).numpy().T, rtol=0, atol=0)
                np.testing.assert_allclose(params[f"{name}.lora_B.weight"], rd.lora_B(name, k).numpy().T * nested.scale(k), rtol=1e-6, atol=1e-7)
    sess = session(folder)
    fixed = session(exports("llama", "fixed"))
    for batch, seq in SHAPES:
        f = feeds(batch, seq)
        got = run_adapter(sess, f, folder / "adapters" / f"r{FIXED_RANK}.onnx_adapter")
        assert max_diff(got, fixed.run(["logits"], f)[0]) <= 1e-5
        # no active adapter: the rank-0 defaults make it the base model
        assert max_diff(sess.run(["logits"], f)[0], reference("llama", nested_dirs["llama"], 0, f)) <= 1e-4


# -- the command line ----------------------------------------------------------------------


def listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_cli_json_success(tmp_path: Path, nested_dirs, base_dirs) -> None:
    out = tmp_path / "cli-out"
    res = CliRunner().invoke(main, ["onnx", str(nested_dirs["gpt2"]), "--base-model", str(base_dirs["gpt2"]), "--output", str(out),
                                    "--rank", "2", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["kind"] == "fixed" and data["rank"] == 2 and data["exporter"] in ("dynamo", "torchscript")
    assert [c["rank"] for c in data["verification"]] == [2] and data["verification"][0]["ok"]
    assert listing(out) == ["export_info.json", "model.onnx"]
    assert listing(tmp_path) == ["cli-out"]


@pytest.mark.parametrize(
    "case",
    ["missing-base", "mismatched-adapter", "output-under-file", "exists-no-force", "merged-without-rank", "rank-too-high",
     "adapters-with-rank", "bad-opset", "opset-too-new", "bad-provider", "missing-adapter", "pickle-base", "base-is-file"],
)
def test_cli_bad_inputs(case: str, tmp_path: Path, nested_dirs, base_dirs) -> None:
    nested, base = str(nested_dirs["llama"]), str(base_dirs["llama"])
    out = tmp_path / "out"
    extra: list[str] = []
    expect: str | tuple[str, ...] = ""  # a tuple: every part (the library's words, the CLI's flag hint)
    if case == "missing-base":
        base, expect = str(tmp_path / "nope"), "does not exist"
    elif case == "mismatched-adapter":
        base, expect = str(base_dirs["gpt2"]), "not found in the base model"
    elif case == "output-under-file":
        (tmp_path / "afile").write_text("x")
        out, expect = tmp_path / "afile" / "out", "is a file"
    elif case == "exists-no-force":
        out.mkdir()
        (out / "keep.txt").write_text("keep")
        expect = "--force"
    elif case == "merged-without-rank":
        extra, expect = ["--merged"], ("a merged export needs a rank", "(see --merged and --rank)")
    elif case == "rank-too-high":
        extra, expect = ["--rank", "99"], "outside [1, 8]"
    elif case == "adapters-with-rank":
        extra, expect = ["--adapters-per-rank", "--rank", "2"], "--adapters-per-rank"
    elif case == "bad-opset":
        extra, expect = ["--opset", "5"], ("opset 5 is not supported", "(see --opset)")
    elif case == "opset-too-new":
        extra, expect = ["--opset", "26"], ("opset 26 is not supported: expected an integer in [14, ", "(see --opset)")
    elif case == "base-is-file":
        (tmp_path / "weights.safetensors").write_bytes(b"x")
        base, expect = str(tmp_path / "weights.safetensors"), "is a file; pass the transformers model folder"
    elif case == "bad-provider":
        extra, expect = ["--provider", "NopeExecutionProvider"], "not available"
    elif case == "missing-adapter":
        nested, expect = str(tmp_path / "no-adapter"), "does not exist"
    elif case == "pickle-base":
        pb = tmp_path / "pickle-base"
        pb.mkdir()
        (pb / "config.json").write_text((Path(base) / "config.json").read_text())
        (pb / "pytorch_model.bin").write_bytes(b"\x80\x04")
        base, expect = str(pb), "pickle"
    before = listing(tmp_path)
    res = CliRunner().invoke(main, ["onnx", nested, "--base-model", base, "--output", str(out), *extra])
    assert res.exit_code == 2, res.output
    assert res.stderr.startswith("error: ") and all(e in res.stderr for e in ((expect,) if isinstance(expect, str) else expect)), res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert listing(tmp_path) == before  # nothing written, no temporary sibling left
    if case == "exists-no-force":
        assert listing(out) == ["keep.txt"]


def test_pickle_weights_never_loaded(tmp_path: Path, nested_dirs, base_dirs, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder with real pytorch_model.bin weights beside an unrelated .safetensors file: refused, nothing unpickled."""
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text((base_dirs["llama"] / "config.json").read_text())
    torch.save(build_model("llama").state_dict(), base / "pytorch_model.bin")
    (base / "notes.safetensors").write_bytes((base_dirs["llama"] / "model.safetensors").read_bytes()[:8])
    loads: list[object] = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: loads.append(a) or real_load(*a, **kw))
    res = CliRunner().invoke(main, ["onnx", str(nested_dirs["llama"]), "--base-model", str(base), "--output", str(tmp_path / "out")])
    assert res.exit_code == 2 and res.stderr.startswith("error: ") and "only pickle weights" in res.stderr and "never loaded" in res.stderr, res.output
    assert loads == [] and not (tmp_path / "out").exists()


def test_cli_unwritable_output(tmp_path: Path, nested_dirs, base_dirs, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only output folder, and a location where the temporary sibling cannot be created: exit 2, nothing left."""


    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    real_access = os.access
    # root ignores folder permissions: make the check see what a normal user would
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == ro and mode & os.W_OK else real_access(p, mode, **kw))
    args = [str(nested_dirs["llama"]), "--base-model", str(base_dirs["llama"])]
    try:
        res = CliRunner().invoke(main, ["onnx", *args, "--output", str(ro / "out")])
        assert res.exit_code == 2 and "not writable" in res.stderr, res.stderr
        assert listing(ro) == []
    finally:
        ro.chmod(0o755)

    import mlora_export.fs as fs_mod

    real_mkdir = fs_mod.os.mkdir

    def refuse(path: object, *a: object, **kw: object) -> None:
        if ".tmp-" in str(path):
            raise PermissionError(13, "Permission denied", str(path))
        real_mkdir(path, *a, **kw)

    monkeypatch.setattr(fs_mod.os, "mkdir", refuse)  # the temporary sibling cannot be created
    res = CliRunner().invoke(main, ["onnx", *args, "--output", str(tmp_path / "out"), "--no-verify"])
    assert res.exit_code == 2 and "cannot create output" in res.stderr and "Permission denied" in res.stderr, res.stderr
    assert listing(tmp_path) == ["ro"]


def test_cli_failed_verification_keeps_previous_output(tmp_path: Path, exports, nested_dirs, base_dirs, monkeypatch: pytest.MonkeyPatch) -> None:
    """A mismatch above tolerance is exit 1 with the numbers; with --force the previous output stays intact."""
    import shutil

    from mlora_export.converters.onnx import verify as verify_mod
    from mlora_export.converters.onnx.verify import RankCheck

    out = tmp_path / "out"
    shutil.copytree(exports("gpt2", "fixed"), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls: list[int] = []
    monkeypatch.setattr(verify_mod, "compare", lambda k, got, ref, atol, rtol: calls.append(k) or RankCheck(k, 0.5, 1e-4))
    args = ["onnx", str(nested_dirs["gpt2"]), "--base-model", str(base_dirs["gpt2"]), "--output", str(out), "--rank", str(FIXED_RANK), "--force"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1, res.output
    assert f"ONNX Runtime disagrees with PyTorch: rank {FIXED_RANK} max abs diff 0.5" in res.stderr and calls == [FIXED_RANK]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old export was not replaced
    assert listing(tmp_path) == ["out"]  # no temporary sibling left


def test_bfloat16_base_and_adapter(tmp_path: Path) -> None:
    """A bfloat16 base and bfloat16 factors (GPT-2 Conv1D): the float32 graph equals docs/design.md §1 on the upcast weights."""
    base, nested = tmp_path / "base-bf16", tmp_path / "nested-bf16"
    build_model("gpt2", torch.bfloat16).save_pretrained(base)
    random_nested(build_model("gpt2"), nested, arch="gpt2", r=R, train_ranks=TRAIN_RANKS, dtype=torch.bfloat16)
    res = export_onnx(nested, base, tmp_path / "out")
    assert [c.rank for c in res.checks] == [0, *TRAIN_RANKS] and all(c.ok for c in res.checks)
    sess = session(tmp_path / "out")
    f = feeds(3, 11)
    for k in (0, 2, R):
        got = sess.run(["logits"], {**f, "lora_rank": np.array(k, dtype=np.int64)})[0]
        assert max_diff(got, reference("gpt2", nested, k, f, torch.bfloat16)) <= 1e-4, k


def test_external_data_adapters_export(tmp_path: Path, nested_dirs, base_dirs) -> None:
    """Weights in model.onnx.data (as for models over 2 GB) load in ORT; the adapter inputs keep their defaults."""
    out = tmp_path / "ext"
    res = export_onnx(nested_dirs["llama"], base_dirs["llama"], out, OnnxExportOptions(adapters_per_rank=True, external_data=True))
    assert res.external_data and all(c.ok for c in res.checks)
    import onnx

    assert (out / "model.onnx.data").stat().st_size > 10_000
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    onnx.checker.check_model(str(out / "model.onnx"))
    sess = session(out)
    f = feeds(2, 6)
    assert max_diff(sess.run(["logits"], f)[0], reference("llama", nested_dirs["llama"], 0, f)) <= 1e-4
    assert max_diff(run_adapter(sess, f, out / "adapters" / "r2.onnx_adapter"), reference("llama", nested_dirs["llama"], 2, f)) <= 1e-4
