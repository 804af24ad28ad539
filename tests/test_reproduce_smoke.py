"""The reproduction script (examples/reproduce/reproduce.py) end to end in its ~1-minute smoke setting."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "reproduce" / "reproduce.py"


@pytest.fixture(scope="module")
def reproduce():
    spec = importlib.util.spec_from_file_location("reproduce_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce_example"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("reproduce_example", None)


def test_task_is_well_formed(reproduce) -> None:
    cfg = reproduce.Settings.smoke()
    table = reproduce.cipher()
    assert sorted(table.values()) == sorted(reproduce.LETTERS)
    assert all(a != b for a, b in table.items())
    train, held = reproduce.task_split(cfg)
    assert len(train) == cfg.train_examples and len(held) == cfg.eval_examples
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    assert all(r["completion"] == "".join(table[c] for c in r["prompt"][:-1]) for r in held)


def test_smoke_run(reproduce, tmp_path: Path) -> None:
    cfg = reproduce.Settings.smoke()
    out = tmp_path / "repro"
    summary = reproduce.run(cfg, out)
    for name in ("summary.json", "report.md", "rank_curve.png", "heldout.jsonl", "train.jsonl"):
        assert (out / name).is_file(), name
    assert (out / "rank_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    on_disk = json.loads((out / "summary.json").read_text())
    assert set(on_disk["methods"]) == {"lora", "dylora", "matryoshka"}
    for m in on_disk["methods"].values():
        assert sorted(int(k) for k in m["ranks"]) == list(cfg.grid)
        assert 0.0 <= m["aurac"]["v2"]["mean"] <= 1.0
    assert summary["methods"]["lora"]["train_seconds"]["mean"] > 0
    # every grid run, the DyLoRA and the MatryoshkaLoRA run exist as nested adapters with the same settings
    runs = out / "runs" / "seed0"
    cfgs = [json.loads((runs / "grid" / f"r{k}" / "matryoshka_config.json").read_text()) for k in cfg.grid]
    cfgs += [json.loads((runs / m / "matryoshka_config.json").read_text()) for m in ("dylora", "matryoshka")]
    assert [c["method"] for c in cfgs] == ["lora"] * len(cfg.grid) + ["dylora", "matryoshka"]
    assert {(c["steps"], c["seed"], c["scaling"], c["alpha"]) for c in cfgs} == {(cfg.steps, 0, cfg.scaling, cfg.alpha)}
    report = (out / "report.md").read_text()
    assert "AURAC v2" in report and "MatryoshkaLoRA" in report
    for k in cfg.grid:
        assert f"\n| {k} | " in report
    # the numbers are consistent with the per-seed evaluation they come from (one seed: mean = that seed)
    from mlora_export.method import aurac

    results = json.loads((runs / "eval" / "results.json").read_text())
    assert [c["label"] for c in results["adapters"]] == ["grid", "dylora", "matryoshka"]
    for curve, name in zip(results["adapters"], ("lora", "dylora", "matryoshka")):
        scores = {p["rank"]: p["score"] for p in curve["ranks"]}
        assert sorted(scores) == list(cfg.grid)
        m = on_disk["methods"][name]
        assert {int(k): v["mean"] for k, v in m["ranks"].items()} == scores
        assert m["aurac"]["v2"]["mean"] == aurac(list(cfg.grid), [scores[k] for k in cfg.grid])["v2"]
    seed = on_disk["per_seed"][0]
    assert on_disk["methods"]["lora"]["train_seconds"]["mean"] == sum(seed["train_seconds"]["lora"].values())
    assert set(on_disk["base"]["heldout_exact_match"]) == {"copy", "reverse", "shift"}
