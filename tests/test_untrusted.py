"""Untrusted input stays untrusted (issue 12): every case a fuzzing pass found, through the CLI.

Each case checks the exit code, that stderr is one line, that the inputs are intact, that
nothing was written outside the output and that no temporary folder is left. The Hub cases run
the real ``huggingface_hub`` client against malicious repos seeded into the local stand-in
(``tests/hub_server.py``). The last part holds property-based tests (``hypothesis``) of the
safetensors header reader and the JSON/config loaders: any generated input loads to something
valid or raises our typed error, never another exception, never a hang.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from mlora_export.adapter import NestedAdapter
from mlora_export.cli.main import main
from tests.common import poison_weights, random_nested

REPO_ROOT = Path(__file__).resolve().parent.parent


# -- helpers -----------------------------------------------------------------------------------
def run(*args: object, env: dict | None = None) -> object:
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def one_line(res: object) -> str:
    """The single stderr line of a failed command (asserts there is exactly one, and no traceback)."""
    err = res.stderr.strip()  # type: ignore[attr-defined]
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: "), err
    return err


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` (hidden ones too) with the bytes of files: to prove nothing changed."""
    out: dict[str, bytes | None] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel] = p.read_bytes() if p.is_file() and not p.is_symlink() else None
    return out


def temporaries(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny causal LM with its (character-level) tokenizer."""
    from mlora_export.demo.tiny import build_tiny_model

    path = tmp_path_factory.mktemp("base") / "base"
    build_tiny_model(path, seed=0, hidden_size=32, intermediate_size=48)
    return path


@pytest.fixture(scope="module")
def nested_src(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> Path:
    from transformers import LlamaForCausalLM

    path = tmp_path_factory.mktemp("src") / "nested"
    random_nested(LlamaForCausalLM.from_pretrained(tiny_base), path, arch="llama", r=8, train_ranks=(1, 2, 4, 8))
    return path


@pytest.fixture
def proj(tmp_path: Path, nested_src: Path, tiny_base: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project folder holding nested/, base/ and data/train.jsonl; the working folder is the project."""
    import shutil

    shutil.copytree(nested_src, tmp_path / "nested")
    shutil.copytree(tiny_base, tmp_path / "base")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_adapter(folder: Path, header: bytes | dict, data: bytes = b"", peft: dict | None = None, raw_header: bool = False) -> Path:
    """A plain PEFT LoRA folder whose weights file has the given header (a dict, or raw JSON bytes)."""
    folder.mkdir(parents=True, exist_ok=True)
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    (folder / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["q_proj"]}
    cfg.update(peft or {})
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


A_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def good_header() -> dict:
    return {
        A_KEY: {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 32]},
        B_KEY: {"dtype": "F32", "shape": [4, 2], "data_offsets": [32, 64]},
    }


# -- 1. pull writes only inside its output (malicious repos) ------------------------------------
@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory):
    from tests.hub_server import HubServer

    with HubServer(tmp_path_factory.mktemp("hub")) as server:
        yield server
    assert server.bugs == [], server.bugs


@pytest.fixture(scope="module")
def bundle_files(nested_src: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The files of a genuine bundle at ranks 2, 4, 8 (path → bytes), to tamper with."""
    from mlora_export.converters.hub import BundleOptions, write_bundle

    out = tmp_path_factory.mktemp("bundle") / "bundle"
    write_bundle(nested_src, (2, 4, 8), out, BundleOptions(base_model_id="org/tiny-llama"))
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}


def entry(path: str, data: bytes) -> dict:
    return {"path": path, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def seed(hub, name: str, files: dict[str, bytes], edit=None) -> str:
    """Seed repo ``org/<name>`` with ``files``; ``edit(manifest)`` rewrites the manifest first."""
    files = dict(files)
    manifest = json.loads(files["manifest.json"])
    if edit is not None:
        edit(manifest, files)
    files["manifest.json"] = json.dumps(manifest).encode()
    hub.seed_repo(f"org/{name}", files)
    return f"org/{name}"


@pytest.fixture
def hub_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def pull(hub, repo: str, rank: int, out: Path) -> object:
    return run("pull", repo, "--rank", rank, "--output", out, "--endpoint", hub.endpoint)


def test_pull_never_writes_outside_its_output(hub, bundle_files: dict, tmp_path: Path, hub_env: None) -> None:
    victim = tmp_path / "home" / "u" / "victim.txt"
    payload = b"written by a malicious manifest"

    def escape(manifest: dict, files: dict) -> None:
        files["r8" + str(victim)] = payload  # the repo holds r8/tmp/.../victim.txt
        manifest["files"].append(entry("r8/" + str(victim), payload))  # the manifest says r8//tmp/.../victim.txt

    repo = seed(hub, "escape", bundle_files, escape)
    before = snapshot(tmp_path)
    res = pull(hub, repo, 8, tmp_path / "out")
    assert res.exit_code == 2, res.output
    assert "not a plain relative path" in one_line(res)
    assert not victim.exists() and snapshot(tmp_path) == before
    for bad in ("r8/../../x", "r8/./x", "/etc/x", "r8/a\\b", "r8/x\n", "r8/", "r8/.cache/huggingface/x"):
        def edit(manifest: dict, files: dict, bad: str = bad) -> None:
            manifest["files"].append(entry(bad, payload))

        res = pull(hub, seed(hub, "escape2", bundle_files, edit), 8, tmp_path / "out")
        assert res.exit_code == 2, (bad, res.output)
        one_line(res)
        assert snapshot(tmp_path) == before


def test_pull_places_only_listed_verified_files(hub, bundle_files: dict, tmp_path: Path, hub_env: None) -> None:
    def extra(manifest: dict, files: dict) -> None:
        files["r8/evil.py"] = b"import os; os.system('echo pwned')"
        files["r8/bundle/source.json"] = b"{}"

    repo = seed(hub, "extra", bundle_files, extra)
    hub.clear_log()
    res = pull(hub, repo, 8, tmp_path / "out")
    assert res.exit_code == 0, res.output
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*") if p.is_file()) == [
        "adapter_config.json", "adapter_model.safetensors", "bundle/manifest.json", "bundle/matryoshka_config.json",
        "bundle/source.json", "matryoshka_config.json",
    ]
    assert not any("evil" in r["path"] for r in hub.log)  # never even downloaded
    assert json.loads((tmp_path / "out/bundle/source.json").read_text())["repo_id"] == repo
    # the bundle's config must be listed to be placed
    def no_config(manifest: dict, files: dict) -> None:
        manifest["files"] = [f for f in manifest["files"] if f["path"] != "matryoshka_config.json"]

    res = pull(hub, seed(hub, "no-config", bundle_files, no_config), 8, tmp_path / "o2")
    assert res.exit_code == 2 and "does not list matryoshka_config.json" in one_line(res), res.output
    assert temporaries(tmp_path) == [] and not (tmp_path / "o2").exists()


def test_pull_checks_the_rank_folder_holds_that_rank(hub, bundle_files: dict, tmp_path: Path, hub_env: None) -> None:
    # rank 8 now points at a folder holding rank 4 (and gives that folder's size, as its files add up)
    def point_at_r4(manifest: dict, files: dict) -> None:
        sizes = {r["rank"]: r["bytes"] for r in manifest["ranks"]}
        for r in manifest["ranks"]:
            if r["rank"] == 8:
                r["path"], r["bytes"] = "r4", sizes[4]
            if r["rank"] == 4:
                r["path"], r["bytes"] = "r8", sizes[8]

    res = pull(hub, seed(hub, "wrong-rank", bundle_files, point_at_r4), 8, tmp_path / "out")
    assert res.exit_code == 2, res.output
    assert "holds an adapter of rank 4" in one_line(res)
    assert not (tmp_path / "out").exists() and temporaries(tmp_path) == []


def test_pull_refuses_nan_weights_with_a_consistent_manifest(hub, bundle_files: dict, tmp_path: Path, hub_env: None) -> None:
    def poison(manifest: dict, files: dict) -> None:
        w = tmp_path / "w.safetensors"
        w.write_bytes(files["r8/adapter_model.safetensors"])
        poison_weights(w, {B_KEY: float("nan")})
        files["r8/adapter_model.safetensors"] = w.read_bytes()
        w.unlink()
        for f in manifest["files"]:
            if f["path"] == "r8/adapter_model.safetensors":
                f.update(entry(f["path"], files["r8/adapter_model.safetensors"]))

    res = pull(hub, seed(hub, "nan", bundle_files, poison), 8, tmp_path / "out")
    assert res.exit_code == 2, res.output
    assert "NaN or infinite" in one_line(res) and "org/nan/r8" in res.stderr
    assert not (tmp_path / "out").exists() and temporaries(tmp_path) == []


@pytest.mark.parametrize("case", ["file twice", "rank twice", "folder twice", "file and folder", "bad sha", "bool rank", "not json"])
def test_pull_refuses_duplicated_or_clashing_manifest_entries(hub, bundle_files: dict, tmp_path: Path, hub_env: None, case: str) -> None:
    def edit(manifest: dict, files: dict) -> None:
        if case == "file twice":
            manifest["files"].append(dict(manifest["files"][0]))
        elif case == "rank twice":
            manifest["ranks"].append(dict(manifest["ranks"][0]))
        elif case == "folder twice":
            manifest["ranks"][0]["path"] = manifest["ranks"][1]["path"]
        elif case == "file and folder":
            manifest["files"].append(entry("r8", b"x"))
        elif case == "bad sha":
            manifest["files"][0]["sha256"] = "../" * 20
        elif case == "bool rank":
            manifest["ranks"][0]["rank"] = True

    repo = seed(hub, "dup", bundle_files, edit)
    if case == "not json":
        hub.seed_repo(repo, {**bundle_files, "manifest.json": b"[" * 100_000})
    res = pull(hub, repo, 8, tmp_path / "out")
    assert res.exit_code == 2, res.output
    one_line(res)
    assert not (tmp_path / "out").exists() and temporaries(tmp_path) == []


def test_push_hub_revision_and_bundle_license_are_checked(proj: Path, hub, hub_env: None) -> None:
    hub.clear_log()
    for revision in ("../../x", "a..b", "-x", "x.lock", "a b"):
        res = run("push-hub", "nested", "--repo-id", "org/x", "--revision", revision, "--endpoint", hub.endpoint)
        assert res.exit_code == 2 and "not a valid branch name" in one_line(res), res.output
    assert hub.log == []
    res = run("bundle", "nested", "--output", "b", "--license", "not-a-license")
    assert res.exit_code == 2 and "not a Hub license id" in one_line(res), res.output
    assert not (proj / "b").exists()
    assert run("bundle", "nested", "--output", "b", "--license", "apache-2.0").exit_code == 0


# -- 2. --force never destroys an input ---------------------------------------------------------
@pytest.mark.parametrize(
    "args",
    [
        ["slice", "nested", "--ranks", "2", "--output", "nested"],
        ["slice", "nested", "--ranks", "2", "--output", "."],
        ["slice", "nested", "--ranks", "2", "--output", ".."],
        ["slice", "nested", "--ranks", "2", "--output", "nested/slices"],
        ["slice", "nested", "--ranks", "2", "--output", "./data/../nested"],
        ["slice", "nested", "--ranks", "2", "--output", "link-to-nested"],
        ["bundle", "nested", "--output", "nested"],
        ["merge", "nested", "--base-model", "base", "--rank", "2", "--output", "nested"],
        ["onnx", "nested", "--base-model", "base", "--output", "base", "--no-verify"],
        ["onnx", "nested", "--base-model", "base", "--output", "nested", "--no-verify"],
        ["eval", "nested", "--base-model", "base", "--data", "data/train.jsonl", "--output", "data"],
        ["eval", "nested", "--base-model", "base", "--data", "data/train.jsonl", "--output", "base"],
        ["train", "--base-model", "base", "--data", "data/train.jsonl", "--ranks", "2", "--output", "base"],
        ["train", "--base-model", "base", "--data", "data/train.jsonl", "--ranks", "2", "--output", "data"],
    ],
    ids=lambda a: "-".join(a[:1] + a[a.index("--output") + 1:a.index("--output") + 2]),
)
def test_force_never_replaces_an_input(proj: Path, args: list[str]) -> None:
    (proj / "link-to-nested").symlink_to(proj / "nested")
    before = snapshot(proj)
    res = run(*args, "--force")
    assert res.exit_code == 2, res.output
    err = one_line(res)
    assert "input" in err or "working folder" in err, err
    assert snapshot(proj) == before
    assert temporaries(proj) == [] and temporaries(proj.parent) == []


def test_output_containing_the_input_is_refused(proj: Path, tmp_path: Path) -> None:
    """``--output ./proj --force`` on ``./proj/nested`` would replace the whole project."""
    os.chdir(proj.parent)  # restored by the monkeypatch.chdir of the fixture
    before = snapshot(proj)
    res = run("slice", proj / "nested", "--ranks", "2", "--output", proj, "--force")
    assert res.exit_code == 2 and "holds the input" in one_line(res), res.output
    assert snapshot(proj) == before


def test_output_name_too_long(proj: Path) -> None:
    res = run("slice", "nested", "--ranks", "2", "--output", "x" * 300)
    assert res.exit_code == 2 and "choose a shorter name" in one_line(res), res.output
    assert temporaries(proj) == []


# -- 10. signals and stale temporaries; 11. output mode -----------------------------------------
_SLOW_SLICE = """
import sys, time
import mlora_export.converters.slice as s
real = s.write_slices
def slow(*a, **k):
    out = real(*a, **k)
    print("READY", flush=True)
    time.sleep(60)
    return out
s.write_slices = slow
from mlora_export.cli.main import main
main(["slice", sys.argv[1], "--ranks", "2,4", "--output", sys.argv[2]])
"""


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129), (signal.SIGINT, 130)])
def test_signals_leave_no_temporary_folder(nested_src: Path, tmp_path: Path, sig: int, code: int) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    # A shell starts background jobs with SIGINT ignored, and Python then keeps it ignored: give
    # the child the default disposition, as a command typed at a terminal has.
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_SLICE, str(nested_src), str(tmp_path / "out")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "READY"
        assert temporaries(tmp_path), "the slices should be in their temporary folder now"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    assert len(err.strip().splitlines()) == 1 and "no output was written" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_stale_temporaries_are_removed_live_ones_kept(nested_src: Path, tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f".out.tmp-{dead}-deadbeef"
    stale_old = tmp_path / f".out.old-{dead}-0badf00d"
    live = tmp_path / f".out.tmp-{os.getppid()}-cafebabe"
    legacy = tmp_path / ".out.tmp-k3j_x9q1"  # an older release's mkdtemp name: removed once a day old
    other = tmp_path / f".other.tmp-{dead}-deadbeef"
    for d in (stale, stale_old, live, legacy, other):
        d.mkdir()
        (d / "big").write_bytes(b"x" * 1000)
    os.utime(legacy, (time.time() - 2 * 86400,) * 2)
    res = run("slice", nested_src, "--ranks", "2", "--output", tmp_path / "out")
    assert res.exit_code == 0, res.output
    assert "left by an interrupted run" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name, "out"])


@pytest.mark.parametrize("umask, mode", [(0o022, 0o755), (0o077, 0o700), (0o002, 0o775)])
def test_output_folder_has_the_umask_mode(nested_src: Path, tmp_path: Path, umask: int, mode: int) -> None:
    old = os.umask(umask)
    try:
        res = run("slice", nested_src, "--ranks", "2", "--output", tmp_path / "out")
        res2 = run("slice", nested_src, "--ranks", "2", "--output", tmp_path / "out", "--force")
    finally:
        os.umask(old)
    assert res.exit_code == 0 and res2.exit_code == 0, res.output + res2.output
    assert (tmp_path / "out").stat().st_mode & 0o777 == mode
    assert temporaries(tmp_path) == []


# -- 4. safetensors headers as strict as safetensors ---------------------------------------------
def _bad_headers() -> dict[str, tuple[bytes | dict, bytes]]:
    h = good_header
    data = b"\0" * 64
    cases: dict[str, tuple[bytes | dict, bytes]] = {}
    x = h(); x[A_KEY]["data_offsets"] = [0.0, 32]; cases["float offsets"] = (x, data)
    x = h(); x[A_KEY]["data_offsets"] = ["0", "32"]; cases["string offsets"] = (x, data)
    x = h(); x[B_KEY]["data_offsets"] = [16, 48]; x[B_KEY]["shape"] = [4, 2]; cases["overlapping offsets"] = (x, data)
    x = h(); x[B_KEY]["data_offsets"] = [40, 72]; cases["gapped offsets"] = (x, data + b"\0" * 8)
    x = h(); cases["trailing bytes"] = (x, data + b"\0" * 8)
    x = h(); x["__metadata__"] = ["format", "pt"]; cases["list metadata"] = (x, data)
    x = h(); x["__metadata__"] = {"format": 1}; cases["int metadata value"] = (x, data)
    x = h(); x[A_KEY]["shape"] = [2.0, 4]; cases["float shape"] = (x, data)
    x = h(); x[A_KEY]["shape"] = [True, 4]; x[A_KEY]["data_offsets"] = [0, 16]; cases["bool shape"] = (x, data)
    x = h(); x[A_KEY]["dtype"] = "F33"; cases["unknown dtype"] = (x, data)
    x = h(); x[A_KEY]["shape"] = [2, 0]; x[A_KEY]["data_offsets"] = [0, 0]; x[B_KEY]["data_offsets"] = [0, 32]
    cases["zero-size dimension"] = (x, b"\0" * 32)
    dup = json.dumps(h())[:-1] + ", " + json.dumps({A_KEY: h()[A_KEY]})[1:]
    cases["duplicate names"] = (dup.encode(), data)
    cases["deep nesting"] = (b"[" * 100_000 + b"]" * 100_000, b"")
    cases["not an object"] = (b"[1, 2]", b"")
    cases["huge integer"] = (json.dumps(h()).replace("[0, 32]", "[0, " + "9" * 5000 + "]").encode(), data)
    return cases


BAD_HEADERS = _bad_headers()


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_bad_safetensors_header_refused_by_inspect_and_slice(tmp_path: Path, case: str) -> None:
    header, data = BAD_HEADERS[case]
    folder = write_adapter(tmp_path / "a", header, data)
    before = snapshot(tmp_path)
    for args in (["inspect", folder], ["slice", folder, "--ranks", "1", "--output", tmp_path / "out"]):
        res = run(*args)
        assert res.exit_code == 2, (case, res.output)
        one_line(res)
    assert snapshot(tmp_path) == before


def test_the_good_header_loads(tmp_path: Path) -> None:
    """The control: the same helper with a valid header gives an adapter our tools accept."""
    folder = write_adapter(tmp_path / "a", good_header(), struct.pack("<16f", *range(1, 17)))
    assert run("inspect", folder).exit_code == 0
    assert run("slice", folder, "--ranks", "1", "--output", tmp_path / "out").exit_code == 0


# -- 5, 6, 9. configs: types, cheap checks first, regular files, deep JSON -----------------------
@pytest.mark.parametrize(
    "edit, message",
    [
        ({"fan_in_fan_out": "yes"}, "fan_in_fan_out must be true or false"),
        ({"use_rslora": "false"}, "use_rslora must be true or false"),
        ({"target_modules": 5}, "target_modules must be"),
        ({"modules_to_save": "lm_head"}, "modules_to_save must be"),
        ({"r": "2"}, "r must be a positive integer"),
        ({"r": int("9" * 4000)}, "the largest LoRA rank supported"),
        ({"r": 10**8}, "the largest LoRA rank supported"),
        ({"lora_alpha": "2"}, "lora_alpha must be"),
        ({"task_type": ["CAUSAL_LM"]}, "task_type must be"),
        ({"bias": "all"}, "bias is 'all'"),
    ],
)
def test_wrong_json_types_are_refused_not_coerced(tmp_path: Path, edit: dict, message: str) -> None:
    folder = write_adapter(tmp_path / "a", good_header(), b"\0" * 64, peft=edit)
    for args in (["inspect", folder], ["slice", folder, "--ranks", "1", "--output", tmp_path / "out"]):
        res = run(*args)
        assert res.exit_code == 2, res.output
        assert message in one_line(res)
    assert not (tmp_path / "out").exists()


def test_huge_max_rank_with_p_fails_fast(nested_src: Path, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "a"
    shutil.copytree(nested_src, folder)
    cfg = json.loads((folder / "matryoshka_config.json").read_text())
    cfg.update(max_rank=100_000_000, train_ranks=[1, 100_000_000])
    (folder / "matryoshka_config.json").write_text(json.dumps(cfg))
    peft = json.loads((folder / "adapter_config.json").read_text())
    peft["r"] = 100_000_000
    (folder / "adapter_config.json").write_text(json.dumps(peft))
    t0 = time.perf_counter()
    res = run("inspect", folder)
    assert res.exit_code == 2, res.output
    one_line(res)
    assert time.perf_counter() - t0 < 10


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["adapter_model.safetensors", "adapter_config.json", "matryoshka_config.json"])
def test_fifo_or_folder_instead_of_a_file(nested_src: Path, tmp_path: Path, name: str) -> None:
    import shutil

    for kind in ("fifo", "dir"):
        folder = tmp_path / kind
        shutil.copytree(nested_src, folder)
        (folder / name).unlink()
        if kind == "fifo":
            os.mkfifo(folder / name)
        else:
            (folder / name).mkdir()
        res = run("inspect", folder)
        assert res.exit_code == 2, res.output
        assert "regular file" in one_line(res) or "folder" in res.stderr


@pytest.mark.parametrize("text", ["[" * 100_000, '{"a": 1, "a": 2}', '{"r": NaN}', "\xff\xfe", '{"r": ' + "1" * 5000 + "}"])
def test_hostile_json_config_is_one_line(nested_src: Path, tmp_path: Path, text: str) -> None:
    import shutil

    folder = tmp_path / "a"
    shutil.copytree(nested_src, folder)
    (folder / "adapter_config.json").write_bytes(text.encode("latin-1") if text.startswith("\xff") else text.encode())
    res = run("inspect", folder)
    assert res.exit_code == 2, res.output
    assert "adapter_config.json" in one_line(res)


# -- 7, 8, 9. base folders, devices, data ---------------------------------------------------------
def _break_base(base: Path, case: str, tmp_path: Path) -> None:
    if case == "config missing":
        (base / "config.json").unlink()
    elif case == "config broken":
        (base / "config.json").write_text("{not json")
    elif case == "config unknown model_type":
        cfg = json.loads((base / "config.json").read_text())
        cfg["model_type"] = "no-such-model"
        (base / "config.json").write_text(json.dumps(cfg))
    elif case == "config a folder":
        (base / "config.json").unlink()
        (base / "config.json").mkdir()
    elif case == "index outside":
        outside = tmp_path / "outside"
        outside.mkdir()
        os.replace(base / "model.safetensors", outside / "model.safetensors")
        from mlora_export.io.safetensors import read_header

        keys = read_header(outside / "model.safetensors").tensors
        (base / "model.safetensors.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(keys, "../outside/model.safetensors")}))
    elif case == "index not json":
        (base / "model.safetensors.index.json").write_text("not json")
    elif case == "truncated shard":
        data = (base / "model.safetensors").read_bytes()
        (base / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif case == "int8 target":
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(base / "model.safetensors"))
        key = "model.layers.0.self_attn.q_proj.weight"
        tensors[key] = torch.zeros_like(tensors[key], dtype=torch.int8)
        save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    elif case == "no tokenizer":
        for p in base.iterdir():
            if "token" in p.name or p.name in ("vocab.json", "merges.txt"):
                p.unlink()


BASE_CASES = ["config missing", "config broken", "config unknown model_type", "config a folder", "index outside",
              "index not json", "truncated shard", "int8 target"]


@pytest.mark.parametrize("case", BASE_CASES)
@pytest.mark.parametrize("command", ["merge", "onnx", "eval", "train"])
def test_bad_base_folder_is_refused(proj: Path, tmp_path: Path, case: str, command: str) -> None:
    if command in ("eval", "train") and case == "int8 target":
        pytest.skip("eval and train load the base as transformers does; only exports carry the adapter exactly")
    _break_base(proj / "base", case, tmp_path)
    args = {
        "merge": ["merge", "nested", "--base-model", "base", "--rank", "2"],
        "onnx": ["onnx", "nested", "--base-model", "base", "--no-verify"],
        "eval": ["eval", "nested", "--base-model", "base", "--data", "data/train.jsonl", "--device", "cpu"],
        "train": ["train", "--base-model", "base", "--data", "data/train.jsonl", "--ranks", "2", "--max-steps", "1"],
    }[command]
    before = snapshot(proj)
    res = run(*args, "--output", "out")
    assert res.exit_code == 2, res.output
    one_line(res)
    assert snapshot(proj) == before


def test_base_without_tokenizer_is_named(proj: Path, tmp_path: Path) -> None:
    from mlora_export.base import load_tokenizer
    from mlora_export.errors import BaseModelError

    _break_base(proj / "base", "no tokenizer", tmp_path)
    with pytest.raises(BaseModelError, match="has no tokenizer"):
        load_tokenizer(proj / "base")
    res = run("train", "--base-model", "base", "--data", "data/train.jsonl", "--ranks", "2", "--output", "out")
    assert res.exit_code == 2 and "has no tokenizer" in one_line(res), res.output


@pytest.mark.parametrize("error", [MemoryError("out of memory"), torch.OutOfMemoryError("CUDA out of memory")])
def test_out_of_memory_while_loading_the_base_is_not_a_bad_base(proj: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException) -> None:
    """Running out of memory is the machine's limit, not a fault of the folder: it propagates unchanged
    (exit 1 in the CLI), while any other loader failure stays a BaseModelError (exit 2)."""
    import transformers

    from mlora_export.base import load_base_model
    from mlora_export.errors import BaseModelError

    def fail(*a: object, **kw: object) -> None:
        raise error

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fail)
    with pytest.raises(type(error)) as got:
        load_base_model(proj / "base")
    assert got.value is error and not isinstance(got.value, BaseModelError)
    res = run("eval", "nested", "--base-model", "base", "--data", "data/train.jsonl", "--device", "cpu", "--output", "out")
    assert res.exit_code == 1, res.output
    assert not (proj / "out").exists()
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **kw: (_ for _ in ()).throw(ValueError("bad weights")))
    with pytest.raises(BaseModelError, match="bad weights"):
        load_base_model(proj / "base")


@pytest.mark.parametrize("device", ["bogus", "cuda:7", "cuda:99"])
def test_eval_bad_device(proj: Path, device: str) -> None:
    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.device_count() > int(device.split(":")[1]):
        pytest.skip("that device exists here")
    res = run("eval", "nested", "--base-model", "base", "--data", "data/train.jsonl", "--device", device, "--output", "out")
    assert res.exit_code == 2 and f"device {device!r}" in one_line(res), res.output
    assert not (proj / "out").exists()


def test_overlong_jsonl_record_is_refused_before_it_is_held(proj: Path) -> None:
    from mlora_export.data import MAX_LINE_CHARS, load_jsonl
    from mlora_export.errors import DataError

    big = proj / "data" / "big.jsonl"
    with open(big, "w") as f:
        f.write('{"prompt": "a", "completion": "b"}\n')
        f.write('{"text": "' + "x" * (MAX_LINE_CHARS + 10) + '"}\n')
    with pytest.raises(DataError, match="line 2: longer than"):
        load_jsonl(big)
    (proj / "data" / "deep.jsonl").write_text("[" * 100_000 + "\n")
    with pytest.raises(DataError, match="line 1"):
        load_jsonl(proj / "data" / "deep.jsonl")


@pytest.mark.parametrize("command", ["merge", "train", "eval"])
def test_full_disk_mid_run_is_one_line(proj: Path, monkeypatch: pytest.MonkeyPatch, command: str) -> None:
    import mlora_export.evaluation.plot as plotting
    import mlora_export.io.safetensors as sio

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sio, "_pwrite_all", full)  # merge and train write safetensors
    monkeypatch.setattr(plotting, "plot_rank_curves", full)  # eval writes its plot after results.json
    args = {
        "merge": ["merge", "nested", "--base-model", "base", "--rank", "2"],
        "train": ["train", "--base-model", "base", "--data", "data/train.jsonl", "--ranks", "2", "--max-steps", "1"],
        "eval": ["eval", "nested", "--base-model", "base", "--data", "data/train.jsonl", "--ranks", "2", "--device", "cpu"],
    }[command]
    before = snapshot(proj)
    res = run(*args, "--output", "out")
    assert res.exit_code != 0
    err = one_line(res)
    assert "disk filled up while writing 'out'" in err and re.search(r"\d (B|KiB|MiB|GiB) free", err), err
    assert "0.00 GiB" not in err, err
    assert not (proj / "out").exists() and temporaries(proj) == []
    assert snapshot(proj) == before


def test_transformers_warnings_and_bars_do_not_reach_stderr(proj: Path) -> None:
    """A failing command run as users run it (a subprocess, stderr a pipe) prints one line."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("TRANSFORMERS_VERBOSITY", None)
    (proj / "data" / "bad.jsonl").write_text('{"nope": 1}\n')
    proc = subprocess.run(
        [sys.executable, "-m", "mlora_export", "train", "--base-model", "base", "--data", "data/bad.jsonl", "--ranks", "2", "--output", "out"],
        capture_output=True, text=True, env=env, cwd=proj, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# -- property-based: the header reader and the config loaders ------------------------------------
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from mlora_export.errors import MloraError  # noqa: E402

FUZZ = settings(max_examples=200, deadline=2000, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=12)
json_values = st.recursive(json_scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=20)

dtypes = st.sampled_from(["F32", "F16", "BF16", "I8", "F4", "F64", "BOOL", "X", "f32"])
dims = st.lists(st.integers(0, 6) | st.just(2.0) | st.just("3") | st.just(-1), max_size=3)
offsets = st.lists(st.integers(0, 200) | st.just(1.5) | st.just("4"), min_size=0, max_size=3)
entries = st.fixed_dictionaries({}, optional={"dtype": dtypes, "shape": dims, "data_offsets": offsets})
headers = st.dictionaries(
    st.sampled_from([A_KEY, B_KEY, "__metadata__", "x", ""]),
    entries | json_values,
    max_size=4,
)


@FUZZ
@given(header=headers, data_len=st.integers(0, 128))
def test_fuzz_header_reader_loads_valid_or_raises_ours(header: dict, data_len: int) -> None:
    from mlora_export.errors import InvalidAdapterError
    from mlora_export.io.safetensors import DTYPE_BITS, parse_header

    raw = json.dumps(header).encode()
    try:
        parsed = parse_header(raw, data_len, "fuzz")
    except InvalidAdapterError:
        return
    at = 0
    for info in parsed.tensors.values():  # what it accepts is a well-formed, exact tiling of the data
        assert info.dtype in DTYPE_BITS and all(isinstance(d, int) and d >= 0 for d in info.shape)
        assert info.begin == at
        at = info.end
    assert at == data_len
    assert parsed.metadata is None or all(isinstance(v, str) for v in parsed.metadata.values())


@FUZZ
@given(header=headers, data_len=st.integers(0, 64))
def test_fuzz_header_reader_is_no_looser_than_safetensors(tmp_path_factory: pytest.TempPathFactory, header: dict, data_len: int) -> None:
    """Whatever our reader accepts, the safetensors library opens too."""
    from safetensors import safe_open

    from mlora_export.errors import InvalidAdapterError
    from mlora_export.io.safetensors import read_header

    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path = tmp_path_factory.getbasetemp() / "fuzz.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * data_len)
    try:
        ours = read_header(path)
    except InvalidAdapterError:
        return
    with safe_open(str(path), "np") as f:
        assert sorted(f.keys()) == sorted(ours.tensors)


@FUZZ
@given(raw=st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
def test_fuzz_header_bytes(raw: bytes) -> None:
    from mlora_export.errors import InvalidAdapterError
    from mlora_export.io.safetensors import parse_header

    try:
        parse_header(raw, 0, "fuzz")
    except InvalidAdapterError:
        pass


peft_configs = st.fixed_dictionaries(
    {"peft_type": st.just("LORA") | json_values, "r": st.just(2) | json_values},
    optional={k: json_values | st.booleans() for k in (
        "lora_alpha", "fan_in_fan_out", "use_rslora", "target_modules", "modules_to_save", "task_type", "bias",
        "rank_pattern", "use_dora", "lora_dropout", "layers_to_transform", "base_model_name_or_path")},
)
nested_configs = st.fixed_dictionaries(
    {},
    optional={
        "format": st.just("mlora-nested/1") | json_values,
        "method": st.sampled_from(["matryoshka", "lora", "dylora", "nested-loss"]) | json_values,
        "max_rank": st.just(2) | st.integers(-3, 10**9) | json_values,
        "train_ranks": st.just([1, 2]) | st.lists(st.integers(-2, 5) | json_scalars, max_size=4) | json_values,
        "scaling": st.sampled_from(["sqrt", "rank", "none"]) | json_values,
        "alpha": st.just(1.0) | json_values,
        "p": st.just([1.7071067811865475, 0.7071067811865476]) | st.lists(json_scalars, max_size=3) | json_values,
        "rank_weights": st.just([0.5, 0.5]) | json_values,
    },
)


@FUZZ
@given(peft=peft_configs, nested=nested_configs | st.none())
def test_fuzz_adapter_configs_load_valid_or_raise_ours(tmp_path_factory: pytest.TempPathFactory, peft: dict, nested: dict | None) -> None:
    folder = tmp_path_factory.getbasetemp() / "fuzz-adapter"
    write_adapter(folder, good_header(), struct.pack("<16f", *range(1, 17)))
    (folder / "adapter_config.json").write_text(json.dumps(peft))
    if nested is None:
        (folder / "matryoshka_config.json").unlink(missing_ok=True)
    else:
        (folder / "matryoshka_config.json").write_text(json.dumps(nested))
    try:
        adapter = NestedAdapter.load(folder)
    except MloraError:
        return
    assert adapter.max_rank == peft["r"] == 2
    for key in ("fan_in_fan_out", "use_rslora"):
        assert not isinstance(peft.get(key), str)  # never coerced from a string


@FUZZ
@given(text=st.text(max_size=80) | json_values.map(json.dumps))
def test_fuzz_json_reader(text: str) -> None:
    """Any text parses or raises the error class it is given, never another one (``json``'s own
    ``ValueError``s, a ``RecursionError``, a ``UnicodeDecodeError``)."""
    from mlora_export.errors import InvalidAdapterError
    from mlora_export.io.jsonio import parse_json

    try:
        parse_json(text, "fuzz", InvalidAdapterError)
    except InvalidAdapterError as e:
        assert str(e).startswith("fuzz: ")


manifest_paths = st.sampled_from(["r8/adapter_model.safetensors", "r8", "r8//x", "/x", "r8/../x", "", ".", "a\\b", "r8/./x", "ok/x"]) | st.text(max_size=10)


@FUZZ
@given(files=st.lists(st.fixed_dictionaries({"path": manifest_paths, "size": st.integers(-1, 5) | json_scalars,
                                              "sha256": st.just("0" * 64) | json_scalars}), max_size=4),
       ranks=st.lists(st.fixed_dictionaries({"rank": st.integers(-1, 9) | json_scalars, "path": manifest_paths,
                                              "params": st.just(1) | json_scalars, "bytes": st.just(1) | json_scalars}), max_size=3))
def test_fuzz_manifest_paths_stay_inside(tmp_path_factory: pytest.TempPathFactory, files: list, ranks: list) -> None:
    from mlora_export.converters.hub.bundle import check_manifest
    from mlora_export.errors import InvalidAdapterError

    manifest = {"format": "mlora-bundle/1", "files": files, "ranks": ranks, "nested": {}, "config": {}}
    try:
        check_manifest(manifest, "fuzz")
    except InvalidAdapterError:
        return
    root = tmp_path_factory.getbasetemp() / "root"
    for f in [*files, *ranks]:
        joined = os.path.normpath(os.path.join(root, f["path"]))
        assert joined.startswith(str(root) + os.sep) and ".." not in f["path"].split("/") and "" not in f["path"].split("/")
    assert len({f["path"] for f in files}) == len(files)
    assert len({r["rank"] for r in ranks}) == len(ranks)


# ==============================================================================================
# Issue 23: the second fuzzing pass (nothing lost, nothing silently wrong). Every test below
# failed on the main branch it was written against (see the closing note).
# ==============================================================================================
A_Q = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B_Q = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
REPO_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}


def edit_json(path: Path, **changes: object) -> dict:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))
    return data


def copy_adapter(src: Path, dst: Path, *, plain: bool = False, peft: dict | None = None, nested: dict | None = None) -> Path:
    """A copy of ``src``; ``plain`` drops its matryoshka_config.json; ``peft``/``nested`` edit the two configs."""
    import shutil

    shutil.copytree(src, dst)
    if plain:
        (dst / "matryoshka_config.json").unlink()
    if peft:
        edit_json(dst / "adapter_config.json", **peft)
    if nested:
        edit_json(dst / "matryoshka_config.json", **nested)
    return dst


def scale_tensors(folder: Path, factor: float, keys: tuple[str, ...] = (A_Q, B_Q)) -> None:
    """Multiply some tensors of an adapter's weights file by ``factor`` (in their own dtype)."""
    from safetensors.torch import load_file, save_file

    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    for key in keys:
        tensors[key] = tensors[key] * factor
    save_file(tensors, str(path), metadata={"format": "pt"})


def no_output_left(parent: Path, name: str = "out") -> None:
    assert not (parent / name).exists(), f"{name} was written"
    assert temporaries(parent) == [], temporaries(parent)


# -- 1. non-finite outputs: a scale bound, and finiteness checked in the kernels' own pass -------
#: Each converter, run on the adapter folder ``ADAPTER`` in the project folder (see ``proj``).
CONVERTERS: dict[str, list[str]] = {
    "merge": ["merge", "ADAPTER", "--base-model", "base", "--rank", "8"],
    "renest": ["renest", "ADAPTER"],
    "slice": ["slice", "ADAPTER", "--ranks", "8"],
    "gguf": ["gguf", "ADAPTER", "--base-model", "base", "--ranks", "8"],
    "onnx": ["onnx", "ADAPTER", "--base-model", "base", "--no-verify"],
    "bundle": ["bundle", "ADAPTER", "--ranks", "8"],
}


def converter(name: str, adapter: str, *extra: str) -> list[str]:
    return [adapter if a == "ADAPTER" else a for a in CONVERTERS[name]] + list(extra) + ["--output", "out"]


@pytest.mark.parametrize("command", sorted(CONVERTERS))
def test_huge_scale_is_refused_by_every_converter(proj: Path, command: str) -> None:
    """alpha = 1e300 (with lora_alpha consistent with it) used to write inf/NaN with exit 0."""
    copy_adapter(proj / "nested", proj / "huge", nested={"alpha": 1e300, "p": None}, peft={"lora_alpha": 1e300 * 8**0.5})
    before = snapshot(proj)
    res = run(*converter(command, "huge"))
    assert res.exit_code == 2, res.output
    assert "the largest scale supported" in one_line(res)
    assert snapshot(proj) == before
    no_output_left(proj)


def test_huge_alpha_pattern_is_refused_by_renest(proj: Path) -> None:
    copy_adapter(proj / "nested", proj / "plain", plain=True, peft={"alpha_pattern": {"q_proj": 1e300}})
    res = run("renest", "plain", "--output", "out")
    assert res.exit_code == 2 and "the largest scale supported" in one_line(res) and "q_proj" in res.stderr, res.output
    no_output_left(proj)
    copy_adapter(proj / "nested", proj / "fine", plain=True, peft={"alpha_pattern": {"q_proj": 3.0}})
    assert run("renest", "fine", "--output", "out").exit_code == 0


@pytest.mark.parametrize("kernel", ["numpy", "c-generic", "c-avx2"])
def test_merge_kernels_report_non_finite_outputs_in_their_pass(kernel: str) -> None:
    """The kernels say whether what they wrote is finite in the output dtype, to the last value
    before rounding overflows it (bfloat16: 3.3961e38 rounds to infinity, float16: 65520)."""
    import numpy as np

    from mlora_export.converters import merge_kernels as mk

    build = None
    if kernel != "numpy":
        builds = mk._merge_ext.builds() if mk._merge_ext is not None else ()
        if kernel.split("-")[1] not in builds:
            pytest.skip(f"the compiled kernel's {kernel} build does not run here")
        build = builds.index(kernel.split("-")[1])

    def merge(value: float, n: int, out_dtype: str) -> bool:
        w = np.zeros((3, n), np.float32)
        left = np.ones((3, 1), np.float32)
        right = np.full((1, n), value, np.float32)
        out = np.empty((3, n), mk.NUMPY_TYPES[out_dtype])
        if build is None:
            return mk.merge_tensor(w, "F32", left, right, out, out_dtype, kernel="numpy")
        return mk._merge_ext.merge(w, mk._C_CODES["F32"], left, right, out, mk._C_CODES[out_dtype], 3, n, 1, build)

    def cast(values: list[float], out_dtype: str) -> bool:
        src = np.array(values, np.float32)
        out = np.empty(len(values), mk.NUMPY_TYPES[out_dtype])
        if build is None:
            return mk.cast(src, "F32", out, out_dtype, kernel="numpy")
        return mk._merge_ext.cast(src, mk._C_CODES["F32"], out, mk._C_CODES[out_dtype], len(values), build)

    for n in (2, 3, 17, 40):  # even/odd rows (numpy's pair path), a partial strip of 16 (AVX2)
        assert merge(1.5, n, "F32") is True
        assert merge(1e20, n, "F32") is True
        assert merge(3.0e38, n, "BF16") is True
        assert merge(3.3962e38, n, "BF16") is False  # finite in float32, infinite in bfloat16
        assert merge(float("inf"), n, "F32") is False
        assert merge(float("nan"), n, "BF16") is False
        if build is not None:  # the numpy kernels leave float16 to torch
            assert merge(65519.0, n, "F16") is True and merge(65520.0, n, "F16") is False
    assert cast([1.0, 3.0e38, -2.0] * 5, "BF16") is True
    assert cast([1.0, -3.3962e38, -2.0] * 5, "BF16") is False
    if build is not None:
        assert cast([1.0, 65519.0, -2.0] * 5, "F16") is True
        assert cast([1.0] * 9 + [65520.0], "F16") is False and cast([65520.0] + [1.0] * 9, "F16") is False  # scalar tail, vector part


@pytest.fixture
def overflowing(proj: Path) -> Path:
    """nested/ with the q_proj factors of layer 0 times 1e20: finite weights, a sane scale, but
    B·A (1e40) overflows float32 and A alone overflows float16."""
    copy_adapter(proj / "nested", proj / "big")
    scale_tensors(proj / "big", 1e20)
    return proj / "big"


@pytest.mark.parametrize("command, extra, tensor", [
    ("merge", [], "model.layers.0.self_attn.q_proj.weight"),
    ("renest", ["--dtype", "float16"], A_Q),
    ("gguf", ["--outtype", "f16"], "blk.0.attn_q.weight.lora_a"),
    ("onnx", ["--merged", "--rank", "8"], "model.layers.0.self_attn.q_proj.weight"),
])
def test_overflow_in_the_computed_output_is_refused(proj: Path, overflowing: Path, command: str, extra: list[str], tensor: str) -> None:
    before = snapshot(proj)
    res = run(*converter(command, "big", *extra))
    assert res.exit_code == 2, res.output
    err = one_line(res)
    assert "infinite or NaN" in err and tensor in err, err
    assert snapshot(proj) == before
    no_output_left(proj)


def test_merge_of_a_float64_base_checks_what_torch_computes(proj: Path, overflowing: Path) -> None:
    """float64 weights are merged (and cast) by torch, not the kernels: the same check applies."""
    from safetensors.torch import load_file, save_file

    path = proj / "base" / "model.safetensors"
    tensors = {k: v.double() for k, v in load_file(str(path)).items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    res = run("merge", "big", "--base-model", "base", "--rank", "8", "--dtype", "float32", "--output", "out")
    assert res.exit_code == 2 and "'model.layers.0.self_attn.q_proj.weight'" in one_line(res), res.output
    no_output_left(proj)
    assert run("merge", "nested", "--base-model", "base", "--rank", "8", "--dtype", "float32", "--output", "out").exit_code == 0
    tensors["model.norm.weight"][0] = 1e300  # a float64 weight no float32 holds
    save_file(tensors, str(path), metadata={"format": "pt"})
    res = run("merge", "nested", "--base-model", "base", "--rank", "8", "--dtype", "float32", "--output", "out2")
    assert res.exit_code == 2 and "the base weight 'model.norm.weight'" in one_line(res), res.output
    no_output_left(proj, "out2")


def test_baked_slices_that_overflow_float16_are_refused(proj: Path, tiny_base: Path) -> None:
    """float16 B of 30000 times s(k) = 4 is 120000: beyond float16. The native mode (exact
    prefix, the scale in lora_alpha) is fine."""
    import torch
    from transformers import LlamaForCausalLM

    random_nested(LlamaForCausalLM.from_pretrained(tiny_base), proj / "f16", arch="llama", r=8, train_ranks=(4, 8),
                  scaling="none", alpha=4.0, dtype=torch.float16)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(proj / "f16/adapter_model.safetensors"))
    tensors[B_Q] = torch.full_like(tensors[B_Q], 30000.0)
    save_file(tensors, str(proj / "f16/adapter_model.safetensors"), metadata={"format": "pt"})
    for command in ("slice", "gguf", "bundle"):
        res = run(*converter(command, "f16"))
        assert res.exit_code == 2, (command, res.output)
        assert "infinite or NaN values in float16" in one_line(res) and B_Q in res.stderr, res.stderr
        no_output_left(proj)
    assert run("slice", "f16", "--ranks", "8", "--scale-mode", "native", "--output", "out").exit_code == 0


# -- 2. the final rename never replaces an output that appeared during the run -------------------
_WAITING_SLICE = """
import os, sys, time
import mlora_export.converters.slice as s
real = s.write_slices
def waiting(*a, **k):
    out = real(*a, **k)
    print("READY", flush=True)
    while not os.path.exists(sys.argv[3]):
        time.sleep(0.02)
    return out
s.write_slices = waiting
from mlora_export.cli.main import main
main(["slice", sys.argv[1], "--ranks", sys.argv[4], "--output", sys.argv[2], *sys.argv[5:]])
"""


def start_waiting_slice(adapter: Path, out: Path, go: Path, ranks: str, *extra: str) -> subprocess.Popen:
    """A real ``mlora-export slice`` process that stops, its output written to its temporary
    folder, until the file ``go`` exists; returns once it is there."""
    proc = subprocess.Popen([sys.executable, "-c", _WAITING_SLICE, str(adapter), str(out), str(go), ranks, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=REPO_ENV, cwd=out.parent)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != "READY":
        proc.kill()
        raise AssertionError(f"the slice did not get to its last step: {line!r} {proc.communicate()[1]}")
    return proc


def finish(proc: subprocess.Popen, go: Path) -> tuple[int, str]:
    go.touch()
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def kept_result(err: str) -> Path:
    m = re.search(r"the new result is kept as '([^']+)'", err)
    assert m, err
    return Path(m.group(1))


def test_two_concurrent_runs_into_one_output_lose_nothing(nested_src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = start_waiting_slice(nested_src, out, tmp_path / "go-first", "2")
    second = start_waiting_slice(nested_src, out, tmp_path / "go-second", "4")
    try:
        assert finish(first, tmp_path / "go-first") == (0, "")
        code, err = finish(second, tmp_path / "go-second")
    finally:
        first.kill()
        second.kill()
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "appeared while this command was writing it" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["r2"]  # the first result stays
    kept = kept_result(err)
    if not kept.is_absolute():
        kept = tmp_path / kept
    assert sorted(p.name for p in kept.iterdir()) == ["r4"]  # the second is kept, complete
    assert NestedAdapter.load(kept / "r4").max_rank == 4
    assert temporaries(tmp_path) == []


def test_a_folder_made_during_the_run_is_left_as_it_is(nested_src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = start_waiting_slice(nested_src, out, tmp_path / "go", "2")
    try:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        code, err = finish(proc, tmp_path / "go")
    finally:
        proc.kill()
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--force" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    kept = kept_result(err)
    assert (tmp_path / kept.name / "r2" / "adapter_model.safetensors").is_file()
    # an empty folder made by hand is the user's too
    out2 = tmp_path / "out2"
    proc = start_waiting_slice(nested_src, out2, tmp_path / "go2", "2")
    try:
        out2.mkdir()
        code, err = finish(proc, tmp_path / "go2")
    finally:
        proc.kill()
    assert code == 2 and list(out2.iterdir()) == [], err


def test_force_replaces_a_folder_made_during_the_run(nested_src: Path, tmp_path: Path) -> None:
    """The control: with --force the same folder is replaced (once the new output is complete)."""
    out = tmp_path / "out"
    proc = start_waiting_slice(nested_src, out, tmp_path / "go", "2", "--force")
    try:
        out.mkdir()
        (out / "old.txt").write_text("replace me")
        code, err = finish(proc, tmp_path / "go")
    finally:
        proc.kill()
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["r2"] and temporaries(tmp_path) == []


@pytest.mark.parametrize("native", [True, False], ids=["renameat2", "mkdir-claim"])
def test_rename_noreplace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    """The OS's own no-replace rename, and the fallback where there is none."""
    import mlora_export.fs as fs

    if not native:
        monkeypatch.setattr(fs, "_LIBC", None)
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("new")
    for taken in ("empty", "full", "file"):
        dst = tmp_path / taken
        if taken == "file":
            dst.write_text("x")
        else:
            dst.mkdir()
            if taken == "full":
                (dst / "g").write_text("x")
        with pytest.raises(FileExistsError):
            fs.rename_noreplace(src, dst)
        assert (src / "f").read_text() == "new" and dst.exists()
    fs.rename_noreplace(src, tmp_path / "free")
    assert (tmp_path / "free" / "f").read_text() == "new" and not src.exists()
    (tmp_path / "a.txt").write_text("a")
    with pytest.raises(FileExistsError):
        fs.rename_noreplace(tmp_path / "a.txt", tmp_path / "file")
    fs.rename_noreplace(tmp_path / "a.txt", tmp_path / "b.txt")
    assert (tmp_path / "b.txt").read_text() == "a" and not (tmp_path / "a.txt").exists()


# -- 3. untrusted numbers and types: no OverflowError, ASCII digits only, typed fields ----------
def test_huge_integers_are_not_finite_reals() -> None:
    from mlora_export.validate import ascii_int, is_finite_real

    assert is_finite_real(10**400) is False and is_finite_real(-(10**400)) is False
    assert is_finite_real(10**300) is True and is_finite_real(2.5) is True and is_finite_real(True) is False
    assert ascii_int("08") == 8 and ascii_int("²") is None and ascii_int("٨") is None and ascii_int("1_0") is None
    assert ascii_int(" 8") is None and ascii_int("+8") is None and ascii_int("9" * 19) is None


@pytest.mark.parametrize("where, edit", [
    ("nested", {"alpha": 10**400}),
    ("nested", {"rank_weights": [10**400, 1, 1, 1], "method": "nested-loss"}),
    ("nested", {"p": [10**400] * 8}),
    ("plain", {"lora_alpha": 10**400}),
    ("plain", {"lora_dropout": 10**400}),
])
def test_huge_json_integers_are_refused_not_crashing(proj: Path, where: str, edit: dict) -> None:
    if where == "nested":
        copy_adapter(proj / "nested", proj / "a", nested=edit)
    else:
        copy_adapter(proj / "nested", proj / "a", plain=True, peft=edit)
    for args in (["inspect", "a"], ["slice", "a", "--ranks", "2", "--output", "out"]):
        res = run(*args)
        assert res.exit_code == 2, res.output
        one_line(res)
    no_output_left(proj)


def test_json_numbers_beyond_float_range_are_refused() -> None:
    from mlora_export.errors import ConfigError
    from mlora_export.io.jsonio import parse_json

    with pytest.raises(ConfigError, match="beyond the range"):
        parse_json('{"alpha": 1e400}', "x.json", ConfigError)
    assert parse_json('{"alpha": 1e300}', "x.json", ConfigError) == {"alpha": 1e300}


def latency_edit(ms: dict, machine: object = None) -> object:
    def edit(manifest: dict, files: dict) -> None:
        manifest["latency"] = {"ms": ms, **({"machine": machine} if machine is not None else {})}
    return edit


@pytest.mark.parametrize("case, ms, machine", [
    ("superscript two", {"0": 1.0, "2": 9.0, "4": 9.0, "8": 9.0, "²": 0.5}, None),
    ("arabic-indic eight", {"0": 1.0, "2": 9.0, "4": 9.0, "٨": 0.5}, None),
    ("fullwidth four", {"0": 1.0, "2": 9.0, "４": 0.5, "8": 9.0}, None),
    ("machine a string", {"0": 1.0, "2": 9.0, "4": 9.0, "8": 9.0}, "x86"),
    ("machine a list", {"0": 1.0, "2": 9.0, "4": 9.0, "8": 9.0}, ["x86"]),
])
def test_latency_records_are_read_strictly(hub, bundle_files: dict, tmp_path: Path, hub_env: None, case: str, ms: dict, machine: object) -> None:
    repo = seed(hub, "latency-" + case.replace(" ", "-"), bundle_files, latency_edit(ms, machine))
    res = run("pull", repo, "--rank", "auto", "--max-latency-ms", "1", "--output", tmp_path / "out", "--endpoint", hub.endpoint)
    assert res.exit_code == 2, res.output
    assert "latency" in one_line(res)
    no_output_left(tmp_path)


@pytest.mark.parametrize("args", [
    ["slice", "nested", "--ranks", "٨"],
    ["slice", "nested", "--ranks", "2,²"],
    ["renest", "nested", "--max-rank", "٢"],
    ["merge", "nested", "--base-model", "base", "--rank", "８"],
    ["pull", "org/x", "--rank", "٨", "--endpoint", "http://127.0.0.1:9"],
    ["pull", "org/x", "--rank", "auto", "--max-bytes", "9" * 400, "--endpoint", "http://127.0.0.1:9"],
    ["train", "--base-model", "base", "--data", "data/train.jsonl", "--ranks", "2,4", "--rank-weights", "١,١"],
    ["train", "--base-model", "base", "--data", "data/train.jsonl", "--ranks", "2", "--max-steps", "1_0"],
])
def test_command_line_numbers_are_ascii_and_finite(proj: Path, args: list[str]) -> None:
    before = snapshot(proj)
    res = run(*args, "--output", "out")
    assert res.exit_code == 2, res.output
    one_line(res)
    assert snapshot(proj) == before


# -- 4. pull --rank auto: budgets from what is listed and verified; scores from the recorded evaluation --
def test_pull_budget_uses_the_listed_files_not_the_declared_bytes(hub, bundle_files: dict, tmp_path: Path, hub_env: None) -> None:
    def tiny_r8(manifest: dict, files: dict) -> None:
        next(r for r in manifest["ranks"] if r["rank"] == 8)["bytes"] = 10

    repo = seed(hub, "bytes-lie", bundle_files, tiny_r8)
    res = run("pull", repo, "--rank", "auto", "--max-bytes", "1000", "--output", tmp_path / "out", "--endpoint", hub.endpoint)
    assert res.exit_code == 2 and "add up to" in one_line(res), res.output
    no_output_left(tmp_path)


def test_pull_budget_params_are_checked_against_the_tensors(hub, bundle_files: dict, tmp_path: Path, hub_env: None) -> None:
    def tiny_params(manifest: dict, files: dict) -> None:
        for r in manifest["ranks"]:
            r["params"] = r["rank"]  # consistent between ranks, and false

    repo = seed(hub, "params-lie", bundle_files, tiny_params)
    res = run("pull", repo, "--rank", "auto", "--max-params", "100", "--output", tmp_path / "out", "--endpoint", hub.endpoint)
    assert res.exit_code == 2 and "its tensors hold" in one_line(res), res.output
    no_output_left(tmp_path)
    # the honest bundle: the same limit fits no rank, and says so
    res = run("pull", seed(hub, "params-honest", bundle_files), "--rank", "auto", "--max-params", "100", "--output", tmp_path / "out",
              "--endpoint", hub.endpoint)
    assert res.exit_code == 2 and "no rank fits" in one_line(res), res.output


@pytest.fixture(scope="module")
def scored_bundle_files(nested_src: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """A bundle at ranks 2, 4, 8 of an adapter with a recorded accuracy evaluation (50, 70, 90 %)."""
    import shutil

    from mlora_export.adapter import record_in_config
    from mlora_export.converters.hub import BundleOptions, write_bundle

    root = tmp_path_factory.mktemp("scored")
    shutil.copytree(nested_src, root / "nested")
    record_in_config(root / "nested", "evaluation", "accuracy", {
        "metric": "accuracy", "higher_is_better": True, "data": "test.jsonl",
        "ranks": [{"rank": 2, "score": 0.5}, {"rank": 4, "score": 0.7}, {"rank": 8, "score": 0.9}], "aurac": {"v1": 0.7, "v2": 0.7}})
    write_bundle(root / "nested", (2, 4, 8), root / "bundle", BundleOptions(base_model_id="org/tiny-llama"))
    return {p.relative_to(root / "bundle").as_posix(): p.read_bytes() for p in (root / "bundle").rglob("*") if p.is_file()}


def test_pull_refuses_scores_that_disagree_with_the_recorded_evaluation(hub, scored_bundle_files: dict, tmp_path: Path, hub_env: None) -> None:
    args = ("--rank", "auto", "--min-score", "80", "--endpoint", hub.endpoint)
    res = run("pull", seed(hub, "scored", scored_bundle_files), *args, "--output", tmp_path / "ok")
    assert res.exit_code == 0 and "rank 8" in res.output, res.output  # the control: 90 % at rank 8

    def better_r2(manifest: dict, files: dict) -> None:
        next(r for r in manifest["ranks"] if r["rank"] == 2)["metrics"]["accuracy"] = 0.95

    res = run("pull", seed(hub, "scored-edited", scored_bundle_files, better_r2), *args, "--output", tmp_path / "out")
    assert res.exit_code == 2 and "does not match the bundle's ranks" in one_line(res), res.output
    no_output_left(tmp_path)


def test_pull_reads_higher_is_better_as_a_boolean(hub, scored_bundle_files: dict, tmp_path: Path, hub_env: None) -> None:
    def as_text(manifest: dict, files: dict) -> None:
        manifest["evaluation"]["accuracy"]["higher_is_better"] = "false"

    res = run("pull", seed(hub, "scored-text", scored_bundle_files, as_text), "--rank", "auto", "--min-score", "80",
              "--output", tmp_path / "out", "--endpoint", hub.endpoint)
    assert res.exit_code == 2 and "higher_is_better must be true or false" in one_line(res), res.output
    no_output_left(tmp_path)


# -- 5. adapter_config.json: one typed reader, PEFT's own target rule ----------------------------
@pytest.mark.parametrize("edit, message", [
    ({"use_rslora": "true"}, "use_rslora must be true or false"),
    ({"use_rslora": "false"}, "use_rslora must be true or false"),
    ({"target_modules": 5}, "target_modules must be"),
    ({"fan_in_fan_out": "false"}, "fan_in_fan_out must be true or false"),
    ({"lora_dropout": "0.1"}, "lora_dropout must be"),
])
def test_renest_reads_adapter_config_as_every_command_does(proj: Path, edit: dict, message: str) -> None:
    """Re-nesting had a reader of its own that took ``"true"`` and ``"false"`` as true (the other
    commands, through ``NestedAdapter.load``, refused them: test_wrong_json_types_are_refused_not_coerced)."""
    copy_adapter(proj / "nested", proj / "plain", plain=True, peft=edit)
    res = run(*converter("renest", "plain"))
    assert res.exit_code == 2 and message in one_line(res), res.output
    no_output_left(proj)


@pytest.mark.parametrize("peft, module", [
    ({"target_modules": ["nonexistent"]}, "model.layers.0.self_attn.q_proj"),
    ({"target_modules": ["q_proj"]}, "model.layers.0.self_attn.k_proj"),
    ({"target_modules": "model\\.layers\\.1\\..*"}, "model.layers.0.self_attn.q_proj"),
    ({"layers_to_transform": [1]}, "model.layers.0.self_attn.q_proj"),
    ({"exclude_modules": ["v_proj"]}, "model.layers.0.self_attn.v_proj"),
])
@pytest.mark.parametrize("command", ["inspect", "slice", "merge", "renest"])
def test_tensors_peft_would_not_apply_are_refused(proj: Path, peft: dict, module: str, command: str) -> None:
    copy_adapter(proj / "nested", proj / "a", peft=peft)
    args = ["inspect", "a"] if command == "inspect" else converter(command, "a")
    res = run(*args)
    assert res.exit_code == 2, res.output
    err = one_line(res)
    assert "PEFT would not apply it" in err and repr(module) in err, err
    no_output_left(proj)


@pytest.mark.parametrize("target", [".*_proj", "all-linear", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]])
def test_target_modules_that_select_every_tensor_are_accepted(proj: Path, target: object) -> None:
    """The control of the test above: what PEFT applies whole is accepted."""
    copy_adapter(proj / "nested", proj / "a", peft={"target_modules": target})
    assert run("slice", "a", "--ranks", "2", "--output", "out").exit_code == 0


def test_bundle_reads_the_recorded_evaluation_typed(proj: Path) -> None:
    from mlora_export.adapter import record_in_config

    record_in_config(proj / "nested", "evaluation", "loss", {
        "metric": "loss", "higher_is_better": "false", "ranks": [{"rank": 2, "score": 1.0}, {"rank": 8, "score": 0.5}]})
    res = run("bundle", "nested", "--ranks", "2,8", "--output", "out")
    assert res.exit_code == 2 and "higher_is_better must be true or false" in one_line(res), res.output
    no_output_left(proj)


# -- 6. gguf: the base config is checked against the adapter before its numbers are used --------
def gguf_base(proj: Path, **changes: object) -> Path:
    import shutil

    shutil.copytree(proj / "base", proj / "gbase")
    edit_json(proj / "gbase" / "config.json", **changes)
    return proj / "gbase"


def test_gguf_does_not_loop_on_a_huge_layer_count(proj: Path) -> None:
    gguf_base(proj, num_hidden_layers=10**9)
    proc = subprocess.run([sys.executable, "-m", "mlora_export", "gguf", "nested", "--base-model", "gbase", "--ranks", "8", "--output", "out"],
                          capture_output=True, text=True, env=REPO_ENV, cwd=proj, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "num_hidden_layers" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    no_output_left(proj)


@pytest.mark.parametrize("changes, message", [
    ({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "num_attention_heads": "4"}, "num_attention_heads must be a positive integer"),
    ({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "num_attention_heads": 0}, "num_attention_heads must be a positive integer"),
    ({"num_key_value_heads": 2}, "'model.layers.0.self_attn.k_proj' has 32 output features but"),
    ({"hidden_size": 64, "head_dim": 16}, "'model.layers.0.self_attn.q_proj' has 32 input features but"),
    ({"intermediate_size": 64}, "'model.layers.0.mlp.gate_proj' has 48 output features but"),
    ({"num_key_value_heads": 3}, "do not divide"),
])
def test_gguf_checks_the_base_config_against_the_adapter(proj: Path, changes: dict, message: str) -> None:
    gguf_base(proj, **changes)
    res = run("gguf", "nested", "--base-model", "gbase", "--ranks", "8", "--output", "out")
    assert res.exit_code == 2 and message in one_line(res), res.output
    no_output_left(proj)


# -- 8. a full disk: the space message, exit 2, one line, sizes in human units -------------------
def test_space_messages_use_human_sizes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil as sh

    from mlora_export.errors import InsufficientDiskError
    from mlora_export.fs import check_free_space, disk_full_error

    monkeypatch.setattr(sh, "disk_usage", lambda p: sh._ntuple_diskusage(10**9, 10**9 - 300, 300))  # type: ignore[attr-defined]
    with pytest.raises(InsufficientDiskError) as e:
        check_free_space(tmp_path, 1000)
    assert "need about 1000 B, 300 B free" in str(e.value), str(e.value)
    full = disk_full_error(OSError(errno.ENOSPC, "No space left on device"), tmp_path / "out", 5000)
    assert full is not None and "it needs about 4.9 KiB, 300 B free" in str(full), str(full)


def test_numpys_short_write_is_a_full_disk(tmp_path: Path) -> None:
    """numpy's ``tofile`` reports a refused write as ``OSError("N requested and 0 written")``
    without an errno (what the gguf package's writer raised on a full disk): /dev/full gives one."""
    import numpy as np

    from mlora_export.fs import disk_full_error

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    with open("/dev/full", "wb") as f, pytest.raises(OSError) as e:
        np.zeros(1 << 18, np.float32).tofile(f)
    assert e.value.errno is None
    full = disk_full_error(e.value, tmp_path / "out", 4096)
    assert full is not None and "the disk filled up while writing" in str(full)


@contextlib.contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` (a real full disk); skips where mounting is not allowed."""
    path.mkdir()
    if not shutil.which("mount") or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                                   capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], capture_output=True)


def test_gguf_on_a_full_disk_says_so(proj: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a real full disk the gguf package's writer (numpy's tofile) loses the tensors without an
    error: the file is shorter than the writer believes, which is a full disk, exit 2."""
    with small_disk(tmp_path / "disk", "200k") as disk:
        (disk / "filler").write_bytes(b"\0" * 190_000)
        res = run("gguf", "nested", "--base-model", "base", "--ranks", "8", "--output", disk / "out")
        assert res.exit_code == 2, res.output
        err = one_line(res)
        assert "disk" in err and "free" in err and "0.00 GiB" not in err, err
        assert sorted(p.name for p in disk.iterdir()) == ["filler"]
        # past the check made up front: the disk fills up while the file is written
        import mlora_export.converters.gguf as g

        monkeypatch.setattr(g, "check_free_space", lambda *a, **k: None)
        res = run("gguf", "nested", "--base-model", "base", "--ranks", "8", "--output", disk / "out")
        assert res.exit_code == 2, res.output
        assert "the disk filled up while writing" in one_line(res), res.stderr
        assert sorted(p.name for p in disk.iterdir()) == ["filler"]


_FULL_DISK_TRAIN = """
import errno, sys
import mlora_export.io.safetensors as sio
def full(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")
sio._pwrite_all = full
from mlora_export.cli.main import main
main(["train", "--base-model", "base", "--data", "data/train.jsonl", "--ranks", "2", "--max-steps", "1", "--output", "out"])
"""


def test_train_on_a_full_disk_prints_one_line(proj: Path) -> None:
    """As users run it (a process, stderr a pipe): no library warning before the error."""
    env = dict(REPO_ENV)
    env.pop("TRANSFORMERS_VERBOSITY", None)
    proc = subprocess.run([sys.executable, "-c", _FULL_DISK_TRAIN], capture_output=True, text=True, env=env, cwd=proj, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "disk filled up" in proc.stderr, proc.stderr
    no_output_left(proj)


# -- 9. click's option errors are one line, exit 2, for every command and option ----------------
def _bad_value_options() -> list[tuple[str, str]]:
    """``(command, option)`` for every option of every command whose type can refuse a value."""
    import click

    from mlora_export.cli._options import ModuleList

    out = []
    for name, cmd in sorted(main.commands.items()):
        for p in cmd.params:
            if isinstance(p, click.Option) and not p.is_flag and not p.count and not isinstance(
                    p.type, (click.Path, click.types.StringParamType, ModuleList)):
                out.append((name, p.opts[0]))
    return out


@pytest.mark.parametrize("command, option", _bad_value_options())
def test_every_bad_option_value_is_one_line(command: str, option: str, tmp_path: Path) -> None:
    res = run(command, option, "not-a-value!")
    assert res.exit_code == 2, res.output
    err = one_line(res)
    assert option in err and "--help" in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", sorted(["inspect", "slice", "renest", "merge", "bundle", "push-hub", "pull", "demo", "train", "onnx", "gguf", "eval"]))
def test_unknown_and_missing_options_are_one_line(command: str) -> None:
    res = run(command, "--no-such-option")
    assert res.exit_code == 2 and "No such option" in one_line(res), res.output
    res = run(command)
    if command != "demo":  # demo has defaults for everything
        assert res.exit_code == 2, res.output
        one_line(res)


@pytest.mark.parametrize("args", [
    ["renest", "x", "--output", "o", "--max-rank", "0"],
    ["pull", "org/x", "--rank", "1e1", "--output", "o"],
    ["pull", "org/x", "--rank", "auto", "--max-bytes", "0", "--output", "o"],
    ["pull", "org/x", "--rank", "8", "--max-bytes", "1MB", "--output", "o"],  # a usage error raised by the command
    ["nosuchcommand"],
])
def test_the_reported_option_errors_are_one_line(args: list[str]) -> None:
    res = run(*args)
    assert res.exit_code == 2, res.output
    one_line(res)


# -- 10. credentials in an endpoint URL are never shown or recorded ------------------------------
def test_endpoint_credentials_are_redacted_in_messages(tmp_path: Path, hub_env: None) -> None:
    for endpoint in ("http://user:secret@127.0.0.1:9", "ftp://user:secret@host", "http://a:b@c:secret@127.0.0.1:9/x"):
        res = run("pull", "org/x", "--rank", "2", "--output", tmp_path / "out", "--endpoint", endpoint)
        assert res.exit_code != 0, res.output
        assert "secret" not in res.output and "***@" in one_line(res), res.output


def test_endpoint_credentials_are_not_recorded_by_pull(bundle_files: dict, tmp_path: Path, hub_env: None) -> None:
    from tests.hub_server import HubServer

    with HubServer(tmp_path / "hub", basic_auth=("user", "secret")) as hub:  # a mirror behind a proxy that takes Basic auth
        hub.seed_repo("org/b", bundle_files)
        plain = hub.endpoint
        endpoint = plain.replace("http://", "http://user:secret@")
        res = run("pull", "org/b", "--rank", "8", "--output", tmp_path / "out", "--endpoint", endpoint, "--json")
        assert res.exit_code == 0, res.output
        assert hub.bugs == []
    assert "secret" not in res.output
    source = json.loads((tmp_path / "out/bundle/source.json").read_text())
    assert source["endpoint"] == plain.replace("http://", "http://***@")
    assert not any(b"secret" in p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file())


# -- the same root causes, found in places the issue does not name ------------------------------
def test_inspect_shows_ill_typed_energy_without_crashing(proj: Path) -> None:
    copy_adapter(proj / "nested", proj / "a", nested={"energy": ["a"] * 8})
    res = run("inspect", "a")
    assert res.exit_code == 0 and "energy" not in res.output, res.output


def test_merge_dtype_with_an_index_whose_metadata_is_not_an_object(proj: Path, tmp_path: Path) -> None:
    from mlora_export.io.safetensors import read_header

    keys = read_header(proj / "base" / "model.safetensors").tensors
    (proj / "base" / "model.safetensors.index.json").write_text(json.dumps({"metadata": [1], "weight_map": dict.fromkeys(keys, "model.safetensors")}))
    res = run("merge", "nested", "--base-model", "base", "--rank", "2", "--dtype", "bfloat16", "--output", "out")
    assert res.exit_code == 0, res.output
    index = json.loads((proj / "out" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] > 0


# -- property tests: the number and type checks of the manifest and config readers ---------------
digit_keys = st.sampled_from(["0", "2", "4", "8", "08", "²", "٨", "４", "1_0", " 8", "-1", "", "9" * 30]) | st.text(max_size=4)


@FUZZ
@given(value=json_values | st.integers(-(10**500), 10**500) | st.floats())
def test_fuzz_number_checks_never_raise(value: object) -> None:
    import math

    from mlora_export.validate import ascii_int, is_finite_real

    got = is_finite_real(value)
    if got:
        assert math.isfinite(float(value))  # type: ignore[arg-type]
    text = str(value)
    k = ascii_int(text)
    assert k is None or (text.isascii() and text.isdigit() and k == int(text))


@FUZZ
@given(ms=st.dictionaries(digit_keys, json_scalars, max_size=4), machine=json_values,
       higher=json_scalars, scores=st.lists(json_scalars, min_size=3, max_size=3))
def test_fuzz_manifest_numbers_and_types(bundle_files: dict, ms: dict, machine: object, higher: object, scores: list) -> None:
    from mlora_export.converters.hub.bundle import BundleRank, check_manifest
    from mlora_export.converters.hub.choose import RankBudget, choose_rank_by_budget
    from mlora_export.errors import InvalidAdapterError

    manifest = json.loads(bundle_files["manifest.json"])
    manifest["latency"] = {"ms": ms, "machine": machine}
    manifest["evaluation"] = {"accuracy": {"metric": "accuracy", "higher_is_better": higher}}
    for r, s in zip(manifest["ranks"], scores):
        r["metrics"] = {"accuracy": s}
    try:
        check_manifest(manifest, "fuzz")
    except InvalidAdapterError:
        return
    assert all(k.isascii() and k.isdigit() for k in ms)
    assert machine is None or isinstance(machine, dict)
    assert higher is None or isinstance(higher, bool)
    ranks = [BundleRank(r["rank"], r["path"], r["params"], r["bytes"], dict(r.get("metrics") or {})) for r in manifest["ranks"]]
    for budget in (RankBudget(max_latency_ms=5.0), RankBudget(min_score=50.0), RankBudget(max_latency_ms=5.0, within=1.0)):
        try:
            choose_rank_by_budget(ranks, budget, manifest)
        except MloraError:
            pass


bool_keys = ("fan_in_fan_out", "use_rslora", "use_dora", "lora_bias", "inference_mode")
typed_configs = st.fixed_dictionaries(
    {"peft_type": st.just("LORA"), "r": st.just(2)},
    optional={**{k: st.booleans() | st.sampled_from(["true", "false", 1, 0, None]) for k in bool_keys},
              "lora_alpha": st.just(2) | json_scalars | st.integers(-(10**400), 10**400),
              "target_modules": st.just(["q_proj"]) | st.just("q_proj") | st.just("all-linear") | json_values,
              "layers_to_transform": st.just([0]) | json_values, "layers_pattern": st.just("layers") | json_values,
              "exclude_modules": json_values, "lora_dropout": json_scalars, "task_type": json_values},
)


@FUZZ
@given(peft=typed_configs)
def test_fuzz_every_adapter_config_reader_refuses_wrong_types(tmp_path_factory: pytest.TempPathFactory, peft: dict) -> None:
    """``NestedAdapter.load`` (inspect, slice, merge, gguf, onnx, bundle) and re-nesting read
    ``adapter_config.json`` through one typed reader: what either accepts has every key of its type."""
    from mlora_export.converters.renest import _read_source

    folder = tmp_path_factory.getbasetemp() / "fuzz-typed"
    write_adapter(folder, good_header(), struct.pack("<16f", *range(1, 17)))
    (folder / "adapter_config.json").write_text(json.dumps(peft))
    for read in (NestedAdapter.load, _read_source):
        try:
            read(folder)
        except MloraError:
            continue
        for key in bool_keys:
            assert key not in peft or isinstance(peft[key], bool), (read, key, peft[key])
        assert peft.get("target_modules") is None or isinstance(peft["target_modules"], str) or all(isinstance(t, str) for t in peft["target_modules"])
        alpha = peft.get("lora_alpha", 8)
        assert not isinstance(alpha, bool) and isinstance(alpha, (int, float)) and 0 < alpha <= 2e6


module_names = st.sampled_from([
    "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.12.mlp.down_proj",
    "transformer.h.3.attn.c_attn", "model.layers.2.mlp.experts.5.w1", "lm_head", "q_proj",
])
target_lists = st.lists(st.sampled_from(["q_proj", "self_attn.q_proj", "down_proj", "c_attn", "w1", "lm_head", "model.layers.1.self_attn.q_proj", "proj"]), max_size=3)
target_regexes = st.sampled_from([".*q_proj", "model\\.layers\\.[01]\\..*", ".*\\.(q|k)_proj", "lm_head", ".*attn.*"])


@FUZZ
@given(key=module_names, target=target_lists | target_regexes, exclude=st.none() | target_lists | target_regexes,
       layers=st.none() | st.integers(0, 3) | st.lists(st.integers(0, 13), max_size=3),
       pattern=st.none() | st.sampled_from(["layers", "h", ["layers", "h"], "experts"]))
def test_fuzz_peft_targets_is_peft_rule(key: str, target: object, exclude: object, layers: object, pattern: object) -> None:
    """Which stored modules a config selects is decided by PEFT's own rule, exactly."""
    from types import SimpleNamespace

    from peft.tuners.tuners_utils import check_target_module_exists

    from mlora_export.adapter.peft_config import peft_targets

    cfg = {"target_modules": target, "exclude_modules": exclude, "layers_to_transform": layers, "layers_pattern": pattern}
    theirs = check_target_module_exists(SimpleNamespace(**cfg, modules_to_save=None, target_parameters=None), key)
    excluded = type(theirs).__name__ == "_ExcludedModule"
    assert peft_targets(cfg, key) == (bool(theirs) and not excluded), (cfg, key, theirs)
