"""The reproduction script (examples/reproduce/reproduce.py) end to end in its seconds-long smoke setting."""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # end-to-end: see tests/conftest.py

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "reproduce" / "reproduce.py"


@pytest.fixture(scope="module")
def reproduce():
    spec = importlib.util.spec_from_file_location("reproduce_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce_example"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("reproduce_example", None)


@pytest.mark.parametrize("regime", ["cipher", "skill", "half"])
def test_tasks_are_well_formed_and_splits_disjoint(reproduce, regime: str) -> None:
    cfg = reproduce.Settings.smoke()
    table = reproduce.cipher()
    assert sorted(table.values()) == sorted(reproduce.LETTERS) and all(a != b for a, b in table.items())
    half = reproduce.half_cipher()
    assert sorted(half.values()) == sorted(reproduce.LETTERS) and sum(a != b for a, b in half.items()) == 26
    splits = reproduce.task_splits(cfg, regime)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [cfg.train_examples, cfg.val_examples, cfg.test_examples]
    prompts = [{r["prompt"] for r in splits[s]} for s in ("train", "val", "test")]
    assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])
    op = reproduce.task_op(regime)
    for r in splits["test"]:
        w = r["prompt"][:-1]
        assert r["prompt"].endswith(op)
        want = {"cipher": "".join(table[c] for c in w), "half": "".join(half[c] for c in w)}.get(regime) or reproduce._op(op, w)
        assert r["completion"] == want


def test_selection_uses_validation_and_reports_test(reproduce) -> None:
    """A hand-made set of jobs: the lr with the better validation AURAC is chosen even where its test
    score is worse, and the grids pick their lr rank by rank."""
    methods = ("lora", "lora-plus", "nested-loss", "nl-per-rank-loss", "svd")
    cfg = reproduce.Settings(grid=(1, 2), seeds=(0,), lrs=(1.0, 2.0), regimes=("cipher",), methods=methods)

    def run(val: list[float], test: list[float], steps: int = 10) -> dict:
        return {"seconds": 1.0, "steps": steps, "val": {1: val[0], 2: val[1]}, "test": {1: test[0], 2: test[1]}, "renest_seconds": 0.1}

    jobs = []
    for lr, good in ((1.0, True), (2.0, False)):
        runs = {m: run([0.9, 0.9] if good else [0.1, 0.1], [0.2, 0.2] if good else [0.8, 0.8]) for m in ("nested-loss", "nl-per-rank-loss", "svd")}
        for g in ("lora", "lora-plus"):
            runs[g] = {1: run([0.9 if good else 0.1, 0], [0.3, 0]), 2: run([0, 0.1 if good else 0.9], [0, 0.7])}
        jobs.append({"regime": "cipher", "seed": 0, "lr": lr, "runs": runs})
    s = reproduce.summarise(cfg, jobs)["regimes"]["cipher"]["methods"]
    assert set(s) == set(methods)
    assert s["nested-loss"]["lr"] == 1.0 and s["nested-loss"]["ranks"][1]["mean"] == 0.2 and s["nested-loss"]["val_aurac"] == pytest.approx(0.9)
    for g in ("lora", "lora-plus"):
        assert s[g]["lr"] == {1: 1.0, 2: 2.0}
        assert [s[g]["ranks"][k]["mean"] for k in (1, 2)] == [0.3, 0.7]
        assert s[g]["steps"] == 20 and s[g]["example_passes"] == 20 * cfg.batch_size


def test_direction_verdict_is_computed_from_the_numbers(reproduce) -> None:
    """Adopted only with a clear validation win (mean gain above the sd of the per-seed gains) in every
    regime and a step of at most 1.05× nested-loss's."""
    def entry(val: list[float]) -> dict:
        return {"val_aurac": sum(val) / len(val), "val_aurac_per_seed": dict(enumerate(val)), "aurac_per_seed": dict(enumerate(val))}

    def summary(skill_val: list[float], cost: float) -> dict:
        return {"regimes": {
            "cipher": {"methods": {"nested-loss": entry([0.50, 0.52, 0.54]), "nl-lora-plus": entry([0.60, 0.61, 0.62])}},
            "skill": {"methods": {"nested-loss": entry([0.90, 0.90, 0.90]), "nl-lora-plus": entry(skill_val)}},
        }, "timing": {"step_cost": {"ratio": {"nl-lora-plus": cost}}}}

    (row,) = reproduce.direction_verdicts(summary([0.92, 0.93, 0.91], 1.01))
    assert row["adopt"] and row["regimes"]["cipher"]["val_delta"] == pytest.approx(9.0) and "candidate default" in row["verdict"]
    assert not reproduce.direction_verdicts(summary([0.92, 0.93, 0.91], 1.10))[0]["adopt"]  # too costly
    noisy = reproduce.direction_verdicts(summary([0.95, 0.86, 0.90], 1.01))[0]  # +0.3 on average, sd 4.5: not clear
    assert not noisy["adopt"] and "not by more than the seeds' spread" in noisy["verdict"]
    worse = reproduce.direction_verdicts(summary([0.89, 0.89, 0.89], 1.01))[0]
    assert not worse["adopt"] and "better on average only in cipher" in worse["verdict"]


def test_recipes_of_the_rows(reproduce) -> None:
    """Each direction is one recipe option of the library, set from the harness's settings; the baselines have none."""
    cfg = reproduce.Settings(lora_plus_ratio=8.0, rank_curriculum=0.25, loss_aware_ranks=0.4)
    assert cfg.recipe("lora-plus").changed() == cfg.recipe("nl-lora-plus").changed() == {"lora_plus_ratio": 8.0}
    assert cfg.recipe("nl-curriculum").changed() == {"rank_curriculum": 0.25}
    assert cfg.recipe("nl-per-rank-loss").changed() == {"per_rank_loss": True}
    assert cfg.recipe("nl-paper-init").changed() == {"a_init": "paper"}
    assert cfg.recipe("nl-loss-aware").changed() == {"loss_aware_ranks": 0.4}
    assert cfg.recipe("nl-lora-plus-paper-init").changed() == {"lora_plus_ratio": 8.0, "a_init": "paper"}
    assert cfg.recipe("nl-all").changed() == {"lora_plus_ratio": 8.0, "rank_curriculum": 0.25, "per_rank_loss": True, "a_init": "paper",
                                              "loss_aware_ranks": 0.4}
    assert all(cfg.recipe(m).changed() == {} for m in reproduce.BASELINES)
    assert reproduce.unit_of("svd") == "lora"


def test_smoke_run(reproduce, tmp_path: Path) -> None:
    cfg = replace(reproduce.Settings.smoke(), lrs=(8e-3,))  # the choice among lrs: test_selection_uses_validation_and_reports_test
    out = tmp_path / "repro"
    first = tuple(m for m in cfg.methods if m in reproduce.BASELINES or m == "nl-per-rank-loss")
    reproduce.run(replace(cfg, methods=first), out)
    job = out / "jobs" / "cipher-seed0-lr0.008" / "nested-loss.json"
    stamp = job.stat().st_mtime_ns
    assert not (out / "jobs" / "cipher-seed0-lr0.008" / "nl-curriculum.json").exists()
    # report only: the finished rows, the others named as pending, nothing trained
    files = sorted(p.relative_to(out) for p in (out / "jobs").rglob("*"))
    partial = reproduce.report_only(cfg, out)
    assert sorted(p.relative_to(out) for p in (out / "jobs").rglob("*")) == files
    assert set(partial["regimes"]["cipher"]["methods"]) == set(first)
    n_jobs = len(cfg.regimes) * len(cfg.seeds) * len(cfg.lrs)
    assert partial["pending"] == {m: {"jobs": 0, "of": n_jobs} for m in cfg.methods if m not in first}
    assert "**Pending**" in (out / "report.md").read_text()
    with pytest.raises(SystemExit, match="no method has all its"):
        reproduce.report_only(replace(cfg, methods=("nl-curriculum",)), out)
    with pytest.raises(SystemExit, match="other settings"):
        reproduce.report_only(replace(cfg, steps=9), out)
    # a rerun adds the other rows into the same output, reusing the finished jobs, and measures the step costs
    summary = reproduce.run(cfg, out, step_cost=True)
    assert job.stat().st_mtime_ns == stamp
    for name in ("summary.json", "report.md", "rank_curve.png", "timing.json"):
        assert (out / name).is_file(), name
    assert (out / "rank_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    on_disk = json.loads((out / "summary.json").read_text())
    assert set(on_disk["regimes"]) == set(cfg.regimes)
    from mlora_export.method import aurac

    for regime in cfg.regimes:
        methods = on_disk["regimes"][regime]["methods"]
        assert set(methods) == set(reproduce.METHOD_LABELS)
        for m in methods.values():
            assert sorted(int(k) for k in m["ranks"]) == list(cfg.grid)
            assert 0.0 <= m["aurac"]["v2"]["mean"] <= 1.0
            assert m["train_seconds"]["mean"] > 0
        assert methods["nested-loss-2x"]["steps"] == 2 * methods["nested-loss"]["steps"]
        # the reported test numbers are those of the job at the chosen lr
        for m in ("nested-loss", "nl-loss-aware"):
            nl = methods[m]
            runs = json.loads((out / "jobs" / f"{regime}-seed0-lr{nl['lr']:g}" / f"{m}.json").read_text())["runs"]
            test = [runs[m]["test"][str(k)] for k in cfg.grid]
            assert [nl["ranks"][str(k)]["mean"] for k in cfg.grid] == test
            assert nl["aurac"]["v2"]["mean"] == aurac(list(cfg.grid), test)["v2"]
    # one verdict row per direction, from the step costs measured against nested-loss
    rows = {r["method"]: r for r in on_disk["directions"]}
    assert set(rows) == set(reproduce.DIRECTIONS)
    costs = on_disk["timing"]["step_cost"]["ratio"]
    assert set(costs) == {*reproduce.DIRECTIONS, f"lora-plus r={max(cfg.grid)}"} and all(c > 0 for c in costs.values())
    for m, row in rows.items():
        assert row["step_cost"] == costs[m]
        clear = all(v["val_delta"] > 0 and v["val_delta"] > v["val_delta_sd"] for v in row["regimes"].values())
        assert row["adopt"] == (clear and costs[m] <= 1.05)
    report = (out / "report.md").read_text()
    assert "AURAC v2" in report and "nested-loss" in report and "Verdict" in report and "Cost of a training step" in report
    assert summary["base"]["exact_match"].keys() >= {"copy", "reverse", "shift", "cipher (test)", "skill (test)"}
    assert summary["base"]["heldout_loss"].keys() == set(cfg.regimes)
    # a third run reuses everything and gives the same summary
    again = reproduce.run(cfg, out)
    assert json.loads(json.dumps(again["regimes"])) == json.loads(json.dumps(summary["regimes"]))
    with pytest.raises(SystemExit, match="unknown method"):
        reproduce.run(replace(cfg, methods=("nested-loss", "nl-magic")), out)
