"""Variant bundles, push-hub and pull: the real huggingface_hub client against a local Hub over loopback.

The local Hub (``tests/hub_server.py``) speaks the HTTP API of HUB_PROTOCOL.md; nothing of ours or
of ``HfApi`` is mocked. Xet is switched off so that large files take the LFS path.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from mlora_export.adapter import MatryoshkaConfig, NestedAdapter, save_nested
from mlora_export.cli.main import main
from mlora_export.converters.hub import BundleOptions, PushOptions, pull_rank, push_bundle, write_bundle
from mlora_export.converters.hub.bundle import MANIFEST_NAME, sha256_file
from tests.common import build_model, poison_weights, random_nested
from tests.hub_server import HubServer

ALICE, BOB = "hf_alice_token_123", "hf_bob_token_456"
REPO = "org/tiny-llama-mlora"
RANKS = (2, 4, 8)


@pytest.fixture(autouse=True)
def _no_xet(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Xet off, loopback unproxied, and an empty ``hf auth login`` cache (returned: write a token there to log in).

    The token file path is a huggingface_hub constant fixed at import, so setting HF_HOME alone
    would not hide a real login of the machine.
    """
    import huggingface_hub.constants as hc

    login = tmp_path_factory.mktemp("login")
    monkeypatch.setattr(hc, "HF_TOKEN_PATH", str(login / "token"))
    monkeypatch.setattr(hc, "HF_STORED_TOKENS_PATH", str(login / "stored_tokens"))
    monkeypatch.setattr(hc, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return login / "token"


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> HubServer:
    with HubServer(tmp_path_factory.mktemp("hub"), users={ALICE: "alice", BOB: "bob"}, orgs={"org": {"alice"}}) as server:
        yield server
    assert server.bugs == [], f"requests that hit a bug of the local Hub: {server.bugs}"


@pytest.fixture(scope="module")
def nested(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("nested") / "nested"
    random_nested(build_model("llama"), path, arch="llama", r=8, train_ranks=(1, 2, 4, 8))
    return path


@pytest.fixture(scope="module")
def bundle_dir(nested: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "bundle"
    write_bundle(nested, RANKS, out, BundleOptions(base_model_id="org/tiny-llama", license_id="apache-2.0", repo_id=REPO))
    return out


@pytest.fixture(scope="module")
def pushed(hub: HubServer, bundle_dir: Path) -> dict:
    """The bundle pushed once (public repo, with rank branches); returns the push result."""
    import huggingface_hub.constants as hc

    old, hc.HF_HUB_DISABLE_XET = hc.HF_HUB_DISABLE_XET, True
    try:
        return push_bundle(bundle_dir, REPO, PushOptions(token=ALICE, endpoint=hub.endpoint, branches=True)).to_dict()
    finally:
        hc.HF_HUB_DISABLE_XET = old


def run(*args: str, env: dict | None = None) -> "object":
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def leftovers(parent: Path, name: str) -> list[str]:
    """Anything under ``parent`` named like ``name`` or its temporary siblings."""
    return sorted(p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}."))


# -- the local bundle --------------------------------------------------------------------------
def test_bundle_layout_manifest_and_card(bundle_dir: Path, nested: Path, tmp_path: Path) -> None:
    from huggingface_hub import ModelCard, ModelCardData

    manifest = json.loads((bundle_dir / MANIFEST_NAME).read_text())
    assert manifest["format"] == "mlora-bundle/1"
    paths = [f["path"] for f in manifest["files"]]
    for k in RANKS:
        for name in ("adapter_config.json", "adapter_model.safetensors", "matryoshka_config.json"):
            assert f"r{k}/{name}" in paths
    assert {"README.md", "matryoshka_config.json", "nested/adapter_model.safetensors"} <= set(paths)
    on_disk = sorted(p.relative_to(bundle_dir).as_posix() for p in bundle_dir.rglob("*") if p.is_file())
    assert on_disk == sorted(paths + [MANIFEST_NAME])
    for f in manifest["files"]:
        assert f["size"] == (bundle_dir / f["path"]).stat().st_size
        assert f["sha256"] == sha256_file(bundle_dir / f["path"])
    adapter = NestedAdapter.load(nested)
    assert [(r["rank"], r["params"]) for r in manifest["ranks"]] == [(k, adapter.params_at(k)) for k in RANKS]
    for r in manifest["ranks"]:
        assert r["bytes"] == sum(f["size"] for f in manifest["files"] if f["path"].startswith(f"r{r['rank']}/"))
    assert (bundle_dir / "nested/adapter_model.safetensors").read_bytes() == (nested / "adapter_model.safetensors").read_bytes()
    # each rank folder is a PEFT slice that our loader (and PEFT) reads, with no local path in it
    sl = NestedAdapter.load(bundle_dir / "r4")
    assert sl.max_rank == 4 and not sl.is_nested
    assert json.loads((bundle_dir / "r4/matryoshka_config.json").read_text())["source"]["path"] == "../nested"

    card = ModelCard.load(bundle_dir / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == "org/tiny-llama"
    assert data["base_model_relation"] == "adapter"
    assert data["library_name"] == "peft"
    assert data["pipeline_tag"] == "text-generation"
    assert data["license"] == "apache-2.0"
    assert {"lora", "matryoshka-lora"} <= set(data["tags"])
    ModelCardData(**data)  # the metadata round-trips through the Hub's own data class
    text = card.text
    assert f'PeftModel.from_pretrained(base, "{REPO}", subfolder="r4")' in text
    assert f"mlora-export pull {REPO} --rank 4" in text
    assert "--enable-lora --max-lora-rank 8" in text
    assert "| 2 | `r2/` |" in text

    # deterministic: the same inputs give byte-identical files (so re-pushes upload nothing)
    again = write_bundle(nested, RANKS, tmp_path / "again", BundleOptions(base_model_id="org/tiny-llama", license_id="apache-2.0", repo_id=REPO))
    assert (again.path / MANIFEST_NAME).read_bytes() == (bundle_dir / MANIFEST_NAME).read_bytes()
    assert "folded into `lora_B`" in text
    # the card describes the slices as they are: native slices keep the exact prefix
    native = write_bundle(nested, (4,), tmp_path / "native", BundleOptions(scale_mode="native", base_model_id="org/tiny-llama"))
    native_text = (native.path / "README.md").read_text()
    assert "exact prefix" in native_text and "folded into" not in native_text
    # s(4) = 1/sqrt(4) as lora_alpha / r alone (no use_rslora, which llama.cpp's converter ignores)
    native_cfg = json.loads((native.path / "r4/adapter_config.json").read_text())
    assert "use_rslora" not in native_cfg and native_cfg["lora_alpha"] / native_cfg["r"] == pytest.approx(0.5)


def test_bundle_carries_evaluation_numbers(tmp_path: Path) -> None:
    path = tmp_path / "nested"
    random_nested(build_model("llama"), path, arch="llama", r=8, train_ranks=(2, 4, 8))
    cfg = json.loads((path / "matryoshka_config.json").read_text())
    cfg["evaluation"] = {"loss": {"metric": "loss", "higher_is_better": False, "ranks": [{"rank": 2, "score": 3.25}, {"rank": 8, "score": 2.5}],
                                  "aurac": {"v1": 2.8, "v2": 2.9}}}
    (path / "matryoshka_config.json").write_text(json.dumps(cfg))
    b = write_bundle(path, "all", tmp_path / "b")
    assert {r.rank: r.metrics for r in b.ranks} == {2: {"loss": 3.25}, 4: {}, 8: {"loss": 2.5}}
    text = (b.path / "README.md").read_text()
    assert "| rank | folder | parameters | size | loss |" in text and "3.25" in text and "AURAC (loss)" in text


def test_bundle_cli_and_bad_inputs(nested: Path, bundle_dir: Path, tmp_path: Path) -> None:
    res = run("bundle", nested, "--ranks", "4,2", "--output", tmp_path / "b", "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert [r["rank"] for r in info["ranks"]] == [2, 4]
    # an existing output without --force
    res = run("bundle", nested, "--ranks", "4", "--output", tmp_path / "b")
    assert res.exit_code == 2 and "--force" in res.output
    # a rank above r: exit 2, nothing written
    res = run("bundle", nested, "--ranks", "16", "--output", tmp_path / "c")
    assert res.exit_code == 2 and "outside [1, 8]" in res.output
    assert leftovers(tmp_path, "c") == []
    # a plain PEFT slice is not a nested adapter
    res = run("bundle", bundle_dir / "r4", "--ranks", "2", "--output", tmp_path / "d")
    assert res.exit_code == 2 and "plain PEFT LoRA adapter" in res.output
    assert leftovers(tmp_path, "d") == []
    # an invalid license id, a missing folder
    res = run("bundle", nested, "--output", tmp_path / "e", "--license", "Apache 2")
    assert res.exit_code == 2 and "--license" in res.output
    res = run("bundle", tmp_path / "missing", "--output", tmp_path / "f")
    assert res.exit_code == 2 and "does not exist" in res.output
    assert "Traceback" not in res.output
    # a NaN in the weights (found while the slices are written): exit 2, nothing written
    poisoned = tmp_path / "poisoned"
    shutil.copytree(nested, poisoned)
    key = sorted(NestedAdapter.load(poisoned).header.tensors)[-1]
    poison_weights(poisoned / "adapter_model.safetensors", {key: float("nan")})
    res = run("bundle", poisoned, "--ranks", "2", "--output", tmp_path / "g")
    assert res.exit_code == 2 and f"tensor '{key}' has NaN or infinite values" in res.output
    assert leftovers(tmp_path, "g") == []


# -- push and pull -----------------------------------------------------------------------------
def test_push_then_pull_every_rank_byte_identical(hub: HubServer, pushed: dict, bundle_dir: Path, tmp_path: Path) -> None:
    assert pushed["revision"]["changed"] and len(pushed["revision"]["uploaded"]) == len(list(bundle_dir.rglob("*.*")))
    tree = hub.head_tree(REPO)
    assert tree["r8/adapter_model.safetensors"].lfs and not tree["manifest.json"].lfs
    for k in RANKS:
        out = tmp_path / f"r{k}"
        # the endpoint from --endpoint, or from HF_ENDPOINT (read at call time, as a user sets it)
        where = ["--endpoint", hub.endpoint] if k != 8 else []
        res = run("pull", REPO, "--rank", k, "--output", out, *where, "--json", env={"HF_ENDPOINT": hub.endpoint} if k == 8 else None)
        assert res.exit_code == 0, res.output
        info = json.loads(res.stdout)
        assert info["rank"] == k and info["commit"] == pushed["revision"]["commit"]
        for name in ("adapter_config.json", "adapter_model.safetensors", "matryoshka_config.json"):
            assert (out / name).read_bytes() == (bundle_dir / f"r{k}" / name).read_bytes()
        assert (out / "bundle" / MANIFEST_NAME).read_bytes() == (bundle_dir / MANIFEST_NAME).read_bytes()
        assert NestedAdapter.load(out).max_rank == k
    # only what rank 4 needs was downloaded
    hub.clear_log()
    assert run("pull", REPO, "--rank", "4", "--output", tmp_path / "again", "--endpoint", hub.endpoint).exit_code == 0
    fetched = {r["path"].split("/resolve/", 1)[1].split("/", 1)[1] for r in hub.requests("GET", "/resolve/")}
    assert fetched == {"manifest.json", "matryoshka_config.json", "r4/adapter_config.json", "r4/adapter_model.safetensors", "r4/matryoshka_config.json"}


def test_rank_branches_hold_the_adapter_at_their_root(hub: HubServer, pushed: dict, bundle_dir: Path) -> None:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.endpoint, token=False)
    refs = {b.name: b.target_commit for b in api.list_repo_refs(REPO).branches}
    assert set(refs) == {"main", "r2", "r4", "r8"}
    for k in RANKS:
        files = set(api.list_repo_files(REPO, revision=f"r{k}"))
        assert files == {".gitattributes", "README.md", "adapter_config.json", "adapter_model.safetensors", "matryoshka_config.json"}
        assert hub.file_bytes(REPO, "adapter_model.safetensors", branch=f"r{k}") == (bundle_dir / f"r{k}/adapter_model.safetensors").read_bytes()
    assert [b["branch"] for b in pushed["branches"]] == ["r2", "r4", "r8"]
    # tags through the same API (the Hub's refs listing)
    HfApi(endpoint=hub.endpoint, token=ALICE).create_tag(REPO, tag="r8-v1", revision="r8")
    assert {t.name: t.target_commit for t in api.list_repo_refs(REPO).tags}["r8-v1"] == refs["r8"]


def test_repush_unchanged_uploads_nothing(hub: HubServer, pushed: dict, bundle_dir: Path, nested: Path, tmp_path: Path) -> None:
    head = hub.repo(REPO).branches["main"]
    n_commits = len(hub.repo(REPO).commits)
    hub.clear_log()
    res = run("push-hub", bundle_dir, "--repo-id", REPO, "--branches", "--endpoint", hub.endpoint, "--token", ALICE, "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert not info["revision"]["changed"] and not any(b["changed"] for b in info["branches"])
    assert hub.requests("PUT") == [] and hub.requests("POST", "/commit/") == [] and hub.requests("POST", "/preupload/") == []
    assert hub.repo(REPO).branches["main"] == head and len(hub.repo(REPO).commits) == n_commits
    assert ALICE not in res.output  # the token is never printed

    # a changed bundle (one more rank) uploads only what changed, in one commit
    bigger = write_bundle(nested, (2, 4, 6, 8), tmp_path / "b2", BundleOptions(base_model_id="org/tiny-llama", license_id="apache-2.0", repo_id=REPO))
    hub.clear_log()
    result = push_bundle(bigger.path, REPO, PushOptions(token=ALICE, endpoint=hub.endpoint))
    assert sorted(result.main.uploaded) == ["README.md", "manifest.json", "r6/adapter_config.json", "r6/adapter_model.safetensors", "r6/matryoshka_config.json"]
    assert len(hub.requests("POST", "/commit/")) == 1
    # and back: the stale r6/ folder is deleted
    result = push_bundle(bundle_dir, REPO, PushOptions(token=ALICE, endpoint=hub.endpoint))
    assert sorted(result.main.deleted) == ["r6/adapter_config.json", "r6/adapter_model.safetensors", "r6/matryoshka_config.json"]
    assert not any(p.startswith("r6/") for p in hub.head_tree(REPO))


def test_large_file_takes_the_lfs_path(hub: HubServer, tmp_path: Path) -> None:
    """A nested adapter over 10 MiB: uploaded through LFS batch + PUT + verify, pulled back identical."""
    gen = torch.Generator().manual_seed(0)
    r, width = 352, 4096  # A [r, 4096] + B [4096, r] in float32 = 11.5 MB
    factors = {"model.layers.0.mlp.big_proj": (torch.randn(r, width, generator=gen), torch.randn(width, r, generator=gen))}
    save_nested(tmp_path / "big", factors, MatryoshkaConfig("matryoshka", r, (8, 32, r), "sqrt", 1.0, extra={"base_model": "org/big"}))
    assert (tmp_path / "big/adapter_model.safetensors").stat().st_size > 10 * 2**20
    b = write_bundle(tmp_path / "big", (8, r), tmp_path / "bundle", BundleOptions(repo_id="org/big-mlora"))
    hub.clear_log()
    push_bundle(b.path, "org/big-mlora", PushOptions(token=ALICE, endpoint=hub.endpoint))
    size = (tmp_path / "big/adapter_model.safetensors").stat().st_size
    puts = [e for e in hub.requests("PUT", "/lfs-upload/") if e["bytes_in"] == size]
    # nested/, r352/ (same size, other content) and the root's default rank (a copy of r352/, sent by the client again)
    assert len(puts) == 3 and all(e["status"] == 200 for e in puts)
    assert hub.requests("POST", "/info/lfs/objects/batch") and hub.requests("POST", "/lfs-verify/")
    assert hub.head_tree("org/big-mlora")["nested/adapter_model.safetensors"].lfs
    out = pull_rank("org/big-mlora", r, tmp_path / "pulled", endpoint=hub.endpoint)
    assert (out.path / "adapter_model.safetensors").read_bytes() == (b.path / f"r{r}/adapter_model.safetensors").read_bytes()


def test_peft_loads_a_rank_from_the_hub_with_subfolder(hub: HubServer, pushed: dict, bundle_dir: Path, base_dirs: dict, tmp_path: Path) -> None:
    """PeftModel.from_pretrained(base, repo, subfolder="r8") against the local Hub, no code of ours (HF_ENDPOINT)."""
    script = f"""
import torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
ids = torch.tensor([[5, 9, 13, 21, 34, 55, 8]])
hub = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({str(base_dirs['llama'])!r}), {REPO!r}, subfolder="r8").eval()
local = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({str(base_dirs['llama'])!r}), {str(bundle_dir / 'r8')!r}).eval()
base = AutoModelForCausalLM.from_pretrained({str(base_dirs['llama'])!r}).eval()
with torch.no_grad():
    a, b, c = hub(ids).logits, local(ids).logits, base(ids).logits
torch.testing.assert_close(a, b, rtol=0, atol=0)
# the repo's root holds the default rank (the largest here: no evaluation recorded), as any LoRA repo does
root = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({str(base_dirs['llama'])!r}), {REPO!r}).eval()
with torch.no_grad():
    torch.testing.assert_close(root(ids).logits, b, rtol=0, atol=0)
# the r8 branch holds the same adapter at its root (repo@revision, no subfolder)
branch = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({str(base_dirs['llama'])!r}), {REPO!r}, revision="r8").eval()
with torch.no_grad():
    torch.testing.assert_close(branch(ids).logits, b, rtol=0, atol=0)
assert (a - c).abs().max() > 1e-3, "the adapter changed nothing"
print("OK")
"""
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "NO_PROXY": "127.0.0.1,localhost"}
    env.pop("HF_TOKEN", None)
    hub.clear_log()
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
    assert any("/resolve/main/r8/adapter_model.safetensors" in e["path"] for e in hub.requests("GET"))


def test_bundle_is_portable_with_a_default_rank_at_its_root(nested: Path, base_dirs: dict, tmp_path: Path) -> None:
    """No local base path in any adapter_config.json of a bundle (the Hub id, or nothing); the root holds
    the default rank, chosen by the recorded evaluation, else the largest, or by --default-rank; PEFT's tags;
    our tools read a bundle's nested/ (never its root files)."""
    from huggingface_hub import ModelCard
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mlora_export.evaluation import record_evaluation

    local = tmp_path / "local"
    shutil.copytree(nested, local)
    cfg = json.loads((local / "matryoshka_config.json").read_text())
    cfg["base_model"] = "/home/trainer/models/llama-local"
    (local / "matryoshka_config.json").write_text(json.dumps(cfg))
    peft_cfg = json.loads((local / "adapter_config.json").read_text())
    peft_cfg["base_model_name_or_path"] = "/home/trainer/models/llama-local"
    (local / "adapter_config.json").write_text(json.dumps(peft_cfg))

    def configs(root: Path) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(root.rglob("adapter_config.json"))]

    with_id = write_bundle(local, RANKS, tmp_path / "with-id", BundleOptions(base_model_id="org/tiny-llama"))
    assert len(configs(with_id.path)) == len(RANKS) + 2  # r{k}/, nested/ and the root
    assert {c["base_model_name_or_path"] for c in configs(with_id.path)} == {"org/tiny-llama"}
    without = write_bundle(local, RANKS, tmp_path / "without", BundleOptions(warn_local_base=False))
    assert {c.get("base_model_name_or_path") for c in configs(without.path)} == {None}
    assert "/home/trainer" not in "".join((without.path / n).read_text() for n in ("README.md", "adapter_config.json", "r4/adapter_config.json"))

    # the default rank: the largest without an evaluation, a byte copy of its folder, named in the manifest and card
    m = json.loads((with_id.path / MANIFEST_NAME).read_text())
    assert m["default_rank"] == {"rank": 8, "path": ".", "source": "r8", "chosen_by": "largest rank"}
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (with_id.path / name).read_bytes() == (with_id.path / "r8" / name).read_bytes()
        assert name in {f["path"] for f in m["files"]}
    card = ModelCard.load(with_id.path / "README.md")
    assert {"base_model:adapter:org/tiny-llama", "transformers", "lora", "peft", "matryoshka-lora"} <= set(card.data.tags)
    assert 'PeftModel.from_pretrained(base, "<namespace>/<repo>")' in card.text and "holds rank 8" in card.text
    ids = torch.tensor([[5, 9, 13, 21, 34, 55, 8]])
    with torch.no_grad():
        root = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dirs["llama"]), str(with_id.path)).eval()(ids).logits
        r8 = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dirs["llama"]), str(with_id.path / "r8")).eval()(ids).logits
    torch.testing.assert_close(root, r8, rtol=0, atol=0)
    # our tools read the bundle's nested adapter, not the root's rank-8 files
    assert NestedAdapter.load(with_id.path).path == with_id.path / "nested"
    assert NestedAdapter.load(with_id.path).config.train_ranks == (1, 2, 4, 8)

    # chosen by the recorded evaluation (higher is better: the best score; ties: the smaller rank)
    record_evaluation(local, {"metric": "exact-match", "higher_is_better": True,
                              "ranks": [{"rank": 2, "score": 0.5}, {"rank": 4, "score": 0.9}, {"rank": 8, "score": 0.9}], "aurac": {"v2": 0.8}})
    by_eval = write_bundle(local, RANKS, tmp_path / "by-eval", BundleOptions(warn_local_base=False))
    assert json.loads((by_eval.path / MANIFEST_NAME).read_text())["default_rank"]["rank"] == 4
    assert (by_eval.path / "adapter_model.safetensors").read_bytes() == (by_eval.path / "r4" / "adapter_model.safetensors").read_bytes()
    # or by the option; one that is not a bundle rank is refused, exit 2, nothing written
    res = run("bundle", local, "--ranks", "2,4,8", "--default-rank", "2", "--output", tmp_path / "opt")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "opt" / MANIFEST_NAME).read_text())["default_rank"] == {"rank": 2, "path": ".", "source": "r2", "chosen_by": "option"}
    res = run("bundle", local, "--ranks", "2,4", "--default-rank", "8", "--output", tmp_path / "bad")
    assert res.exit_code == 2 and "default rank 8 is not one of the bundle's ranks [2, 4]" in res.stderr, res.output
    assert leftovers(tmp_path, "bad") == []


# -- errors ------------------------------------------------------------------------------------
def test_private_repo_bad_token_and_permissions(hub: HubServer, pushed: dict, bundle_dir: Path, nested: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch, _no_xet: Path) -> None:
    monkeypatch.setenv("HF_TOKEN", ALICE)  # the token from the environment, as huggingface_hub reads it
    res = run("push-hub", bundle_dir, "--repo-id", "org/private-mlora", "--private", "--endpoint", hub.endpoint)
    assert res.exit_code == 0, res.output
    assert hub.repo("org/private-mlora").private
    assert run("pull", "org/private-mlora", "--rank", "2", "--output", tmp_path / "ok", "--endpoint", hub.endpoint).exit_code == 0
    # --private never publishes into an existing public repo
    head = hub.repo(REPO).branches["main"]
    res = run("push-hub", nested, "--ranks", "2", "--repo-id", REPO, "--private", "--endpoint", hub.endpoint)
    assert res.exit_code == 2 and "already exists and is public" in res.output, res.output
    assert hub.repo(REPO).branches["main"] == head and not hub.repo(REPO).private
    monkeypatch.delenv("HF_TOKEN")
    # the `hf auth login` cache (the token file), found by huggingface_hub's own lookup
    _no_xet.write_text(ALICE)
    assert run("pull", "org/private-mlora", "--rank", "2", "--output", tmp_path / "cached", "--endpoint", hub.endpoint).exit_code == 0
    _no_xet.unlink()

    out = tmp_path / "out"
    pull = ("pull", "org/private-mlora", "--rank", "2", "--output", out, "--endpoint", hub.endpoint)
    push = ("push-hub", bundle_dir, "--endpoint", hub.endpoint, "--repo-id")
    cases = [
        (pull, "not found", "private and no token was sent"),  # anonymous
        ((*pull, "--token", BOB), "not found", "private and your token cannot read it"),  # another user
        ((*pull, "--token", "hf_wrong"), "rejected the token", "invalid or expired"),
        ((*push, "org/bob-was-here", "--token", BOB), "permission denied for 'org/bob-was-here'", "write access"),
        # an existing repo that bob can read but not write (a bundle that differs from it, so a commit is needed)
        (("push-hub", nested, "--ranks", "2", "--endpoint", hub.endpoint, "--repo-id", REPO, "--token", BOB),
         f"permission denied for {REPO!r}", "write access"),
        ((*push, "org/x", "--token", "hf_wrong"), "rejected the token", "hf auth login"),
        ((*push, "org/x"), "needs a token", "HF_TOKEN"),
    ]
    for args, first, second in cases:
        res = run(*args)
        assert res.exit_code == 1, (args, res.output)
        assert first in res.output and second in res.output, res.output
        assert "Traceback" not in res.output and "hf_wrong" not in res.output and BOB not in res.output
        assert len(res.output.strip().splitlines()) == 1, res.output
    assert leftovers(tmp_path, "out") == []
    assert hub.repo(REPO).branches["main"] == head


def test_unknown_repo_revision_rank_and_network_down(hub: HubServer, pushed: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cases = [
        (["pull", "org/nope", "--rank", "2"], 1, "repository 'org/nope' not found"),
        (["pull", REPO, "--rank", "2", "--revision", "v9"], 1, "revision 'v9' not found"),
        (["pull", REPO, "--rank", "2", "--revision", ""], 2, "the revision is empty; give a branch, tag or commit (default: main) (see --revision)"),
        (["pull", REPO, "--rank", "16"], 2, "rank 16 is not in the bundle 'org/tiny-llama-mlora'; it has ranks 2, 4, 8"),
        (["pull", REPO, "--rank", "auto"], 2, "rank 'auto' needs a limit (bytes, parameters, latency) or a score to reach to choose a rank (give --max-bytes, --max-params, --max-latency-ms, --min-score or --within)"),
        (["pull", REPO, "--rank", "auto", "--max-bytes", "1KB"], 2, "'org/tiny-llama-mlora': no rank fits 1,000 bytes; the smallest, rank 2,"),
        (["pull", REPO, "--rank", "zero"], 2, "is not a rank"),
        (["pull", REPO, "--rank", "4", "--max-bytes", "10MB"], 2, "only apply with --rank auto"),
    ]
    for args, code, message in cases:
        res = run(*args, "--output", out, "--endpoint", hub.endpoint)
        assert res.exit_code == code, (args, res.output)
        assert message in res.output, (args, res.output)
        assert "Traceback" not in res.output
        assert leftovers(tmp_path, "out") == []
    res = run("pull", REPO, "--rank", "4", "--output", out, "--endpoint", "http://127.0.0.1:9")
    assert res.exit_code == 1 and "cannot reach the Hub at http://127.0.0.1:9" in res.output
    assert leftovers(tmp_path, "out") == []
    # bad input caught before any request: a malformed repo id or endpoint
    hub.clear_log()
    for args, message in [(["pull", "not a repo", "--rank", "2", "--endpoint", hub.endpoint], "repo id 'not a repo' is not a valid Hub repo id"),
                          (["pull", REPO, "--rank", "2", "--endpoint", "127.0.0.1:9"], "endpoint '127.0.0.1:9' is not an http(s) URL; give the Hub's address, e.g. https://huggingface.co (see --endpoint)")]:
        res = run(*args, "--output", out)
        assert res.exit_code == 2 and message in res.output and len(res.output.strip().splitlines()) == 1, res.output
    res = run("pull", REPO, "--rank", "2", "--output", out, env={"HF_ENDPOINT": "ftp://mirror"})
    assert res.exit_code == 2 and "HF_ENDPOINT 'ftp://mirror' is not an http(s) URL" in res.output, res.output
    assert hub.log == [] and leftovers(tmp_path, "out") == []
    # a repo that is not a bundle
    from huggingface_hub import HfApi

    HfApi(endpoint=hub.endpoint, token=ALICE).create_repo("org/not-a-bundle")
    res = run("pull", "org/not-a-bundle", "--rank", "2", "--output", out, "--endpoint", hub.endpoint)
    assert res.exit_code == 2 and "has no manifest.json" in res.output and "not a variant bundle" in res.output, res.output
    assert leftovers(tmp_path, "out") == []
    # --rank auto picks the largest rank that fits, reading the manifest first
    sizes = {r["rank"]: r for r in json.loads(hub.file_bytes(REPO, MANIFEST_NAME))["ranks"]}
    res = run("pull", REPO, "--rank", "auto", "--max-bytes", sizes[4]["bytes"], "--output", out, "--endpoint", hub.endpoint, "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["rank"] == 4
    res = run("pull", REPO, "--rank", "auto", "--max-params", sizes[2]["params"] + 1, "--output", tmp_path / "o2", "--endpoint", hub.endpoint, "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["rank"] == 2
    # an existing output needs --force
    res = run("pull", REPO, "--rank", "2", "--output", out, "--endpoint", hub.endpoint)
    assert res.exit_code == 2 and "--force" in res.output
    assert run("pull", REPO, "--rank", "2", "--output", out, "--endpoint", hub.endpoint, "--force").exit_code == 0


def test_tampered_file_fails_naming_it_and_leaves_nothing(hub: HubServer, pushed: dict, tmp_path: Path) -> None:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.endpoint, token=ALICE)
    api.create_branch(REPO, branch="tampered")
    api.upload_file(path_or_fileobj=b"\0not the adapter the manifest describes", path_in_repo="r4/adapter_model.safetensors",
                    repo_id=REPO, revision="tampered", commit_message="tamper")
    out = tmp_path / "out"
    res = run("pull", REPO, "--rank", "4", "--revision", "tampered", "--output", out, "--endpoint", hub.endpoint)
    assert res.exit_code == 1, res.output
    assert "org/tiny-llama-mlora/r4/adapter_model.safetensors" in res.output and "manifest.json" in res.output
    assert leftovers(tmp_path, "out") == []
    # the other ranks on that revision are intact
    assert run("pull", REPO, "--rank", "2", "--revision", "tampered", "--output", out, "--endpoint", hub.endpoint).exit_code == 0


#: ``push-hub`` calls that must send nothing: ``(arguments, exit code, a fragment of the output)``;
#: ``{hub}`` stands for the local Hub's endpoint.
DRY_RUN_CASES: dict[str, tuple[list[str], int, str | None]] = {
    "dry run, listed as JSON": (["--repo-id", "org/dry", "--ranks", "2,8", "--branches", "--dry-run", "--endpoint", "{hub}", "--json"], 0, None),
    "dry run, endpoint unreachable": (["--repo-id", "org/dry", "--ranks", "2", "--dry-run", "--endpoint", "http://127.0.0.1:9"], 0, "nothing was sent"),
    "repo id invalid": (["--repo-id", "not a repo id", "--dry-run"], 2, "not a valid Hub repo id"),
    "repo id without namespace": (["--repo-id", "no-namespace", "--endpoint", "{hub}", "--token", ALICE], 2, "namespace/name"),
    # a commit id, nothing: push-hub commits to a branch
    "revision a commit id": (["--repo-id", "org/dry", "--revision", "0123456789abcdef0123456789abcdef01234567", "--endpoint", "{hub}", "--token", ALICE],
                             2, "is not a branch name"),
    "revision empty": (["--repo-id", "org/dry", "--revision", "", "--endpoint", "{hub}", "--token", ALICE], 2, "is not a branch name"),
    "endpoint not a URL": (["--repo-id", "org/dry", "--endpoint", "huggingface.co", "--token", ALICE], 2, "is not an http(s) URL"),
}


@pytest.mark.parametrize("case", list(DRY_RUN_CASES))
def test_dry_run_makes_no_request(hub: HubServer, nested: Path, case: str) -> None:
    args, code, fragment = DRY_RUN_CASES[case]
    hub.clear_log()
    res = run("push-hub", nested, *[a.replace("{hub}", hub.endpoint) for a in args])
    assert res.exit_code == code, res.output
    if fragment is not None:
        assert fragment in res.output, res.output
    if "--json" in args:
        info = json.loads(res.stdout)
        paths = {f["path"] for f in info["files"]}
        assert {"README.md", "manifest.json", "r2/adapter_model.safetensors", "r8@adapter_model.safetensors"} <= paths
        assert all(f["size"] > 0 for f in info["files"])
    assert hub.log == []


def test_bundle_with_onnx_folder_and_demo_stage(nested: Path, tmp_path: Path) -> None:
    """``onnx/`` is carried into the bundle and the manifest; the demo's ``bundle`` stage writes a valid bundle."""
    from mlora_export.converters.hub.bundle import Bundle
    from mlora_export.demo import STAGES, DemoContext

    onnx = tmp_path / "onnx"
    onnx.mkdir()
    (onnx / "model.onnx").write_bytes(b"\x08\x07fake onnx bytes")
    (onnx / "export_info.json").write_text("{}")
    b = write_bundle(nested, (2, 8), tmp_path / "b", BundleOptions(onnx_dir=onnx))
    assert b.manifest["onnx"] == ["onnx/export_info.json", "onnx/model.onnx"]
    assert "onnx/model.onnx" in [f.path for f in b.files] and "`onnx/`" in (b.path / "README.md").read_text()
    Bundle.load(b.path, verify=True)

    names = [s.name for s in STAGES]
    assert names[-1] == "bundle" and names.index("onnx") < names.index("bundle")  # the bundle carries the ONNX export
    stage = STAGES[-1]
    root = tmp_path / "root"
    root.mkdir()
    random_nested(build_model("llama"), root / "nested", arch="llama", r=8, train_ranks=(1, 2, 4, 8))
    ctx = DemoContext(output=tmp_path / "demo", root=root, slice_ranks=(2, 8))
    report = stage.resolve()(ctx)
    assert [r[0] for r in report.rows] == [2, 8] and "push-hub" in report.lines[0]
    assert Bundle.load(root / "bundle", verify=True).manifest["ranks"][1]["rank"] == 8


def test_push_to_another_revision_and_a_modified_local_bundle(hub: HubServer, pushed: dict, bundle_dir: Path, tmp_path: Path) -> None:
    import shutil

    result = push_bundle(bundle_dir, REPO, PushOptions(revision="dev", token=ALICE, endpoint=hub.endpoint))
    assert "dev" in hub.repo(REPO).branches and not result.main.changed  # branched from main: same content
    out = pull_rank(REPO, 2, tmp_path / "dev", revision="dev", endpoint=hub.endpoint)
    assert out.commit == hub.repo(REPO).branches["dev"]

    local = tmp_path / "bundle"
    shutil.copytree(bundle_dir, local)
    (local / "r2/adapter_config.json").write_text("{}")
    hub.clear_log()
    res = run("push-hub", local, "--repo-id", REPO, "--endpoint", hub.endpoint, "--token", ALICE)
    assert res.exit_code == 2 and "r2/adapter_config.json" in res.output and "manifest.json" in res.output
    assert hub.log == []


def test_base_model_means_the_base_model(nested: Path, base_dirs: dict, tmp_path: Path) -> None:
    """``--base-model`` is the base (what ``--gguf`` and ``--with-onnx`` build on); ``--base-model-id``
    names the card's base; the older spellings (``--gguf BASE``, ``--base-model`` as the card's id
    alone) still work, the export's one with a deprecation warning after the success."""
    from mlora_export.converters.hub.bundle import Bundle

    llama = base_dirs["llama"]

    def bundle(name: str, *args: object) -> tuple[object, dict]:
        res = run("bundle", nested, "--ranks", "2", *args, "--output", tmp_path / name)
        assert res.exit_code == 0, res.output
        return res, Bundle.load(tmp_path / name, verify=True).manifest

    _, m = bundle("flag", "--gguf", "--base-model", llama)  # a local base: the card keeps the adapter's recorded base
    assert m["base_model"] == "tiny-llama" and m["ranks"][0]["gguf"] == "r2/adapter.gguf"
    _, m = bundle("with-id", "--gguf", "--base-model", llama, "--base-model-id", "org/other")
    assert m["base_model"] == "org/other"
    res, m = bundle("card-only", "--base-model", "org/older")  # without an export: the card's Hub id, as it always was
    assert m["base_model"] == "org/older" and "gguf" not in m["ranks"][0] and "deprecated" not in res.stderr
    res, m = bundle("older-gguf", "--gguf", llama, "--base-model", "org/card")  # the older spelling: --base-model is the card's
    assert m["base_model"] == "org/card" and m["ranks"][0]["gguf"] == "r2/adapter.gguf"
    assert "--gguf BASE is deprecated" in res.stderr
    for flag in ("--with-onnx", "--gguf"):
        res = run("bundle", nested, "--ranks", "2", flag, "--output", tmp_path / "no-base")
        assert res.exit_code == 2 and f"{flag} builds on the base model: give --base-model" in res.stderr, res.output
        assert len(res.stderr.strip().splitlines()) == 1 and leftovers(tmp_path, "no-base") == []


def test_bundle_options_in_the_older_keyword_style(nested: Path, tmp_path: Path) -> None:
    """``write_bundle(..., scale_mode=...)`` (the options as keywords) still works for one release,
    with a DeprecationWarning, and writes what the options object writes; an unknown keyword is a TypeError."""
    new = write_bundle(nested, (2,), tmp_path / "new", BundleOptions(scale_mode="native", base_model_id="org/x"))
    with pytest.warns(DeprecationWarning, match=r"write_bundle\(scale_mode=..., base_model_id=...\) is deprecated"):
        old = write_bundle(nested, (2,), tmp_path / "old", scale_mode="native", base_model_id="org/x")
    assert [f.sha256 for f in old.files] == [f.sha256 for f in new.files]
    with pytest.raises(TypeError, match="unexpected keyword argument 'scale'"):
        write_bundle(nested, (2,), tmp_path / "bad", scale="native")
    assert leftovers(tmp_path, "bad") == []


@pytest.mark.slow
def test_bundle_with_onnx_export_cli(nested: Path, base_dirs: dict, tmp_path: Path) -> None:
    """``--with-onnx --base-model BASE`` runs the real ONNX exporter (verified in ONNX Runtime) into ``onnx/``."""
    from mlora_export.converters.hub.bundle import Bundle

    out = tmp_path / "b"
    proc = subprocess.run([sys.executable, "-m", "mlora_export", "bundle", str(nested), "--ranks", "2,8", "--with-onnx",
                           "--base-model", str(base_dirs["llama"]), "--output", str(out), "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    b = Bundle.load(out, verify=True)
    assert "onnx/model.onnx" in b.manifest["onnx"]
    import onnx

    onnx.checker.check_model(str(out / "onnx/model.onnx"))
    res = run("bundle", nested, "--ranks", "2", "--with-onnx", "--base-model", tmp_path / "no-base", "--output", tmp_path / "c")
    assert res.exit_code == 2 and leftovers(tmp_path, "c") == []


def test_bundle_with_a_bad_gguf_base_fails_before_any_export(nested: Path, base_dirs: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--gguf`` on ``--base-model BASE`` is checked before the ONNX export (or anything else) runs: a base without a
    config.json, or of an architecture llama.cpp cannot take, is exit 2 and leaves nothing behind."""
    from mlora_export.converters import gguf as gguf_mod
    from mlora_export.converters import onnx as onnx_pkg
    from mlora_export.errors import BaseModelError, UnsupportedArchitectureError

    def no_export(*a: object, **kw: object) -> None:
        pytest.fail("an export ran before the GGUF base was checked")

    monkeypatch.setattr(onnx_pkg, "export_onnx", no_export)
    monkeypatch.setattr(gguf_mod, "export_gguf", no_export)
    (tmp_path / "empty").mkdir()
    for bad, error in ((tmp_path / "empty", BaseModelError), (base_dirs["bert"], UnsupportedArchitectureError)):
        with pytest.raises(error):
            write_bundle(nested, [2, 8], tmp_path / "b", BundleOptions(onnx_base=base_dirs["llama"], gguf_base=bad))
        assert leftovers(tmp_path, "b") == []
        res = run("bundle", nested, "--ranks", "2,8", "--with-onnx", "--gguf", "--base-model", bad, "--output", tmp_path / "c")
        assert res.exit_code == 2 and "Traceback" not in res.output, res.output
        assert leftovers(tmp_path, "c") == []


@pytest.mark.slow
def test_pull_auto_chooses_by_measured_latency_and_recorded_score(hub: HubServer, nested: Path, base_dirs: dict, tmp_path: Path) -> None:
    """``bundle --with-onnx --measure-latency`` records ms per rank with the machine; ``pull --rank auto``
    chooses by that latency and by the recorded score, and says why."""
    from mlora_export.evaluation import record_evaluation

    src = tmp_path / "nested"
    shutil.copytree(nested, src)
    record_evaluation(src, {"metric": "exact-match", "higher_is_better": True, "data": "held.jsonl",
                            "ranks": [{"rank": 2, "score": 0.40}, {"rank": 4, "score": 0.55}, {"rank": 8, "score": 0.56}]})
    repo = "org/latency-choice"
    res = run("bundle", src, "--ranks", "2,4,8", "--with-onnx", "--base-model", base_dirs["llama"], "--measure-latency", "--repo-id", repo,
              "--output", tmp_path / "b")
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "b" / MANIFEST_NAME).read_text())
    latency = manifest["latency"]
    assert set(latency["ms"]) == {"0", "2", "4", "8"} and all(v > 0 for v in latency["ms"].values())
    assert {"cpu", "cpus", "onnxruntime", "provider"} <= set(latency["machine"]) and latency["batch"] == 1
    assert [r["latency_ms"] for r in manifest["ranks"]] == [latency["ms"][k] for k in ("2", "4", "8")]
    assert run("push-hub", tmp_path / "b", "--repo-id", repo, "--endpoint", hub.endpoint, "--token", ALICE).exit_code == 0

    def pull(*extra: object) -> object:
        out = tmp_path / f"pull-{len(list(tmp_path.glob('pull-*')))}"
        return run("pull", repo, "--rank", "auto", *extra, "--output", out, "--endpoint", hub.endpoint, "--json")

    within = pull("--within", "2")  # best 56%: 54% or more is reached first at rank 4
    assert within.exit_code == 0, within.output
    got = json.loads(within.stdout)
    assert got["rank"] == 4 and "smallest rank" in got["reason"] and "exact-match within 2 points" in got["reason"]
    roomy = json.loads(pull("--max-latency-ms", str(10 * max(latency["ms"].values()))).stdout)
    assert roomy["rank"] == 8 and "largest rank" in roomy["reason"]
    tight = pull("--max-latency-ms", "0.000001")
    assert tight.exit_code == 2 and "no rank fits" in tight.stderr and "--max-latency-ms" in tight.stderr
    plain = run("pull", repo, "--rank", "4", "--within", "2", "--output", tmp_path / "x", "--endpoint", hub.endpoint)
    assert plain.exit_code == 2 and "only apply with --rank auto" in plain.output
