"""``eval --tasks``: lm-evaluation-harness tasks scored per rank on one loaded model.

Offline: the tasks are YAML tasks over local JSONL files (``dataset_path: json``), one that
generates (exact match, under two filters) and one multiple choice (log-likelihood accuracy). The
reference is lm-eval's own ``HFLM(pretrained=<base folder>, peft=<PEFT slice folder>)`` at each
rank, run through ``lm_eval.simple_evaluate``. Importing lm-eval and indexing tasks is slow, so
the pico model, the tasks and one ``TaskManager`` are built once for the module.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from mlora_export.cli.main import main
from mlora_export.errors import ConfigError, MissingExtraError, RankError
from mlora_export.evaluation import EvalOptions, LmEvalTasks, evaluate
from mlora_export.evaluation.lm_eval_tasks import read_metrics
from mlora_export.metric_names import TASKS_MEAN, is_fraction, parse_task_metric
from mlora_export.method import aurac
from tests.common import random_nested
from tests.hub_server import HubServer

RANKS = (1, 2, 4, 8)
WORDS = ["abc", "hello", "xyz", "mlora", "rank", "eval", "cat", "dog", "sun", "tree", "leaf", "moon"]
LIMIT, FEWSHOT, BATCH = 8, 2, 4
TASKS = ("tiny_gen", "tiny_mc")
ALICE = "hf_alice_token_123"

GEN_YAML = """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: generate_until
test_split: test
fewshot_split: test
num_fewshot: 0
doc_to_text: "{{{{q}}}}="
doc_to_target: "{{{{a}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
filter_list:
  - name: raw
    filter:
      - function: take_first
  - name: first-word
    filter:
      - function: regex
        regex_pattern: "(\\\\S+)"
      - function: take_first
metadata:
  version: 1.0
"""

MC_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
fewshot_split: test
doc_to_text: "{{{{q}}}}:"
doc_to_target: label
doc_to_choice: choices
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def run(*args: object) -> Any:
    return CliRunner().invoke(main, [str(a) for a in args])


def reference(s: dict[str, Any], adapter: Path | None, tasks: tuple[str, ...] = TASKS, **kw: Any) -> dict[str, Any]:
    """lm-eval's own run of one PEFT slice (or the bare base): a fresh HFLM that loads both from disk."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(s["base"]), peft=None if adapter is None else str(adapter), batch_size=BATCH, device="cpu")
    return simple_evaluate(model=lm, tasks=list(tasks), task_manager=s["tm"], num_fewshot=FEWSHOT, limit=LIMIT, **kw)


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A pico Llama (char tokenizer), a random nested adapter (r=8) and its slices, the two tasks, one TaskManager.

    The generation task's targets are, for every other document, what lm-eval generates with the
    rank-2 slice, so that its exact match is neither 0 nor the same at every rank.
    """
    from lm_eval.tasks import TaskManager

    from mlora_export.base import load_base_model
    from mlora_export.converters.slice import slice_adapter
    from mlora_export.demo.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("lm-eval")
    base = root / "base"
    build_tiny_model(base, seed=0)
    model = load_base_model(base, dtype="float32", device="cpu")
    random_nested(model, root / "nested", arch="llama", r=8, train_ranks=RANKS, std=0.15, seed=3)
    random_nested(model, root / "nested4", arch="llama", r=4, train_ranks=(1, 2, 4), std=0.15, seed=4)
    slice_adapter(root / "nested", RANKS, root / "slices")
    tasks = root / "tasks"
    tasks.mkdir()
    gen, mc = root / "gen.jsonl", root / "mc.jsonl"
    gen.write_text("".join(json.dumps({"q": w, "a": w[::-1]}) + "\n" for w in WORDS), encoding="utf-8")
    mc.write_text("".join(json.dumps({"q": w, "choices": [w, w[::-1], w.upper()], "label": i % 3}) + "\n" for i, w in enumerate(WORDS)),
                  encoding="utf-8")
    (tasks / "tiny_gen.yaml").write_text(GEN_YAML.format(data=gen), encoding="utf-8")
    (tasks / "tiny_mc.yaml").write_text(MC_YAML.format(data=mc), encoding="utf-8")
    (root / "pc.jsonl").write_text("".join(json.dumps({"prompt": f"{w}=", "completion": w[::-1]}) + "\n" for w in WORDS), encoding="utf-8")
    s = {"root": root, "base": base, "nested": root / "nested", "nested4": root / "nested4", "slices": root / "slices",
         "tasks": tasks, "pc": root / "pc.jsonl", "tm": TaskManager(include_path=str(tasks), include_defaults=False)}
    out = reference(s, s["slices"] / "r2", ("tiny_gen",), log_samples=True)
    said = [x["filtered_resps"][0] for x in sorted(out["samples"]["tiny_gen"], key=lambda x: x["doc_id"]) if x["filter"] == "raw"]
    assert len(said) == LIMIT and len(set(said)) > 2
    rows = [{"q": w, "a": said[i] if i < LIMIT and i % 2 == 0 else w[::-1]} for i, w in enumerate(WORDS)]
    gen.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return s


def _our_scores(point: Any, metrics: dict[str, Any]) -> dict[tuple[str, str], float | None]:
    """A point's task scores keyed as lm-eval keys them: ``(task, "metric,filter")``."""
    return {(metrics[n].task, metrics[n].key): v["value"] for n, v in point.tasks.items() if n != TASKS_MEAN}


def _lm_eval_scores(results: dict[str, Any]) -> dict[tuple[str, str], float]:
    return {(task, key): float(v) for task, entry in results["results"].items() for key, v in entry.items()
            if "," in key and "_stderr," not in key}


# -- names ---------------------------------------------------------------------------------------
def test_metric_names_of_an_lm_eval_result_with_filters() -> None:
    """gsm8k reports exact_match under strict-match then flexible-extract: the first is gsm8k:exact_match."""
    results = {
        "results": {
            "gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.31, "exact_match_stderr,strict-match": 0.01,
                      "exact_match,flexible-extract": 0.35, "exact_match_stderr,flexible-extract": 0.02},
            "arc_easy": {"alias": "arc_easy", "acc,none": 0.6, "acc_stderr,none": 0.01, "acc_norm,none": 0.55, "acc_norm_stderr,none": "N/A"},
            "wikitext": {"alias": "wikitext", "word_perplexity,none": 30.5, "word_perplexity_stderr,none": "N/A"},
        },
        "higher_is_better": {"gsm8k": {"exact_match": True}, "arc_easy": {"acc": True, "acc_norm": True},
                             "wikitext": {"word_perplexity": False}},
    }
    metrics, scores = read_metrics(results)
    assert list(metrics) == ["gsm8k:exact_match", "gsm8k:exact_match:flexible-extract", "arc_easy:acc", "arc_easy:acc_norm",
                             "wikitext:word_perplexity"]
    assert metrics["gsm8k:exact_match"].key == "exact_match,strict-match"
    assert scores["gsm8k:exact_match"] == {"value": 0.31, "stderr": 0.01}
    assert scores["arc_easy:acc_norm"] == {"value": 0.55, "stderr": None}
    assert metrics["wikitext:word_perplexity"].higher_is_better is False and not metrics["wikitext:word_perplexity"].fraction
    assert parse_task_metric("gsm8k:exact_match:flexible-extract") == ("gsm8k", "exact_match", "flexible-extract")
    assert parse_task_metric("exact-match") is None and parse_task_metric("a:b:c:d") is None and parse_task_metric("a: b") is None
    assert is_fraction("gsm8k:exact_match") and is_fraction("arc_easy:acc_norm") and is_fraction(TASKS_MEAN)
    assert is_fraction("exact-match") and not is_fraction("loss") and not is_fraction("wikitext:word_perplexity")


# -- one load, lm-eval's own numbers -------------------------------------------------------------
def test_scores_equal_lm_eval_hflm_on_peft_slices_and_the_base_is_loaded_once(lm: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Every metric at every rank (rank 0: the base) equals lm-eval's HFLM(pretrained=base, peft=slice);
    the nested adapter (switched in place) and its slices as a collection give one curve each, in one call
    that loads the base weights once."""
    from transformers import PreTrainedModel

    import mlora_export.evaluation.run as ev

    loads: list[str] = []
    real_load, real_from_pretrained = ev.load_base_model, PreTrainedModel.from_pretrained.__func__

    def counting_load(*args: object, **kwargs: object) -> object:  # pass-through spies
        loads.append("load_base_model")
        return real_load(*args, **kwargs)

    def counting_from_pretrained(cls: type, *args: object, **kwargs: object) -> object:
        loads.append(f"{cls.__name__}.from_pretrained")
        return real_from_pretrained(cls, *args, **kwargs)

    monkeypatch.setattr(ev, "load_base_model", counting_load)
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(counting_from_pretrained))
    spec = LmEvalTasks(TASKS, num_fewshot=FEWSHOT, limit=LIMIT, task_manager=lm["tm"])
    res = evaluate([lm["nested"], lm["slices"]], lm["base"], None, RANKS,
                   EvalOptions(lm_eval=spec, with_base=True, batch_size=BATCH, device="cpu"))
    monkeypatch.undo()
    assert loads == ["load_base_model", "LlamaForCausalLM.from_pretrained"], loads

    metrics = res.tasks.metrics
    assert list(metrics) == ["tiny_gen:exact_match", "tiny_gen:exact_match:first-word", "tiny_mc:acc", "tiny_mc:acc_norm", TASKS_MEAN]
    assert metrics["tiny_gen:exact_match"].key == "exact_match,raw" and metrics["tiny_gen:exact_match:first-word"].key == "exact_match,first-word"
    assert res.tasks.headlines == ["tiny_gen:exact_match", "tiny_mc:acc"] and res.metric == "tiny_gen:exact_match"
    assert res.tasks.n_shot == {"tiny_gen": 0, "tiny_mc": FEWSHOT}  # the task that fixes 0 shots keeps it
    nested, slices = res.curves
    assert [p.rank for p in nested.points] == list(RANKS) and slices.kind == "collection"

    expected = {0: reference(lm, None)["results"], **{k: reference(lm, lm["slices"] / f"r{k}")["results"] for k in RANKS}}
    assert _our_scores(res.base, metrics) == _lm_eval_scores({"results": expected[0]})
    for curve in (nested, slices):
        for p in curve.points:
            assert _our_scores(p, metrics) == _lm_eval_scores({"results": expected[p.rank]}), (curve.label, p.rank)
            stderr = {n: v["stderr"] for n, v in p.tasks.items() if n != TASKS_MEAN}
            assert stderr == {n: float(expected[p.rank][m.task][m.key.replace(",", "_stderr,")]) for n, m in metrics.items() if n != TASKS_MEAN}
            assert p.tasks[TASKS_MEAN]["value"] == pytest.approx((p.tasks["tiny_gen:exact_match"]["value"] + p.tasks["tiny_mc:acc"]["value"]) / 2)
            assert p.score == p.tasks["tiny_gen:exact_match"]["value"] and p.loss is None
    # the ranks differ: the in-place switch is not a no-op, and the generation task is not all 0
    em = [p.tasks["tiny_gen:exact_match"]["value"] for p in nested.points]
    acc = [p.tasks["tiny_mc:acc"]["value"] for p in nested.points]
    assert em[1] == 0.5 and len(set(em)) > 1 and len(set(acc)) > 1
    for name in metrics:
        assert nested.aurac_by_metric[name] == aurac(list(RANKS), [p.tasks[name]["value"] for p in nested.points])
    assert nested.aurac == nested.aurac_by_metric["tiny_gen:exact_match"]
    d = res.to_dict()
    assert d["lm_eval"]["metrics"]["tiny_gen:exact_match"]["lm_eval_metric"] == "exact_match,raw"
    assert d["lm_eval"]["n_samples"] == {"tiny_gen": LIMIT, "tiny_mc": LIMIT} and d["data"] is None


# -- the command: data and tasks, record, bundle, pull ---------------------------------------------
@pytest.fixture
def hub_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The local Hub stand-in, Xet off, loopback unproxied, no real login."""
    import huggingface_hub.constants as hc

    login = tmp_path_factory.mktemp("login")
    monkeypatch.setattr(hc, "HF_TOKEN_PATH", str(login / "token"))
    monkeypatch.setattr(hc, "HF_STORED_TOKENS_PATH", str(login / "stored_tokens"))
    monkeypatch.setattr(hc, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with HubServer(tmp_path_factory.mktemp("hub"), users={ALICE: "alice"}, orgs={"org": {"alice"}}) as server:
        yield server
    assert server.bugs == []


def test_cli_data_and_tasks_record_bundle_and_pull_by_a_task_metric(lm: dict[str, Any], tmp_path: Path, hub_env: HubServer) -> None:
    """One call scores our data metric and the lm-eval tasks (two adapters: two curves in one plot);
    --record stores every metric; bundle copies them into the manifest; pull --rank auto --metric
    tiny_mc:acc chooses by them."""
    nested = tmp_path / "nested"
    shutil.copytree(lm["nested"], nested)
    out = tmp_path / "eval"
    res = run("eval", nested, lm["nested4"], "--base-model", lm["base"], "--data", lm["pc"], "--metric", "accuracy",
              "--tasks", ",".join(TASKS), "--include-path", lm["tasks"], "--num-fewshot", FEWSHOT, "--limit", LIMIT,
              "--ranks", ",".join(map(str, RANKS)), "--batch-size", BATCH, "--record", "--output", out)
    assert res.exit_code == 0, res.output
    assert "tiny_gen:exact_match" in res.stdout and "tasks:mean" in res.stdout and "token acc *" in res.stdout
    results = json.loads((out / "results.json").read_text())
    assert (out / "rank_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert results["metric"] == "accuracy" and results["data"]["examples"] == len(WORDS)
    first, second = results["adapters"]
    assert [p["rank"] for p in second["ranks"]] == [1, 2, 4]  # r=4: rank 8 skipped for it
    assert set(first["aurac_by_metric"]) == {"accuracy", "tiny_gen:exact_match", "tiny_gen:exact_match:first-word", "tiny_mc:acc",
                                             "tiny_mc:acc_norm", TASKS_MEAN}
    for p in first["ranks"]:
        assert p["token_accuracy"] == p["score"] and set(p["tasks"]) == set(first["aurac_by_metric"]) - {"accuracy"}
    recorded = json.loads((nested / "matryoshka_config.json").read_text())["evaluation"]
    assert set(recorded) == set(first["aurac_by_metric"])
    acc = {p["rank"]: p["tasks"]["tiny_mc:acc"]["value"] for p in first["ranks"]}
    assert recorded["tiny_mc:acc"]["ranks"] == [{"rank": k, "score": v} for k, v in acc.items()]
    assert recorded["tiny_mc:acc"]["lm_eval"]["metric"] == "acc,none" and recorded["tiny_mc:acc"]["data"] == "lm-eval tiny_mc"
    assert recorded["tiny_mc:acc"]["aurac"] == first["aurac_by_metric"]["tiny_mc:acc"]

    bundle = tmp_path / "bundle"
    assert run("bundle", nested, "--ranks", "1,2,4,8", "--output", bundle, "--repo-id", "org/lm").exit_code == 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert {r["rank"]: r["metrics"]["tiny_mc:acc"] for r in manifest["ranks"]} == acc
    assert run("push-hub", bundle, "--repo-id", "org/lm", "--endpoint", hub_env.endpoint, "--token", ALICE).exit_code == 0
    goal = sorted(set(acc.values()))[1]  # not reached by the worst rank: the smallest rank that reaches it
    want = min(k for k, v in acc.items() if v >= goal)
    pulled = run("pull", "org/lm", "--rank", "auto", "--min-score", goal * 100, "--metric", "tiny_mc:acc",
                 "--output", tmp_path / "pulled", "--endpoint", hub_env.endpoint, "--json")
    assert pulled.exit_code == 0, pulled.output
    got = json.loads(pulled.stdout)
    assert got["rank"] == want and "tiny_mc:acc ≥" in got["reason"], got
    other = run("pull", "org/lm", "--rank", "auto", "--within", 100, "--metric", "nope:acc", "--output", tmp_path / "p2",
                "--endpoint", hub_env.endpoint)
    assert other.exit_code == 2 and "no 'nope:acc' evaluation" in other.stderr
    bad = run("pull", "org/lm", "--rank", "auto", "--within", 1, "--metric", "not a metric", "--output", tmp_path / "p3")
    assert bad.exit_code == 2 and "lm-eval task metric" in bad.stderr


# -- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("extra", "message"), [
    (["--tasks", "tiny_mc", "--ranks", "1,16"], "rank 16 above the max rank of every adapter given (8)"),
    (["--tasks", "tiny_mc,no_such_task"], "lm-eval knows no task, group or tag 'no_such_task'"),
    (["--tasks", "tiny_mc,", "--ranks", "2"], "'tiny_mc,' has an empty name"),
    (["--tasks", "tiny_mc", "--ranks", "0,2"], "rank 0 in '0,2' must be at least 1"),
    (["--limit", "3", "--apply-chat-template", "--data", "x.jsonl"], "--limit, --apply-chat-template apply only with --tasks"),
    (["--tasks", "tiny_mc", "--include-path", "/no/such/folder"], "is not a folder of task YAML files"),
    (["--num-fewshot", "2", "--data", "x.jsonl"], "--num-fewshot applies only with --tasks"),
    ([], "nothing to evaluate on: give --data, --tasks, or both"),
])
def test_cli_bad_input_exits_2_in_one_line_and_writes_nothing(lm: dict[str, Any], tmp_path: Path, extra: list[str], message: str) -> None:
    include = [] if "--include-path" in extra else ["--include-path", lm["tasks"]] if "--tasks" in extra else []
    out = tmp_path / "out"
    res = run("eval", lm["nested"], "--base-model", lm["base"], *extra, *include, "--output", out)
    assert res.exit_code == 2, res.output
    assert message in res.stderr and res.stderr.strip().count("\n") == 0, res.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_missing_lm_eval_names_the_extra(lm: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now fails as when it is not installed
    with pytest.raises(MissingExtraError) as e:
        evaluate([lm["nested"]], lm["base"], None, RANKS, EvalOptions(lm_eval=LmEvalTasks(("tiny_mc",)), device="cpu"))
    assert e.value.extra == "lm-eval"
    res = run("eval", lm["nested"], "--base-model", lm["base"], "--tasks", "tiny_mc", "--output", tmp_path / "out")
    assert res.exit_code == 2 and "pip install 'mlora-export[lm-eval]'" in res.stderr and res.stderr.strip().count("\n") == 0
    assert not (tmp_path / "out").exists()


def test_library_refuses_bad_settings_before_loading(lm: dict[str, Any]) -> None:
    tm = lm["tm"]
    for spec, match in ((LmEvalTasks(("tiny_mc", "tiny_*x"), task_manager=tm), "'tiny_\\*x'"),
                        (LmEvalTasks(("missing.yaml",), task_manager=tm), "'missing.yaml'"),
                        (LmEvalTasks(("tiny_mc",), num_fewshot=-1), "num fewshot"),
                        (LmEvalTasks(("tiny_mc",), limit=0), "limit"),
                        (LmEvalTasks(("tiny_mc",), include_path=(str(lm["tasks"]),), task_manager=tm), "not both")):
        with pytest.raises(ConfigError, match=match):
            evaluate([lm["nested"]], lm["base"], None, RANKS, EvalOptions(lm_eval=spec, device="cpu"))
    for spec, match in ((LmEvalTasks(), "non-empty list"), (LmEvalTasks(("tiny_mc", "")), "non-empty list")):
        with pytest.raises(ConfigError, match=match):
            evaluate([lm["nested"]], lm["base"], None, RANKS, EvalOptions(lm_eval=spec, device="cpu"))
    with pytest.raises(ConfigError, match="nothing to evaluate on"):
        evaluate([lm["nested"]], lm["base"], None, RANKS, EvalOptions(device="cpu"))
    with pytest.raises(RankError, match="above the max rank"):
        evaluate([lm["nested"]], lm["base"], None, (2, 9), EvalOptions(lm_eval=LmEvalTasks(("tiny_mc",), task_manager=tm), device="cpu"))
