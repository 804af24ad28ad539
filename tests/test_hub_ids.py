"""Models and datasets by Hub id: ``--base-model org/name`` through ``huggingface_hub.snapshot_download``
and ``--data org/name`` through ``datasets.load_dataset``, the real clients against the local Hub
stand-in (``tests/hub_server.py``) over loopback.

In-process tests stand in for a process started with ``HF_ENDPOINT`` and ``HF_HOME`` set (the Hub
client and ``datasets`` read them at import): the :func:`hub_env` fixture sets the variables and
the values the two libraries derived from them. One test runs a real process with the variables
set instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlora_export.cli import main
from mlora_export.data import DataSource, parse_columns, read_records
from mlora_export.errors import BaseModelError, DataError, HubInputError
from tests.hub_server import HubServer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ALICE, BOB = "hf_alice_token_123", "hf_bob_token_456"
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n"
                 "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
WORDS = ["cab", "fed", "hgi", "lkj", "onm", "rqp", "uts", "xwv", "zyx", "bca", "ecd", "gfh"]


def _chat(w: str) -> dict:
    return {"messages": [{"role": "system", "content": "sort letters"}, {"role": "user", "content": w},
                         {"role": "assistant", "content": "".join(sorted(w))}]}


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with a character tokenizer and a chat template (its end-of-turn is EOS)."""
    from mlora_export.demo.tiny import build_tiny_model

    path = tmp_path_factory.mktemp("tiny") / "tiny-chat"
    build_tiny_model(path, seed=0, hidden_size=32, intermediate_size=48)
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory, tiny: Path) -> HubServer:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with HubServer(tmp_path_factory.mktemp("hub"), users={ALICE: "alice", BOB: "bob"}, orgs={"org": {"alice"}}) as server:
        model = {p.name: p.read_bytes() for p in tiny.iterdir()}
        extra = {"pytorch_model.bin": b"\x80\x02pickle, never fetched", "onnx/model.onnx": b"onnx, never fetched", "README.md": b"# tiny\n"}
        commit = server.seed_repo("org/tiny-chat", {**model, **extra})
        server.repo("org/tiny-chat").tags["v1"] = commit
        server.seed_repo("org/pickle-only", {"config.json": model["config.json"], "pytorch_model.bin": b"\x80\x02pickle"})
        server.seed_repo("other/gated-chat", model, gated=True, granted={"bob"})
        server.seed_repo("org/chat-data", {"data/train.jsonl": _jsonl([_chat(w) for w in WORDS]),
                                           "data/test.jsonl": _jsonl([_chat(w) for w in WORDS[:4]])}, repo_type="datasets")
        def parquet(rows: list[dict]) -> bytes:
            sink = pa.BufferOutputStream()
            pq.write_table(pa.Table.from_pylist(rows), sink)
            return sink.getvalue().to_pybytes()

        readme = (b"---\nconfigs:\n- config_name: easy\n  data_files:\n  - split: train\n    path: easy/*.parquet\n"
                  b"- config_name: hard\n  data_files:\n  - split: train\n    path: hard/*.parquet\n---\n# qa\n")
        easy = parquet([{"question": w, "answer": "".join(sorted(w)), "id": i} for i, w in enumerate(WORDS)])
        server.seed_repo("org/qa-data", {"README.md": readme, "easy/train-00000-of-00001.parquet": easy,
                                         "hard/train-00000-of-00001.parquet": parquet([{"question": "zyx", "answer": "xyz"}])},
                         repo_type="datasets", lfs_suffixes=(".parquet",))
        server.seed_repo("org/private-data", {"train.jsonl": _jsonl([_chat(w) for w in WORDS[:4]])}, repo_type="datasets", private=True)
        server.seed_repo("other/gated-data", {"train.jsonl": _jsonl([_chat(w) for w in WORDS[:4]])}, repo_type="datasets", gated=True,
                         granted={"bob"})
        yield server
    assert server.bugs == [], f"requests that hit a bug of the local Hub: {server.bugs}"


@pytest.fixture
def hub_env(hub: HubServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """As if the process had started with ``HF_ENDPOINT`` (the stand-in) and ``HF_HOME`` (a fresh
    folder) set: the variables, and what huggingface_hub and datasets derived from them at import.
    Returns ``HF_HOME``."""
    import datasets.config as dc
    import huggingface_hub.constants as hc

    home = tmp_path / "hf-home"
    for name, value in (("HF_ENDPOINT", hub.endpoint), ("HF_HOME", str(home)), ("NO_PROXY", "127.0.0.1,localhost"),
                        ("HF_HUB_DISABLE_XET", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hc, "ENDPOINT", hub.endpoint)
    monkeypatch.setattr(hc, "HUGGINGFACE_CO_URL_TEMPLATE", hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hc, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(dc, "HF_ENDPOINT", hub.endpoint)
    monkeypatch.setattr(dc, "HUB_DATASETS_URL", hub.endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}")
    monkeypatch.setattr(dc, "HF_HUB_OFFLINE", False)
    for name, sub in (("HF_DATASETS_CACHE", "datasets"), ("DOWNLOADED_DATASETS_PATH", "datasets/downloads"),
                      ("EXTRACTED_DATASETS_PATH", "datasets/downloads/extracted"), ("HF_MODULES_CACHE", "modules")):
        monkeypatch.setattr(dc, name, home / sub)
    return home


def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets.config as dc
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(dc, "HF_HUB_OFFLINE", True)


def run(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_exit_2(res, *fragments: str) -> str:
    err = res.stderr.strip()
    assert res.exit_code == 2, res.output
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for f in fragments:
        assert f in err, err
    for token in (ALICE, BOB):
        assert token not in res.output
    return err


# -- models -------------------------------------------------------------------------------------
def test_base_model_by_hub_id_downloads_only_what_a_folder_needs(hub: HubServer, hub_env: Path, tiny: Path) -> None:
    from mlora_export.base import check_base_model_dir, resolve_base_model

    hub.clear_log()
    folder = resolve_base_model("org/tiny-chat")
    assert folder.is_relative_to(hub_env / "hub" / "models--org--tiny-chat" / "snapshots")  # the Hub cache, as transformers uses it
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in tiny.iterdir())  # no .bin, README or onnx/
    assert check_base_model_dir(folder) == folder
    fetched = {r["path"].split("/resolve/")[1].split("/", 1)[1] for r in hub.requests("GET", "/resolve/")}
    assert fetched == {p.name for p in tiny.iterdir()}
    assert (folder / "model.safetensors").read_bytes() == (tiny / "model.safetensors").read_bytes()
    # a tag, and the local path that exists always winning over a Hub id of the same name
    assert resolve_base_model("org/tiny-chat", revision="v1") == folder
    with pytest.raises(HubInputError, match="revision 'nope' not found") as e:
        resolve_base_model("org/tiny-chat", revision="nope")
    assert e.value.option == "revision"
    (hub_env.parent / "org" / "tiny-chat").mkdir(parents=True)
    cwd = os.getcwd()
    os.chdir(hub_env.parent)
    try:
        assert resolve_base_model("org/tiny-chat") == Path("org/tiny-chat")
    finally:
        os.chdir(cwd)


def test_pickle_only_repo_is_refused_before_any_download(hub: HubServer, hub_env: Path) -> None:
    from mlora_export.base import resolve_base_model

    hub.clear_log()
    with pytest.raises(BaseModelError, match=r"'org/pickle-only' on the Hub has only pickle weights \(pytorch_model.bin\)"):
        resolve_base_model("org/pickle-only")
    assert hub.requests(contains="/resolve/") == []


def test_missing_gated_and_vanished_models_exit_2_one_line(hub: HubServer, hub_env: Path, tiny: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "chat.jsonl"
    data.write_bytes(_jsonl([_chat(w) for w in WORDS[:4]]))
    out = tmp_path / "out"
    args = ["--data", data, "--ranks", "1,2", "--output", out, "--max-steps", "1"]
    one_line_exit_2(run("train", "--base-model", "org/no-such-model", *args), "'org/no-such-model' is not a local folder",
                    "an anonymous request (no token)", "hf auth login")
    one_line_exit_2(run("train", "--base-model", "other/gated-chat", *args), "is gated")
    monkeypatch.setenv("HF_TOKEN", ALICE)
    one_line_exit_2(run("train", "--base-model", "other/gated-chat", *args), "is gated")  # 403: alice was not granted access
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    one_line_exit_2(run("train", "--base-model", "org/tiny-chat", *args), "refused the token (401)")
    monkeypatch.delenv("HF_TOKEN")
    # a repo that disappears after it was downloaded: online, the Hub's answer counts; offline, the cache
    hub.seed_repo("org/vanishing", {p.name: p.read_bytes() for p in tiny.iterdir()})
    from mlora_export.base import resolve_base_model

    cached = resolve_base_model("org/vanishing")
    hub.delete_repo("org/vanishing")
    one_line_exit_2(run("train", "--base-model", "org/vanishing", *args), "has no model 'org/vanishing'")
    one_line_exit_2(run("train", "--base-model", "org/tiny-chat", "--revision", "nope", *args), "revision 'nope' not found", "--revision")
    one_line_exit_2(run("train", "--base-model", str(tiny), "--revision", "v1", *args), "a revision applies to a Hub model id only")
    one_line_exit_2(run("train", "--base-model", "./no/such/folder", *args), "does not exist")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    offline(monkeypatch)
    assert resolve_base_model("org/vanishing") == cached
    one_line_exit_2(run("train", "--base-model", "org/never-downloaded", *args), "not in the local Hugging Face cache and HF_HUB_OFFLINE is set")


# -- datasets -----------------------------------------------------------------------------------
def test_dataset_by_hub_id_splits_configs_and_columns(hub: HubServer, hub_env: Path) -> None:
    train = read_records("org/chat-data")
    test = read_records(DataSource("org/chat-data", split="test"))
    assert (len(train), len(test), train.kind) == (len(WORDS), 4, "messages")
    assert train.name == "org/chat-data (train)" and train.path is None and len(train.sha256) == 64
    assert train.examples[2].messages[2] == {"role": "assistant", "content": "ghi"} and train.examples[2].where == "org/chat-data (train), row 3"
    qa = read_records(DataSource("org/qa-data", config="easy", columns=parse_columns("question=prompt,answer=completion")))
    assert [(e.prompt, e.completion) for e in qa][:2] == [("cab", "abc"), ("fed", "def")] and qa.kind == "prompt-completion"
    with pytest.raises(DataError, match=r"'org/chat-data' has no split 'validation'; its splits: 'train', 'test'") as e:
        read_records(DataSource("org/chat-data", split="validation"))
    assert e.value.option == "data_split"
    with pytest.raises(DataError, match=r"'org/qa-data' has several configs; pick one of 'easy', 'hard'"):
        read_records("org/qa-data")
    with pytest.raises(DataError, match=r"'org/qa-data' has no config 'medium'"):
        read_records(DataSource("org/qa-data", config="medium"))
    with pytest.raises(DataError, match=r"org/qa-data \[easy\] \(train\): no column 'q' .*its columns: question, answer, id"):
        read_records(DataSource("org/qa-data", config="easy", columns=(("q", "prompt"),)))
    with pytest.raises(DataError, match=r"org/qa-data \[hard\] \(train\), row 1: expected a \"text\" key"):
        read_records(DataSource("org/qa-data", config="hard"))  # unmapped columns are no record kind
    with pytest.raises(HubInputError, match="has no dataset 'org/private-data' that an anonymous request may read"):
        read_records("org/private-data")
    assert len(read_records("org/private-data", token=ALICE)) == 4
    with pytest.raises(HubInputError, match="'other/gated-data' on .* is gated"):
        read_records("other/gated-data", token=ALICE)  # 403: alice was not granted access
    assert len(read_records("other/gated-data", token=BOB)) == 4


def test_private_vanished_and_offline_datasets(hub: HubServer, hub_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets.config as dc

    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(HubInputError, match=r"refused the token \(401\)") as e:
        read_records("org/private-data")
    assert "hf_wrong" not in str(e.value)
    monkeypatch.setenv("HF_TOKEN", ALICE)
    assert len(read_records("org/private-data")) == 4  # HF_TOKEN, as datasets reads it
    monkeypatch.delenv("HF_TOKEN")
    hub.seed_repo("org/vanishing-data", {"train.jsonl": _jsonl([_chat("abc")])}, repo_type="datasets")
    assert len(read_records("org/vanishing-data")) == 1
    hub.delete_repo("org/vanishing-data", "datasets")
    # datasets' own rule: a dataset it has cached is read from the cache when the Hub fails
    assert len(read_records("org/vanishing-data")) == 1
    for name, sub in (("HF_DATASETS_CACHE", "d2"), ("DOWNLOADED_DATASETS_PATH", "d2/downloads")):
        monkeypatch.setattr(dc, name, hub_env / sub)
    with pytest.raises(HubInputError, match="has no dataset 'org/vanishing-data'"):
        read_records("org/vanishing-data")
    offline(monkeypatch)
    with pytest.raises(HubInputError, match="not in the local cache and HF_HUB_OFFLINE is set"):
        read_records("org/never-loaded")


def test_paths_info_answers_the_client(hub: HubServer, hub_env: Path) -> None:
    """What ``HfFileSystem.info`` asks for (``expand``/``refresh``): files, folders, and nothing for a missing path."""
    from huggingface_hub import HfApi, HfFileSystem

    infos = HfApi().get_paths_info("org/qa-data", ["README.md", "easy", "nope.txt"], repo_type="dataset")
    assert [(type(i).__name__, i.path) for i in infos] == [("RepoFile", "README.md"), ("RepoFolder", "easy")]
    info = HfFileSystem().info("datasets/org/qa-data/README.md", refresh=True)
    assert info["type"] == "file" and info["size"] == hub.head_tree("org/qa-data", repo_type="datasets")["README.md"].size


# -- the commands -------------------------------------------------------------------------------
def test_train_eval_merge_gguf_with_hub_ids(hub: HubServer, hub_env: Path, tmp_path: Path) -> None:
    from mlora_export.adapter import NestedAdapter

    out = tmp_path / "nested"
    res = run("train", "--base-model", "org/tiny-chat", "--data", "org/chat-data", "--ranks", "1,2", "--output", out,
              "--max-steps", "2", "--batch-size", "4", "--json")
    assert res.exit_code == 0, res.output
    adapter = NestedAdapter.load(out)
    assert adapter.base_model == "org/tiny-chat"
    training = json.loads((out / "matryoshka_config.json").read_text())["training"]
    assert training["data"] == "org/chat-data (train)" and training["data_kind"] == "messages"
    res = run("eval", out, "--base-model", "org/tiny-chat", "--data", "org/chat-data", "--metric", "exact-match", "--output",
              tmp_path / "eval", "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["data"]["kind"] == "messages" and info["data"]["examples"] == 4 and info["data"]["path"] == "org/chat-data (test)"
    assert info["base_model"] == "org/tiny-chat"
    res = run("merge", out, "--base-model", "org/tiny-chat", "--revision", "v1", "--rank", "2", "--output", tmp_path / "merged")
    assert res.exit_code == 0, res.output
    hub.clear_log()
    res = run("gguf", out, "--ranks", "2", "--base-model", "org/tiny-chat", "--output", tmp_path / "gguf")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "gguf" / "r2.gguf").is_file()
    one_line_exit_2(run("eval", out, "--base-model", "org/tiny-chat", "--data", "org/chat-data", "--data-split", "dev", "--output",
                        tmp_path / "e2"), "has no split 'dev'", "--data-split")
    one_line_exit_2(run("train", "--base-model", "org/tiny-chat", "--data", "org/no-such-data", "--ranks", "1", "--output", tmp_path / "t2"),
                    "'org/no-such-data' is not a local file")
    one_line_exit_2(run("train", "--base-model", "org/tiny-chat", "--data", "org/qa-data", "--data-config", "easy", "--data-columns",
                        "question", "--ranks", "1", "--output", tmp_path / "t3"), "not source=key", "--data-columns")
    assert not (tmp_path / "e2").exists() and not (tmp_path / "t2").exists() and not (tmp_path / "t3").exists()


@pytest.mark.slow
def test_a_real_process_reads_hf_endpoint_home_and_token(hub: HubServer, tmp_path: Path) -> None:
    """No stand-in of the environment: a fresh process with HF_ENDPOINT, HF_HOME and HF_TOKEN set."""
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HOME": str(tmp_path / "home"), "HF_TOKEN": ALICE, "HF_HUB_DISABLE_XET": "1",
           "NO_PROXY": "127.0.0.1,localhost", "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    cmd = [sys.executable, "-m", "mlora_export", "train", "--base-model", "org/tiny-chat", "--data", "org/private-data", "--ranks", "1",
           "--output", str(tmp_path / "out"), "--max-steps", "1", "--batch-size", "2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert list((tmp_path / "home" / "hub" / "models--org--tiny-chat" / "snapshots").iterdir())
    assert ALICE not in proc.stdout + proc.stderr
    env["HF_TOKEN"] = "hf_wrong_token"
    proc = subprocess.run(cmd[:-6] + ["--output", str(tmp_path / "out2"), "--max-steps", "1"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "hf_wrong_token" not in proc.stderr, proc.stderr
