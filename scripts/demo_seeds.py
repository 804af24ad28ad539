#!/usr/bin/env python
"""The demo's closing comparison over several seeds: does what one `mlora-export demo` run shows hold at every seed?

Runs the demo's own stages (base, train, renest, slice, evaluate: exactly what ``mlora-export demo
--seed N`` runs before its converters) for each seed, and prints a markdown table per seed: held-out
exact match per rank of the ``nested-loss`` run and of the re-nested plain LoRA, their AURAC v2, and
how many ranks beat the base; then what held at every seed and what did not. Not part of CI (about
30 s of CPU per seed). From the repository root::

    python scripts/demo_seeds.py --seeds 0,1,2,3,4 --workers 2 --json demo-seeds.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run_seed(seed: int) -> dict[str, Any]:
    """One demo run without its converters; returns the evaluation table and each run's training seconds."""
    import transformers

    from mlora_export.demo import STAGES, run_demo
    from mlora_export.method import aurac

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    stages = [s for s in STAGES if s.name in ("base", "train", "renest", "slice", "evaluate")]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="demo-seed-") as tmp:
        result = run_demo(Path(tmp) / "out", seed=seed, stages=stages).to_dict()
    by = {s["name"]: s for s in result["stages"]}
    table = by["evaluate"]["data"]["ranks"]
    base, trained = table[0], table[1:]
    ks = [t["rank"] for t in trained]
    out: dict[str, Any] = {"seed": seed, "seconds": time.perf_counter() - t0, "base_exact_match": base["exact_match"],
                           "base_loss": base["loss"], "closing_lines": by["evaluate"]["lines"][1:]}
    for name, em, loss in (("nested-loss", "exact_match", "loss"), ("re-nested LoRA", "renested_exact_match", "renested_loss")):
        out[name] = {
            "exact_match": {t["rank"]: t[em] for t in trained},
            "aurac_v2": aurac(ks, [t[em] for t in trained])["v2"],
            "ranks_above_base_em": sum(t[em] > base["exact_match"] for t in trained),
            "ranks_below_base_loss": sum(t[loss] < base["loss"] for t in trained),
        }
    return out


def report(runs: list[dict[str, Any]]) -> str:
    """Markdown: one row per seed and method, then what held at every seed (computed, never fixed text)."""
    ks = list(runs[0]["nested-loss"]["exact_match"])
    n = len(ks)
    lines = ["| seed | base | run | " + " | ".join(f"r{k}" for k in ks) + " | AURAC v2 | ranks above the base (exact match) | ranks below the base (loss) |",
             "|---:|---:|---|" + "---:|" * (n + 3)]
    for r in runs:
        for name in ("nested-loss", "re-nested LoRA"):
            m = r[name]
            lines.append(f"| {r['seed']} | {r['base_exact_match'] * 100:.1f} | {name} | "
                         + " | ".join(f"{m['exact_match'][k] * 100:.1f}" for k in ks)
                         + f" | **{m['aurac_v2'] * 100:.1f}** | {m['ranks_above_base_em']}/{n} | {m['ranks_below_base_loss']}/{n} |")
    nl = [r["nested-loss"]["aurac_v2"] * 100 for r in runs]
    sv = [r["re-nested LoRA"]["aurac_v2"] * 100 for r in runs]
    diff = [a - b for a, b in zip(nl, sv)]
    wins = sum(d > 0 for d in diff)

    def ms(xs: list[float]) -> str:
        return f"{statistics.fmean(xs):.1f} ± {statistics.stdev(xs):.1f}" if len(xs) > 1 else f"{xs[0]:.1f}"

    lines += ["", f"Over seeds {', '.join(str(r['seed']) for r in runs)}: AURAC v2 nested-loss {ms(nl)}, re-nested LoRA {ms(sv)} "
              f"(per-seed difference {ms(diff)} points, min {min(diff):+.1f}, max {max(diff):+.1f}); nested-loss ahead at {wins}/{len(runs)} seeds."]
    for name in ("nested-loss", "re-nested LoRA"):
        em = [r[name]["ranks_above_base_em"] for r in runs]
        lo = [r[name]["ranks_below_base_loss"] for r in runs]
        per_rank = {k: [r[name]["exact_match"][k] * 100 for r in runs] for k in ks}
        held = [k for k in ks if all(r[name]["exact_match"][k] > r["base_exact_match"] for r in runs)]
        lines.append(f"- {name}: ranks above the base on exact match {min(em)}–{max(em)} of {n} (at every seed: "
                     f"{', '.join(f'r{k}' for k in held) or 'none'}); below the base on loss {min(lo)}–{max(lo)} of {n}; "
                     "exact match per rank, min–max: " + ", ".join(f"r{k} {min(v):.1f}–{max(v):.1f}" for k, v in per_rank.items()) + ".")
    secs = [r["seconds"] for r in runs]
    lines.append(f"- wall-clock per seed (base, train, renest, slice, evaluate): {min(secs):.0f}–{max(secs):.0f} s.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds (default 0,1,2,3,4)")
    ap.add_argument("--workers", type=int, default=1, help="seeds run side by side, one torch thread each (default 1)")
    ap.add_argument("--json", type=Path, default=None, help="also write every number to this JSON file")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.workers > 1:
        import multiprocessing

        with ProcessPoolExecutor(max_workers=args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            runs = list(pool.map(run_seed, seeds))
    else:
        runs = [run_seed(s) for s in seeds]
    text = report(runs)
    sys.stdout.write(text)
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "report": text}, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
