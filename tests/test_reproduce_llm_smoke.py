"""The real-model reproduction harness (examples/reproduce/reproduce_llm.py): its tasks, its selection
rule, its method table, and the whole pipeline end to end in the smoke setting (a pico Llama with a
chat template: the real SmolLM2 run takes hours and is not run here)."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("pycountry")

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "reproduce" / "reproduce_llm.py"


@pytest.fixture(scope="module")
def repro():
    spec = importlib.util.spec_from_file_location("reproduce_llm_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce_llm_example"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("reproduce_llm_example", None)


def _question_answer(rec: dict) -> tuple[str, str]:
    msgs = rec["prompt"] + rec["completion"] if "prompt" in rec else rec["messages"]
    return msgs[-2]["content"], msgs[-1]["content"]


@pytest.mark.parametrize("regime", ["iso", "spell"])
def test_tasks_are_conversations_split_by_item(repro, regime: str) -> None:
    cfg = repro.Settings()
    splits = repro.task_splits(cfg, regime)
    n_test = cfg.iso_test_examples if regime == "iso" else cfg.test_examples
    assert [len(splits["val"]), len(splits["test"])] == [cfg.val_examples, n_test]
    assert len(splits["train"]) >= 100
    questions = [{_question_answer(r)[0] for r in splits[s]} for s in ("train", "val", "test")]
    assert not (questions[0] & questions[1] or questions[0] & questions[2] or questions[1] & questions[2])
    import pycountry

    for r in splits["test"]:
        q, a = _question_answer(r)
        if regime == "iso":
            assert r["prompt"][0] == {"role": "system", "content": repro.SYSTEM["iso"]}
            assert [m["content"] for m in r["prompt"][1:3]] == list(repro.ISO_DEMO)  # the worked example
            c = pycountry.countries.get(alpha_3=q)
            assert a in (c.name, getattr(c, "common_name", None))
        else:
            assert r["messages"][0] == {"role": "system", "content": repro.SYSTEM["spell"]}
            assert re.fullmatch(r"[A-Za-z]{4,8}", q) and a == "-".join(q.upper())
    assert repro.task_splits(cfg, regime) == splits  # the same items at every call (and seed)


def test_variants_are_rows_of_train_settings_fields(repro) -> None:
    specs = repro.method_specs((("nl-weighted", '{"rank_weights": [1, 1, 1, 1, 2], "steps_multiplier": 2}'),))
    assert specs["nl-weighted"].overrides == {"method": "nested-loss", "rank_weights": [1, 1, 1, 1, 2]}
    assert specs["nl-weighted"].steps_multiplier == 2
    s = repro.train_settings(repro.Settings(), 0, 1e-3, 80, **specs["nl-weighted"].overrides)
    assert s.method == "nested-loss" and s.rank_weights == [1, 1, 1, 1, 2] and s.max_steps == 80 and s.warmup_steps == 8
    for bad, fragment in (("{", "not JSON"), ("[1]", "JSON object"), ('{"no_such_field": 1}', "no_such_field"),
                          ('{"steps_multiplier": 0}', "steps_multiplier")):
        with pytest.raises(SystemExit, match=fragment):
            repro.method_specs((("v", bad),))
    with pytest.raises(SystemExit, match="taken"):
        repro.method_specs((("nested-loss", "{}"),))
    # a recipe variant (issue 26's options): a NestedRecipe built from the JSON object
    specs = repro.method_specs((("nl-paper-init", '{"recipe": {"a_init": "paper", "lora_plus_ratio": 16}}'),))
    s = repro.train_settings(repro.Settings(), 0, 1e-3, 80, **specs["nl-paper-init"].overrides)
    assert s.recipe.a_init == "paper" and s.recipe.lora_plus_ratio == 16 and s.method == "nested-loss"
    for bad in ('{"recipe": {"no_such_option": 1}}', '{"recipe": [1]}'):
        with pytest.raises(SystemExit, match="NestedRecipe"):
            repro.method_specs((("v", bad),))


def test_selection_uses_validation_ties_break_on_loss_and_the_grid_chooses_per_rank(repro) -> None:
    cfg = repro.Settings(grid=(1, 2), seeds=(0, 1), lrs=(1.0, 2.0), methods=("nested-loss",))

    def curve(em: list[float], loss: list[float]) -> dict:
        return {"ranks": {"1": {"exact_match": em[0], "loss": loss[0]}, "2": {"exact_match": em[1], "loss": loss[1]}}}

    jobs = {}
    for s in cfg.seeds:
        # lr 1.0 and 2.0 tie on nested-loss exact match; 2.0 has the lower loss. The grid: rank 1 best at 1.0, rank 2 at 2.0.
        jobs[("iso", s, 1.0)] = {"val": {"nested-loss": curve([0.5, 0.5], [2.0, 2.0]), "lora": curve([0.9, 0.1], [1.0, 1.0])}}
        jobs[("iso", s, 2.0)] = {"val": {"nested-loss": curve([0.5, 0.5], [1.0, 1.0]), "lora": curve([0.2, 0.8], [1.0, 1.0])}}
    assert repro.complete_seeds(cfg, jobs, "iso") == [0, 1]
    ch = repro.choose(cfg, jobs, "iso", [0, 1])
    assert ch["nested-loss"]["lr"] == 2.0
    assert ch["lora"]["lr"] == {1: 1.0, 2: 2.0}
    del jobs[("iso", 1, 2.0)]
    assert repro.complete_seeds(cfg, jobs, "iso") == [0]


@pytest.mark.slow  # end to end: ~35 s on an idle 2-core machine
def test_smoke_run_resumes_and_reports(repro, tmp_path: Path) -> None:
    from mlora_export.method import aurac

    cfg = repro.Settings.smoke()
    out = tmp_path / "repro"
    summary = repro.run(cfg, out)
    for name in ("summary.json", "report.md", "rank_curve.png", "base.json"):
        assert (out / name).is_file(), name
    assert (out / "rank_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["partial"] == [] and set(on_disk["regimes"]) == set(cfg.regimes)
    for regime in cfg.regimes:
        methods = on_disk["regimes"][regime]["methods"]
        assert set(methods) == {"lora", *cfg.methods}
        for m in methods.values():
            assert sorted(int(k) for k in m["ranks"]) == list(cfg.grid)
            assert 0.0 <= m["aurac"]["v2"]["mean"] <= 1.0 and m["loss_aurac_v2"]["mean"] > 0
        assert methods["nested-loss-2x"]["steps"] == 2 * methods["nested-loss"]["steps"] == 2 * cfg.steps
        assert methods["lora"]["example_passes"] == len(cfg.grid) * cfg.steps * cfg.batch_size
        # the reported test numbers are those of the test file at the chosen lr
        nl = methods["nested-loss"]
        tests = json.loads((out / "tests" / f"{regime}-seed0.json").read_text())
        em = [tests[f"nested-loss@{nl['lr']:g}"]["ranks"][str(k)]["exact_match"] for k in cfg.grid]
        assert [nl["ranks"][str(k)]["mean"] for k in cfg.grid] == em
        assert nl["aurac"]["v2"]["mean"] == aurac(list(cfg.grid), em)["v2"]
        # every run trained through TrainSettings, and recorded
        job = json.loads((out / "jobs" / f"{regime}-seed0-lr{cfg.lrs[0]:g}.json").read_text())
        assert job["records"]["nested-loss"]["settings"]["method"] == "nested-loss"
        assert job["records"]["lora-r2"]["settings"]["train_ranks"] == [2]
    report = (out / "report.md").read_text()
    assert "AURAC v2" in report and "Verdict" in report and "PARTIAL" not in report
    # a rerun trains nothing and gives the same summary
    stamp = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.json")}
    again = repro.run(cfg, out)
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.json")} == stamp
    assert json.loads(json.dumps(again["regimes"])) == json.loads(json.dumps(summary["regimes"]))
    # a search cut short is reported as partial, from the seeds that finished
    partial = repro.run(repro.dataclasses.replace(cfg, seeds=(0, 1)), out, report_only=True)
    assert partial["partial"] and all(r["seeds"] == [0] for r in partial["regimes"].values())
    assert "PARTIAL RUN" in (out / "report.md").read_text()
    # seed 1 as a confirmation seed: trained only at seed 0's choices, no validation scoring, reported with seed 0
    confirmed = repro.run(repro.dataclasses.replace(cfg, seeds=(0, 1), choice_seeds=(0,)), out)
    assert confirmed["partial"] == []
    for regime, res in confirmed["regimes"].items():
        assert res["seeds"] == [0, 1] and res["search_seeds"] == [0] and res["confirmation_seeds"] == [1]
        ms = res["methods"]
        assert ms["nested-loss"]["lr"] == summary["regimes"][regime]["methods"]["nested-loss"]["lr"]
        chosen = set(ms["lora"]["lr"].values()) | {ms[m]["lr"] for m in cfg.methods}
        seed1 = sorted(p.name for p in (out / "jobs").glob(f"{regime}-seed1-*.json"))
        assert seed1 == sorted(f"{regime}-seed1-lr{lr:g}.json" for lr in chosen)
        for name in seed1:
            job = json.loads((out / "jobs" / name).read_text())
            assert job["val"] == {} and job["plan"]
            trained = {m for m in job["plan"]["methods"] if m not in ("svd", "truncated")}
            assert set(job["records"]) == {f"lora-r{k}" for k in job["plan"]["grid"]} | trained
        tests = json.loads((out / "tests" / f"{regime}-seed1.json").read_text())
        assert f"nested-loss@{ms['nested-loss']['lr']:g}" in tests and ms["nested-loss"]["ranks"][1]["n"] == 2
        assert ms["lora"]["search_train_seconds"]["n"] == 1  # the search's compute: seed 0's
    assert "trained at the chosen lrs only" in (out / "report.md").read_text()
    # a --variant added to the finished output: only its runs are trained, the others' results stand,
    # and the report compares it with nested-loss
    stamp = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.json")}
    variant = ("nl-paper-init", '{"recipe": {"a_init": "paper"}}')
    grown = repro.run(repro.dataclasses.replace(cfg, seeds=(0, 1), choice_seeds=(0,), variants=(variant,),
                                                methods=(*cfg.methods, "nl-paper-init")), out)
    assert grown["partial"] == []
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp
    for regime, res in grown["regimes"].items():
        old = json.loads(json.dumps(confirmed["regimes"][regime]["methods"]))
        assert {m: v for m, v in json.loads(json.dumps(res["methods"])).items() if m != "nl-paper-init"} == old
        assert res["methods"]["nl-paper-init"]["ranks"][1]["n"] == 2
        job = json.loads((out / "jobs" / f"{regime}-seed0-lr{cfg.lrs[0]:g}.json").read_text())
        assert job["records"]["nl-paper-init"]["settings"]["recipe"]["a_init"] == "paper"
    report = (out / "report.md").read_text()
    assert "against `nested-loss`" in report and "- nl-paper-init (one run): iso: validation" in report
    assert len(repro.variant_lines(grown)) == 1
    # other fixed settings are refused, naming them
    with pytest.raises(SystemExit, match="steps"):
        repro.run(repro.dataclasses.replace(cfg, steps=3), out)


def test_confirmation_plans_train_each_method_at_its_chosen_lr_only(repro) -> None:
    cfg = repro.Settings(grid=(1, 2, 4), methods=("nested-loss", "dylora", "svd", "truncated"))
    choice = {"lora": {"lr": {1: 1.0, 2: 2.0, 4: 1.0}}, "nested-loss": {"lr": 2.0}, "dylora": {"lr": 3.0},
              "svd": {"lr": 3.0}, "truncated": {"lr": 2.0}}
    plans = repro.confirmation_plans(cfg, choice)
    # the SVD and truncated baselines are derived from the grid's top rank at their own lr
    assert plans == {1.0: {"grid": [1, 4], "methods": []}, 2.0: {"grid": [2, 4], "methods": ["nested-loss", "truncated"]},
                     3.0: {"grid": [4], "methods": ["dylora", "svd"]}}
    with pytest.raises(SystemExit, match="choice-seeds"):
        repro._check_settings(repro.dataclasses.replace(repro.Settings.smoke(), choice_seeds=(5,)), Path("/nonexistent"))


def test_variant_lines_compare_validation_at_each_ones_choice(repro) -> None:
    def row(lr: float, val: float, per_seed: dict) -> dict:
        return {"lr": lr, "val_search": {f"{lr:g}": val, "0.1": 0.99}, "aurac_per_seed": per_seed}

    summary = {"labels": {"nested-loss": "nested-loss (one run)", "nl-x": "nested-loss + x"}, "settings": {"variants": [["nl-x", "{}"]]},
               "regimes": {"iso": {"methods": {"nested-loss": row(0.002, 0.20, {"0": 0.20, "1": 0.22}),
                                               "nl-x": row(0.004, 0.25, {"0": 0.21, "1": 0.25})}},
                           "spell": {"methods": {"nested-loss": row(0.008, 0.40, {"0": 0.40, "1": 0.40}),
                                                 "nl-x": row(0.008, 0.38, {"0": 0.45, "1": 0.45})}}}}
    [line] = repro.variant_lines(summary)
    assert "iso: validation 25.0 vs 20.0 (+5.0) at lr 0.004 vs 0.002, test +2.0 ± 1.4" in line
    # a better test score does not count: the choice, and the rule, read validation
    assert "spell: validation 38.0 vs 40.0 (-2.0)" in line and "test +5.0 ± 0.0" in line and "(better in: iso)" in line
    summary["regimes"]["spell"]["methods"]["nl-x"]["val_search"]["0.008"] = 0.41
    assert "Better than nested-loss on validation in every regime" in repro.variant_lines(summary)[0]
    summary["settings"]["variants"] = []
    assert repro.variant_lines(summary) == []
