"""Per-rank evaluation (``mlora-export eval``): AURAC, equality with PEFT slices, the plot, --record, bad inputs."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from mlora_export.adapter import CONFIG_NAME, NestedAdapter
from mlora_export.base import load_base_model, load_tokenizer
from mlora_export.cli.main import main
from mlora_export.converters.slice import slice_adapter
from mlora_export.errors import RankError
from mlora_export.evaluation import (
    EvalOptions,
    evaluate,
    greedy_completions,
    load_eval_data,
    score_model,
)
from mlora_export.method import aurac
from tests.common import build_model, random_nested

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RANKS = (1, 2, 4, 8)


# -- AURAC on hand-computed values ---------------------------------------------------------------
def test_aurac_hand_computed_four_ranks() -> None:
    # ranks 1,2,4,8, scores 0, .5, .5, 1
    # v1 (over k):      [1·(0+.5)/2 + 2·(.5+.5)/2 + 4·(.5+1)/2] / (8-1) = (0.25 + 1 + 3) / 7
    # v2 (over log2 k): [1·0.25 + 1·0.5 + 1·0.75] / (3-0) = 0.5
    out = aurac([1, 2, 4, 8], [0.0, 0.5, 0.5, 1.0])
    assert out["v1"] == pytest.approx(4.25 / 7)
    assert out["v2"] == pytest.approx(0.5)


def test_aurac_non_power_of_two_and_loss_values() -> None:
    # ranks 2, 6 with losses 3.0, 1.0: one trapezoid, both versions = the mean of the ends = 2.0
    out = aurac([2, 6], [3.0, 1.0])
    assert out == {"v1": pytest.approx(2.0), "v2": pytest.approx(2.0)}
    # ranks 1, 3, 9 (log3-spaced): v2 weights the two intervals by log2 3 and log2 3 → equal halves
    out = aurac([1, 3, 9], [0.0, 1.0, 1.0])
    assert out["v1"] == pytest.approx((2 * 0.5 + 6 * 1.0) / 8)
    assert out["v2"] == pytest.approx((0.5 + 1.0) / 2)


def test_aurac_one_rank_and_unsorted_input() -> None:
    assert aurac([16], [0.3]) == {"v1": 0.3, "v2": 0.3}
    with pytest.raises(RankError, match="strictly increasing"):
        aurac([1, 4, 2], [0.1, 0.2, 0.3])
    with pytest.raises(RankError, match="strictly increasing"):
        aurac([2, 2], [0.1, 0.2])


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Llama base with a char tokenizer, a random nested adapter (r=8), its slices, and data files."""
    from mlora_export.demo.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("eval")
    base = root / "base"
    build_tiny_model(base, seed=0)
    model = load_base_model(base, dtype="float32", device="cpu")
    random_nested(model, root / "nested", arch="llama", r=8, train_ranks=RANKS, std=0.15, seed=3)
    random_nested(model, root / "nested2", arch="llama", r=4, train_ranks=(1, 2, 4), std=0.15, seed=4)
    slice_adapter(root / "nested", RANKS, root / "slices")
    words = ["abc", "hello", "xyz", "mlora", "rank", "eval", "cat", "dog", "sun", "tree"]
    with open(root / "pc.jsonl", "w") as f:
        for w in words:
            f.write(json.dumps({"prompt": f"{w}=", "completion": w[::-1]}) + "\n")
    with open(root / "text.jsonl", "w") as f:
        for w in words:
            f.write(json.dumps({"text": f"the {w} is here"}) + "\n")
    # exact-match data whose completions are the rank-2 PEFT slice's own greedy outputs
    from peft import PeftModel

    tok = load_tokenizer(base)
    data = load_eval_data(root / "pc.jsonl", tok)
    peft2 = PeftModel.from_pretrained(load_base_model(base, dtype="float32", device="cpu"), str(root / "slices" / "r2")).eval()
    preds = greedy_completions(peft2, tok, data, batch_size=4)
    kept = [(w, p) for w, p in zip(words, preds) if p and p == p.strip()]
    assert len(kept) >= 5
    with open(root / "em.jsonl", "w") as f:
        for w, p in kept:
            f.write(json.dumps({"prompt": f"{w}=", "completion": p}) + "\n")
    return {"root": root, "base": base, "nested": root / "nested", "nested2": root / "nested2", "slices": root / "slices",
            "pc": root / "pc.jsonl", "text": root / "text.jsonl", "em": root / "em.jsonl"}


def _peft_slice_scores(s: dict[str, Path], data_path: Path, metric: str) -> dict[int, object]:
    """Each slice loaded with real PeftModel.from_pretrained on a fresh base, scored one by one."""
    from peft import PeftModel

    tok = load_tokenizer(s["base"])
    data = load_eval_data(data_path, tok)
    out = {}
    for k in RANKS:
        model = PeftModel.from_pretrained(load_base_model(s["base"], dtype="float32", device="cpu"), str(s["slices"] / f"r{k}")).eval()
        out[k] = score_model(model, tok, data, metric=metric, batch_size=3, rank=k)
    return out


# -- eval == PEFT slices one by one ------------------------------------------------------------
@pytest.mark.parametrize(("data_key", "metric"), [("pc", "accuracy"), ("text", "loss"), ("em", "exact-match")])
def test_eval_matches_peft_slices(setup: dict[str, Path], data_key: str, metric: str) -> None:
    res = evaluate([setup["nested"]], setup["base"], setup[data_key], RANKS, EvalOptions(metric=metric, batch_size=4, device="cpu"))
    (curve,) = res.curves
    assert [p.rank for p in curve.points] == list(RANKS)
    ref = _peft_slice_scores(setup, setup[data_key], metric)
    for p in curve.points:
        r = ref[p.rank]
        assert p.loss == pytest.approx(r.loss, rel=1e-5, abs=1e-6)
        assert p.token_accuracy == r.token_accuracy
        assert p.exact_match == r.exact_match
        assert p.score == pytest.approx(r.score, rel=1e-5, abs=1e-6)
        assert p.perplexity == pytest.approx(math.exp(p.loss), rel=1e-9)
    scores = [p.score for p in curve.points]
    assert curve.aurac == pytest.approx(aurac(list(RANKS), scores))
    if metric == "exact-match":
        assert curve.points[1].score == 1.0  # the data are rank 2's own greedy outputs
    # ranks really differ (the in-place switch is not a no-op)
    assert len({round(p.loss, 6) for p in curve.points}) == len(RANKS)


def test_collection_and_several_adapters_share_one_base(setup: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Slices as one collection curve equal the nested curve; an adapter evaluated after another (base unloaded in
    between) scores as when evaluated alone; the base weights are loaded once for all adapters and ranks."""
    from transformers import PreTrainedModel

    import mlora_export.evaluation.run as ev

    loads: list[str] = []
    real_load, real_from_pretrained = ev.load_base_model, PreTrainedModel.from_pretrained.__func__

    def counting_load(*args: object, **kwargs: object) -> object:  # a pass-through spy, not a mock
        loads.append("load_base_model")
        return real_load(*args, **kwargs)

    def counting_from_pretrained(cls: type, *args: object, **kwargs: object) -> object:
        loads.append(f"{cls.__name__}.from_pretrained")
        return real_from_pretrained(cls, *args, **kwargs)

    monkeypatch.setattr(ev, "load_base_model", counting_load)
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(counting_from_pretrained))
    both = evaluate([setup["nested2"], setup["nested"], setup["slices"]], setup["base"], setup["text"], "all", EvalOptions(device="cpu"))
    assert sum(len(c.points) for c in both.curves) == 3 + 4 + 4
    assert loads[0] == "load_base_model" and loads.count("load_base_model") == 1
    assert len([x for x in loads if x.endswith(".from_pretrained")]) == 1, loads
    monkeypatch.undo()
    alone = evaluate([setup["nested"]], setup["base"], setup["text"], "all", EvalOptions(device="cpu"))
    nested2, nested, slices = both.curves
    assert nested2.method == "matryoshka" and [p.rank for p in nested2.points] == [1, 2, 4]
    assert slices.kind == "collection" and [p.rank for p in slices.points] == list(RANKS)
    for a, b, c in zip(nested.points, alone.curves[0].points, slices.points):
        assert a.loss == pytest.approx(b.loss, rel=1e-6)
        assert a.loss == pytest.approx(c.loss, rel=1e-5)
    assert slices.aurac == pytest.approx(nested.aurac, rel=1e-5)


# -- CLI: results, plot, --record --------------------------------------------------------------
def test_cli_eval_writes_results_plot_and_records(setup: dict[str, Path], tmp_path: Path) -> None:
    import matplotlib.image

    nested = tmp_path / "nested"
    import shutil

    shutil.copytree(setup["nested"], nested)
    before = json.loads((nested / CONFIG_NAME).read_text())
    out = tmp_path / "eval"
    r = CliRunner().invoke(main, ["eval", str(nested), str(setup["slices"]), "--base-model", str(setup["base"]),
                                  "--data", str(setup["pc"]), "--ranks", "1,2,8", "--metric", "accuracy",
                                  "--output", str(out), "--record", "--with-base", "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["recorded"] == [str(nested / CONFIG_NAME)]
    results = json.loads((out / "results.json").read_text())
    assert results["metric"] == "accuracy" and results["higher_is_better"] is True
    assert [p["rank"] for p in results["adapters"][0]["ranks"]] == [1, 2, 8]
    assert [p["rank"] for p in results["adapters"][1]["ranks"]] == [1, 2, 4, 8]
    assert results["base"]["rank"] == 0
    png = (out / "rank_curve.png").read_bytes()
    assert png[:8] == PNG_MAGIC
    img = matplotlib.image.imread(out / "rank_curve.png")
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert sorted(os.listdir(out)) == ["rank_curve.png", "results.json"]
    # --record: kept through NestedAdapter.load (MatryoshkaConfig.extra), other fields untouched
    loaded = NestedAdapter.load(nested)
    rec = loaded.config.extra["evaluation"]["accuracy"]
    assert [p["rank"] for p in rec["ranks"]] == [1, 2, 8]
    assert [p["score"] for p in rec["ranks"]] == [p["score"] for p in results["adapters"][0]["ranks"]]
    assert rec["aurac"] == results["adapters"][0]["aurac"] and rec["data"] == "pc.jsonl"
    after = json.loads((nested / CONFIG_NAME).read_text())
    assert {k: v for k, v in after.items() if k != "evaluation"} == before
    assert not [f for f in os.listdir(nested) if f.endswith(".tmp")]
    # a second metric is added next to the first; the same metric is replaced
    import torch

    before = torch.get_num_threads()
    r = CliRunner().invoke(main, ["eval", str(nested), "--base-model", str(setup["base"]), "--data", str(setup["text"]),
                                  "--output", str(out), "--force", "--record", "--threads", "1"])
    assert r.exit_code == 0, r.output
    assert torch.get_num_threads() == before  # --threads holds for the command only
    header = r.output.splitlines()[0].split()
    assert header == ["adapter", "rank", "loss", "*", "perplexity", "token", "acc"], r.output  # each number once; --metric marked
    assert "(* = --metric loss, the score of the AURAC below)" in r.output
    assert "AURAC v2" in r.output and "lower is better" in r.output
    assert sorted(NestedAdapter.load(nested).config.extra["evaluation"]) == ["accuracy", "loss"]
    # the recorded numbers flow into a variant bundle: manifest and model card show them
    from mlora_export.converters.hub import write_bundle

    loss = json.loads((out / "results.json").read_text())["adapters"][0]
    b = write_bundle(nested, (1, 2, 4), tmp_path / "bundle")
    by_rank = {p["rank"]: p["score"] for p in loss["ranks"]}
    acc_by_rank = {p["rank"]: p["score"] for p in results["adapters"][0]["ranks"]}
    for r in b.ranks:
        assert r.metrics["loss"] == pytest.approx(by_rank[r.rank])
        assert r.metrics.get("accuracy") == (pytest.approx(acc_by_rank[r.rank]) if r.rank in acc_by_rank else None)
    assert b.manifest["evaluation"]["loss"]["aurac"] == pytest.approx(loss["aurac"])
    card = (b.path / "README.md").read_text()
    assert "| rank | folder | parameters | size | accuracy | loss |" in card and "AURAC (loss)" in card
    assert f"{by_rank[2]:.4g}" in card


# -- CLI: bad inputs ---------------------------------------------------------------------------
def _bad_cases(s: dict[str, Path], tmp: Path) -> list[tuple[list[str], str]]:
    bad_json = tmp / "bad.jsonl"
    bad_json.write_text('{"prompt": "a=", "completion": "a"}\n{not json\n')
    no_keys = tmp / "nokeys.jsonl"
    no_keys.write_text('{"question": "a"}\n')
    gpt2_dir = tmp / "gpt2-adapter"
    random_nested(build_model("gpt2"), gpt2_dir, arch="gpt2", r=4, train_ranks=(2, 4))
    not_adapter = tmp / "empty-folder"
    not_adapter.mkdir()
    base, nested, pc = str(s["base"]), str(s["nested"]), str(s["pc"])
    return [
        (["eval", str(tmp / "missing"), "--base-model", base, "--data", pc], "does not exist"),
        (["eval", str(not_adapter), "--base-model", base, "--data", pc], "neither an adapter folder"),
        (["eval", nested, "--base-model", base, "--data", str(bad_json)], "line 2: not valid JSON"),
        (["eval", nested, "--base-model", base, "--data", str(no_keys)], "line 1"),
        (["eval", nested, "--base-model", base, "--data", str(tmp / "nope.jsonl")], "does not exist"),
        (["eval", nested, "--base-model", base, "--data", pc, "--ranks", "16,32"], "none of the ranks"),
        (["eval", nested, "--base-model", base, "--data", pc, "--ranks", "0,2"], "must be at least 1"),
        (["eval", nested, "--base-model", base, "--data", pc, "--metric", "bleu"], "bleu"),
        (["eval", nested, "--base-model", base, "--data", str(s["text"]), "--metric", "exact-match"], "exact-match needs"),
        (["eval", nested, "--base-model", str(tmp / "no-base"), "--data", pc], "does not exist"),
        (["eval", str(gpt2_dir), "--base-model", base, "--data", pc], "does not have"),
        (["eval", str(s["slices"] / "r2"), "--base-model", base, "--data", pc, "--record"], "--record"),
        (["eval", nested, "--base-model", base, "--data", pc, "--batch-size", "0"], "batch-size"),
    ]


def test_cli_bad_inputs_exit_2_and_write_nothing(setup: dict[str, Path], tmp_path: Path) -> None:
    cfg_before = (setup["nested"] / CONFIG_NAME).read_bytes()
    runner = CliRunner()
    for args, needle in _bad_cases(setup, tmp_path):
        out = tmp_path / "out"
        r = runner.invoke(main, [*args, "--output", str(out)])
        assert r.exit_code == 2, (args, r.output)
        assert needle in r.output, (needle, r.output)
        assert not out.exists(), args
        assert not [f for f in os.listdir(tmp_path) if f.startswith(".out.")], args
    assert (setup["nested"] / CONFIG_NAME).read_bytes() == cfg_before
    # an existing output is kept without --force
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    r = runner.invoke(main, ["eval", str(setup["nested"]), "--base-model", str(setup["base"]), "--data", str(setup["pc"]), "--output", str(out)])
    assert r.exit_code == 2 and "already exists" in r.output
    assert os.listdir(out) == ["keep.txt"]


def test_eval_reference_loss_by_hand(setup: dict[str, Path]) -> None:
    """The loss metric is the token-weighted mean NLL of completion tokens + EOS, computed here independently."""
    tok = load_tokenizer(setup["base"])
    model = load_base_model(setup["base"], dtype="float32", device="cpu")
    res = evaluate([setup["nested2"]], setup["base"], setup["pc"], (1,), EvalOptions(with_base=True, device="cpu"))
    nll, n = 0.0, 0
    for line in setup["pc"].read_text().splitlines():
        rec = json.loads(line)
        p = tok(rec["prompt"])["input_ids"]
        c = tok(rec["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([p + c])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
        for i in range(len(p), len(p) + len(c)):
            nll -= float(logp[i - 1, ids[0, i]])
            n += 1
    assert res.base is not None
    assert res.base.target_tokens == n
    assert res.base.loss == pytest.approx(nll / n, rel=1e-5)


def test_plot_loss_curves_single_point_and_base(tmp_path: Path) -> None:
    """A loss plot with a one-point curve and a base line is a readable PNG."""
    import matplotlib.image

    from mlora_export.evaluation.plot import plot_rank_curves

    results = {
        "metric": "loss",
        "base": {"rank": 0, "score": 3.2},
        "adapters": [
            {"label": "nested", "ranks": [{"rank": 1, "score": 2.5}, {"rank": 4, "score": 1.9}, {"rank": 32, "score": 1.2}],
             "aurac": {"v1": 1.6, "v2": 1.9}},
            {"label": "lora-r8", "ranks": [{"rank": 8, "score": 1.5}], "aurac": {"v1": 1.5, "v2": 1.5}},
        ],
    }
    out = plot_rank_curves(results, tmp_path / "curve.png")
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert matplotlib.image.imread(out).shape[2] in (3, 4)
