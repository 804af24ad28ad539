"""GGUF export (llama.cpp LoRA adapters) against llama.cpp's own converter, ``convert_lora_to_gguf.py``.

The converter is not on PyPI as a package of its own: it ships in the ``llama-cpp-python`` source
distribution (``vendor/llama.cpp``), which the ``llama_cpp`` fixture downloads once with pip into
pytest's cache folder (``.pytest_cache/d/llama-cpp-python-0.3.36``; or set ``MLORA_LLAMA_CPP_DIR``
to a llama.cpp checkout). It is run in one subprocess with its own ``gguf-py``, on the baked (and
native) PEFT slices that ``mlora-export slice`` writes, and its files are compared with ours
through ``gguf.GGUFReader``: the metadata (every key, type and value), the tensor names and
order, types, shapes and bytes. Our files are also checked numerically against docs/design.md §1.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mlora_export.adapter import MatryoshkaConfig, NestedAdapter, save_nested
from mlora_export.cli.main import main
from mlora_export.converters.gguf import GgufOptions, base_from_config, export_gguf, resolve_base
from mlora_export.converters.slice import slice_adapter
from mlora_export.errors import (
    BaseModelError,
    ConfigError,
    OutputExistsError,
    RankError,
    UnsupportedArchitectureError,
)
from tests.common import build_model, random_nested

SDIST = "llama-cpp-python==0.3.36"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"  # PyPI's, checked after the download
#: What the converter needs from the source package (MIT licence: vendor/llama.cpp/LICENSE).
NEEDED = ("convert_lora_to_gguf.py", "convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
RANKS = (2, 8)
ARCHS = ("llama", "qwen2", "gpt2")
#: (adapter dtype, out types): each adapter dtype at two out types.
DTYPES = {"float32": ("f32", "f16", "q8_0"), "bfloat16": ("bf16", "f32")}


def _pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
        return True
    except OSError:
        return False


def _fetch_llama_cpp(cache: Path) -> Path:
    """Download the sdist with pip and extract the converter's files into ``cache``; return the llama.cpp folder."""
    root = cache / "llama.cpp"
    if (root / "convert_lora_to_gguf.py").is_file() and (root / ".complete").is_file():
        return root
    dl = cache / "download"
    dl.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "--disable-pip-version-check", "-q", "-d", str(dl), SDIST],
        capture_output=True, text=True, timeout=900, check=False,
    )
    archives = sorted(dl.glob("llama_cpp_python-*.tar.gz"))
    if proc.returncode != 0 or not archives:
        if not _pypi_reachable():
            pytest.skip(f"PyPI is unreachable: cannot download {SDIST} for llama.cpp's convert_lora_to_gguf.py")
        raise RuntimeError(f"pip download {SDIST} failed: {proc.stderr[-2000:]}")
    digest = hashlib.sha256(archives[0].read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        archives[0].unlink()
        raise RuntimeError(f"{archives[0].name}: sha256 {digest}, expected {SDIST_SHA256} (PyPI's); removed it")
    prefix = archives[0].name.removesuffix(".tar.gz") + "/vendor/llama.cpp/"
    tmp = cache / "llama.cpp.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    with tarfile.open(archives[0]) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.name[len(prefix):].startswith(NEEDED)]
        for m in members:
            m.name = m.name[len(prefix):]
        tar.extractall(tmp, members=members, filter="data")
    (tmp / ".complete").write_text(digest)
    if root.exists():
        shutil.rmtree(root)
    tmp.rename(root)
    archives[0].unlink()
    return root


@pytest.fixture(scope="session")
def llama_cpp(request: pytest.FixtureRequest) -> Path:
    """The llama.cpp folder holding ``convert_lora_to_gguf.py`` and its siblings."""
    env = os.environ.get("MLORA_LLAMA_CPP_DIR")
    if env:
        return Path(env)
    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider: a folder of this session
    folder = cache.mkdir("llama-cpp-python-0.3.36") if cache is not None else request.getfixturevalue("tmp_path_factory").mktemp("llama-cpp")
    return _fetch_llama_cpp(Path(folder))


#: Runs convert_lora_to_gguf.py once per job in one process (imports shared): argv lists on stdin, as JSON.
DRIVER = r"""
import json, runpy, sys
root = sys.argv[1]
sys.path.insert(0, root)
for argv in json.load(sys.stdin):
    sys.argv = [root + "/convert_lora_to_gguf.py", *argv]
    runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_converter(llama_cpp: Path, jobs: list[list[str]]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(llama_cpp)], input=json.dumps(jobs), capture_output=True, text=True, env=env, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]


def tiny_model(arch: str) -> torch.nn.Module:
    if arch == "qwen2":
        import transformers as tf

        torch.manual_seed(0)
        cfg = tf.Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
        return tf.Qwen2ForCausalLM(cfg).eval()
    return build_model(arch)


def nested_for(model: torch.nn.Module, path: Path, arch: str, dtype: torch.dtype, **kw: Any) -> NestedAdapter:
    path.mkdir(parents=True)
    return random_nested(model, path, arch="llama" if arch == "qwen2" else arch, dtype=dtype, **kw)


def read_gguf(path: Path) -> tuple[list[tuple[str, Any, Any]], list[tuple[str, str, tuple[int, ...], np.ndarray]]]:
    """``([(key, types, value)], [(name, type, shape, data)])`` in file order, through llama.cpp's reader."""
    reader = gguf.GGUFReader(path)
    kv = [(f.name, [int(t) for t in f.types], f.contents()) for f in reader.fields.values() if not f.name.startswith("GGUF.")]
    tensors = [(t.name, t.tensor_type.name, tuple(int(n) for n in t.shape),
                np.array(t.data).view(np.uint16) if t.tensor_type.name == "BF16" else np.array(t.data)) for t in reader.tensors]
    return kv, tensors


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Per arch and adapter dtype: base folder, nested adapter, its slices and our files; ``"jobs"``:
    the converter runs that write the reference files next to ours."""
    root = tmp_path_factory.mktemp("gguf")
    out: dict[str, Any] = {"jobs": []}
    for arch in ARCHS:
        model = tiny_model(arch)
        base = root / f"base-{arch}"
        model.save_pretrained(base)
        for dtype_name, out_types in DTYPES.items():
            dtype = getattr(torch, dtype_name)
            case = root / f"{arch}-{dtype_name}"
            nested = nested_for(model, case / "nested", arch, dtype)
            modes = ("baked", "native") if arch == "llama" and dtype_name == "float32" else ("baked",)
            for mode in modes:
                # the slice folders are named r{k}, so the converter's general.name is "R{k}"
                slice_adapter(nested, RANKS, case / f"slices-{mode}", scale_mode=mode)
                for t in out_types:
                    export_gguf(nested, RANKS, case / f"ours-{mode}-{t}", GgufOptions(out_type=t, scale_mode=mode, name="R{rank}"), base_model=base)
                    (case / f"ref-{mode}-{t}").mkdir()
                    for k in RANKS:
                        out["jobs"].append(["--base", str(base), "--outtype", t, "--outfile", str(case / f"ref-{mode}-{t}" / f"r{k}.gguf"),
                                            str(case / f"slices-{mode}" / f"r{k}")])
            out[f"{arch}-{dtype_name}"] = {"base": base, "case": case, "nested": nested, "model": model, "modes": modes}
    return out


@pytest.fixture(scope="session")
def cases(built: dict[str, Any], llama_cpp: Path) -> dict[str, Any]:
    """:func:`built`, with the converter's files written."""
    run_converter(llama_cpp, built["jobs"])
    return built


def _params() -> list[Any]:
    return [pytest.param(arch, d, t, id=f"{arch}-{d}-{t}") for arch in ARCHS for d, ts in DTYPES.items() for t in ts]


@pytest.mark.parametrize("arch,dtype_name,out_type", _params())
@pytest.mark.parametrize("k", RANKS)
def test_equals_llama_cpp_converter(cases: dict[str, Any], arch: str, dtype_name: str, out_type: str, k: int) -> None:
    """Our file equals convert_lora_to_gguf.py's for the same baked slice: metadata, names, types, shapes, bytes.

    GPT-2 (Conv1D targets): the converter transposes the LoRA pair as it transposes a Conv1D
    *weight* (``[in, out]`` → ``[out, in]``), but PEFT's ``A [k, in]`` / ``B [out, k]`` are already
    in that orientation, so its file has ``lora_a = Bᵀ``, ``lora_b = Aᵀ`` (llama.cpp then refuses it:
    "tensor has incorrect shape", scripts/check_gguf_llamacpp.sh). Ours is the untransposed pair:
    the converter's tensors, transposed back.
    """
    c = cases[f"{arch}-{dtype_name}"]
    for mode in c["modes"]:
        ours_kv, ours = read_gguf(c["case"] / f"ours-{mode}-{out_type}" / f"r{k}.gguf")
        ref_kv, ref = read_gguf(c["case"] / f"ref-{mode}-{out_type}" / f"r{k}.gguf")
        assert ours_kv == ref_kv
        assert {key: v for key, _, v in ours_kv}["adapter.lora.alpha"] == pytest.approx(
            k if mode == "baked" else c["nested"].scale(k) * k, rel=1e-6)
        assert [t[0] for t in ours] == [t[0] for t in ref]
        assert len(ours) == 2 * len(c["nested"].modules)
        if arch == "gpt2" and out_type == "q8_0":
            continue  # the converter's transposed pair quantizes along other rows: nothing to compare bytewise
        for (name, qtype, shape, data), (_, rtype, rshape, rdata) in zip(ours, ref):
            # q8_0: rows whose length is not a multiple of 32 fall back to F16, in both
            assert qtype == rtype and (out_type == "q8_0" or qtype == out_type.upper()), name
            if arch == "gpt2":  # see the docstring: transposed back
                partner = next(t for t in ref if t[0] == name[:-1] + ("b" if name.endswith("a") else "a"))
                rshape, rdata = partner[2][::-1], partner[3].T
            assert shape == rshape, name
            assert data.dtype == rdata.dtype and np.array_equal(data.view(np.uint8), np.ascontiguousarray(rdata).view(np.uint8)), name


def _undo_rope_permute(b: np.ndarray, n_head: int) -> np.ndarray:
    return b.reshape(n_head, b.shape[0] // n_head // 2, 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("k", RANKS)
def test_file_applies_delta_k(built: dict[str, Any], arch: str, k: int) -> None:
    """llama.cpp applies ``(alpha / k) · lora_b · lora_a``: that is ``s(k)·B[:, :k]·A[:k]`` (docs/design.md §1),
    with the Llama q/k rows in llama.cpp's rotary order."""
    c = built[f"{arch}-float32"]
    nested: NestedAdapter = c["nested"]
    cfg = c["model"].config
    for mode in c["modes"]:
        kv, tensors = read_gguf(c["case"] / f"ours-{mode}-f32" / f"r{k}.gguf")
        alpha = {key: v for key, _, v in kv}["adapter.lora.alpha"]
        by_name = {t[0]: t[3].astype(np.float64) for t in tensors}
        with nested.reader() as rd:
            for i, module in enumerate(nested.modules):
                a, b = by_name[tensors[2 * i][0]], by_name[tensors[2 * i + 1][0]]
                assert a.shape == (k, nested.modules[module].in_features)
                if arch == "llama" and module.endswith(("q_proj", "k_proj")):
                    heads = cfg.num_attention_heads if module.endswith("q_proj") else cfg.num_key_value_heads
                    b = _undo_rope_permute(b, heads)
                delta = (alpha / k) * (b @ a)
                np.testing.assert_allclose(delta, rd.delta(module, k).double().numpy(), rtol=1e-5, atol=1e-6)


def test_arch_without_config(built: dict[str, Any], tmp_path: Path) -> None:
    """``arch`` alone (a base that is not local) gives the same file for Qwen2 and GPT-2; Llama needs the head counts."""
    for arch in ("qwen2", "gpt2"):
        c = built[f"{arch}-float32"]
        export_gguf(c["nested"], [2], tmp_path / arch, GgufOptions(arch=arch, out_type="f32", name="R{rank}"))
        assert (tmp_path / arch / "r2.gguf").read_bytes() == (c["case"] / "ours-baked-f32" / "r2.gguf").read_bytes()
    with pytest.raises(BaseModelError, match="num_attention_heads"):
        export_gguf(built["llama-float32"]["nested"], [2], tmp_path / "llama", GgufOptions(arch="llama"))
    with pytest.raises(BaseModelError, match="not a local folder"):
        export_gguf(built["llama-float32"]["nested"], [2], tmp_path / "llama")
    assert not (tmp_path / "llama").exists()
    # the base folder, its config.json and the config as a mapping are the same
    base = built["llama-float32"]["base"]
    nested = built["llama-float32"]["nested"]
    cfg = json.loads((base / "config.json").read_text())
    found = {(b.architecture, b.n_layers, b.n_head, b.n_head_kv) for b in (resolve_base(nested, base), resolve_base(nested, base / "config.json"), resolve_base(nested, cfg))}
    assert found == {("LlamaForCausalLM", 2, 4, 2)}


def test_recorded_local_base(tmp_path: Path) -> None:
    """Without ``base_model``, the adapter's recorded base is used when it is a local folder."""
    model = build_model("llama")
    base = tmp_path / "base"
    model.save_pretrained(base)
    (tmp_path / "nested").mkdir()
    nested = random_nested(model, tmp_path / "nested", arch="llama")
    cfg = json.loads((nested.path / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(base)
    (nested.path / "adapter_config.json").write_text(json.dumps(cfg))
    mcfg = json.loads((nested.path / "matryoshka_config.json").read_text())
    mcfg["base_model"] = str(base)
    (nested.path / "matryoshka_config.json").write_text(json.dumps(mcfg))
    export_gguf(nested.path, [4], tmp_path / "a")
    export_gguf(nested.path, [4], tmp_path / "b", base_model=base)
    assert (tmp_path / "a" / "r4.gguf").read_bytes() == (tmp_path / "b" / "r4.gguf").read_bytes()


def test_unsupported_architecture(base_dirs: dict[str, Path], tmp_path: Path) -> None:
    cfg = json.loads((base_dirs["bert"] / "config.json").read_text())
    with pytest.raises(UnsupportedArchitectureError) as e:
        base_from_config(cfg)
    assert e.value.architecture == "BertForSequenceClassification"
    with pytest.raises(UnsupportedArchitectureError, match="'bert'"):
        base_from_config({}, arch="bert")
    with pytest.raises(BaseModelError, match="architectures"):
        base_from_config({"hidden_size": 8})


def test_unmappable_modules(base_dirs: dict[str, Path], tmp_path: Path) -> None:
    """A module llama.cpp has no name for (here: layers beyond the base's depth, a made-up module) is refused, nothing written."""
    gen = torch.Generator().manual_seed(0)
    factors = {
        "model.layers.0.self_attn.v_proj": (torch.randn(4, 32, generator=gen), torch.randn(16, 4, generator=gen)),
        "model.layers.5.self_attn.v_proj": (torch.randn(4, 32, generator=gen), torch.randn(16, 4, generator=gen)),
        "model.layers.0.self_attn.rotary_gate": (torch.randn(4, 32, generator=gen), torch.randn(16, 4, generator=gen)),
    }
    (tmp_path / "nested").mkdir()
    save_nested(tmp_path / "nested", factors, MatryoshkaConfig("matryoshka", 4, (2, 4), "sqrt", 1.0))
    with pytest.raises(UnsupportedArchitectureError) as e:
        export_gguf(tmp_path / "nested", [2], tmp_path / "out", base_model=base_dirs["llama"])
    assert set(e.value.modules) == {"model.layers.5.self_attn.v_proj", "model.layers.0.self_attn.rotary_gate"}
    assert not (tmp_path / "out").exists()
    res = CliRunner().invoke(main, ["gguf", str(tmp_path / "nested"), "--ranks", "2", "--base-model", str(base_dirs["llama"]), "-o", str(tmp_path / "out")])
    assert res.exit_code == 2 and "rotary_gate" in res.output and not (tmp_path / "out").exists()


def test_bad_inputs(built: dict[str, Any], tmp_path: Path) -> None:
    c = built["llama-float32"]
    with pytest.raises(RankError):
        export_gguf(c["nested"], [2, 9], tmp_path / "o", base_model=c["base"])
    with pytest.raises(RankError):
        export_gguf(c["nested"], [], tmp_path / "o", base_model=c["base"])
    with pytest.raises(ConfigError, match="out type"):
        export_gguf(c["nested"], [2], tmp_path / "o", GgufOptions(out_type="q4_k"), base_model=c["base"])
    with pytest.raises(ConfigError, match="only {adapter} and {rank}"):
        export_gguf(c["nested"], [2], tmp_path / "o", GgufOptions(name="{model}-{rank}"), base_model=c["base"])
    with pytest.raises(ConfigError, match="scale mode"):
        export_gguf(c["nested"], [2], tmp_path / "o", GgufOptions(scale_mode="rslora"), base_model=c["base"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(BaseModelError, match="config.json"):
        export_gguf(c["nested"], [2], tmp_path / "o", base_model=tmp_path / "empty")
    assert not (tmp_path / "o").exists()
    (tmp_path / "o").mkdir()
    with pytest.raises(OutputExistsError):
        export_gguf(c["nested"], [2], tmp_path / "o", base_model=c["base"])
    export_gguf(c["nested"], [2], tmp_path / "o", base_model=c["base"], force=True)
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["r2.gguf"]


def test_cli(built: dict[str, Any], tmp_path: Path) -> None:
    c = built["llama-bfloat16"]
    runner = CliRunner()
    args = ["gguf", str(c["nested"].path), "--ranks", "8,2", "--base-model", str(c["base"]), "-o", str(tmp_path / "g"), "--name", "R{rank}", "--json"]
    res = runner.invoke(main, args)
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert [r["rank"] for r in rows] == [2, 8] and {r["out_type"] for r in rows} == {"bf16"}  # default: the adapter's dtype
    for k in (2, 8):
        assert (tmp_path / "g" / f"r{k}.gguf").read_bytes() == (c["case"] / "ours-baked-bf16" / f"r{k}.gguf").read_bytes()
    assert oct((tmp_path / "g" / "r2.gguf").stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    res = runner.invoke(main, args)
    assert res.exit_code == 2 and "--force" in res.output
    assert runner.invoke(main, [*args, "--force"]).exit_code == 0
    (tmp_path / "empty").mkdir()
    good = {"--ranks": "2", "--base-model": str(c["base"]), "-o": str(tmp_path / "bad")}
    for bad in ({"--ranks": "0"}, {"--ranks": "99"}, {"--outtype": "q4_k"}, {"--arch": "bert"}, {"--base-model": str(tmp_path / "empty")}):
        opts = [x for key, value in {**good, **bad}.items() for x in (key, value)]
        res = runner.invoke(main, ["gguf", str(c["nested"].path), *opts])
        assert res.exit_code == 2, (bad, res.output)
        assert "Traceback" not in res.output, res.output
        assert not (tmp_path / "bad").exists()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_bundle_gguf(built: dict[str, Any], tmp_path: Path) -> None:
    """``bundle --gguf --base-model BASE`` adds ``r{k}/adapter.gguf`` (the same file as ``gguf``), listed in the manifest and checksummed."""
    from mlora_export.converters.hub.bundle import Bundle

    c = built["llama-float32"]
    res = CliRunner().invoke(main, ["bundle", str(c["nested"].path), "--ranks", "2,8", "--gguf", "--base-model", str(c["base"]), "-o", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    b = Bundle.load(tmp_path / "b", verify=True)
    assert [r["gguf"] for r in b.manifest["ranks"]] == ["r2/adapter.gguf", "r8/adapter.gguf"]
    export_gguf(c["nested"], [2, 8], tmp_path / "g", base_model=c["base"])
    for k in (2, 8):
        assert (tmp_path / "b" / f"r{k}" / "adapter.gguf").read_bytes() == (tmp_path / "g" / f"r{k}.gguf").read_bytes()
        assert f"r{k}/adapter.gguf" in {f.path for f in b.files}
    res = CliRunner().invoke(main, ["bundle", str(c["nested"].path), "--ranks", "2", "--gguf", "--base-model", str(tmp_path / "g"), "-o", str(tmp_path / "b2")])
    assert res.exit_code == 2 and "config.json" in res.output and not (tmp_path / "b2").exists()
