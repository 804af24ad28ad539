"""Benchmark: ONNX Runtime CPU latency of the dynamic-rank export vs fixed-rank and merged exports.

A Llama-shaped model (hidden 512, 8 layers, intermediate 1376, 8 heads, vocabulary 32000, random
weights) with a random rank-64 all-linear nested adapter (train ranks 8,16,32,64) is exported four
ways with `export_onnx` (verified in ONNX Runtime): dynamic rank, fixed rank 8, fixed rank 64,
merged rank 64. All sessions are then timed side by side in one process on the same inputs,
round-robin (one call of each session per round) so that machine noise hits all of them alike;
the table reports medians.

Goal (issue 4): dynamic at rank k ≤ 1.10 × fixed at rank k (k = 8, 64); merged is the floor.

    python benchmarks/bench_onnx.py [--workdir /tmp/bench-onnx] [--threads 1] [--rounds 40] [--batch 1] [--seq 128]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _models import VOCAB, build_llama_nested



def build(work: Path) -> tuple[Path, Path]:
    """The base model folder and the nested adapter (:mod:`_models`)."""
    return build_llama_nested(work)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=1, help="intra_op_num_threads of every session")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    args = ap.parse_args()

    import numpy as np

    from mlora_export.converters.onnx import OnnxExportOptions, export_onnx
    from mlora_export.converters.onnx.verify import make_session

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-onnx-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    base, nested = build(work)
    exports = {}
    for label, kw in [("dynamic", {}), ("fixed r8", {"rank": 8}), ("fixed r64", {"rank": 64}), ("merged r64", {"rank": 64, "merged": True})]:
        t = time.perf_counter()
        res = export_onnx(nested, base, work / label.replace(" ", "-"), OnnxExportOptions(**kw), force=True)
        worst = max(c.max_abs_diff for c in res.checks)
        print(f"exported {label:11s} ({res.exporter}) in {time.perf_counter() - t:5.1f} s, verified: worst max abs diff {worst:.2e}", file=sys.stderr)
        exports[label] = res.model_path
    sessions = {label: make_session(p, threads=args.threads) for label, p in exports.items()}

    rng = np.random.default_rng(0)
    ids = rng.integers(3, VOCAB, size=(args.batch, args.seq), dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    cases = [  # (row label, session, extra feeds)
        ("merged r64 (floor)", "merged r64", {}),
        ("fixed r8", "fixed r8", {}),
        ("dynamic, lora_rank=8", "dynamic", {"lora_rank": np.array(8, dtype=np.int64)}),
        ("fixed r64", "fixed r64", {}),
        ("dynamic, lora_rank=64", "dynamic", {"lora_rank": np.array(64, dtype=np.int64)}),
        ("dynamic, lora_rank=0", "dynamic", {"lora_rank": np.array(0, dtype=np.int64)}),
    ]
    times: dict[str, list[float]] = {c[0]: [] for c in cases}
    for _ in range(3):  # warm-up
        for _label, s, extra in cases:
            sessions[s].run(["logits"], {**feeds, **extra})
    for _ in range(args.rounds):
        for label, s, extra in cases:
            t = time.perf_counter()
            sessions[s].run(["logits"], {**feeds, **extra})
            times[label].append(time.perf_counter() - t)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    q = {k: (statistics.quantiles(v, n=4)[0] * 1e3, statistics.quantiles(v, n=4)[2] * 1e3) for k, v in times.items()}
    floor = med["merged r64 (floor)"]
    fixed = {"dynamic, lora_rank=8": med["fixed r8"], "dynamic, lora_rank=64": med["fixed r64"]}
    print(f"\nORT CPU, intra_op_num_threads={args.threads}, batch {args.batch} x seq {args.seq}, {args.rounds} rounds (round-robin), median ms\n")
    print("| export | median ms | IQR ms | vs merged | vs fixed same rank |")
    print("|---|---:|---:|---:|---:|")
    for label, _, _ in cases:
        vs_fixed = f"{med[label] / fixed[label]:.3f}x" if label in fixed else ""
        print(f"| {label} | {med[label]:.2f} | {q[label][0]:.2f}-{q[label][1]:.2f} | {med[label] / floor:.3f}x | {vs_fixed} |")
    d8, d64 = med["dynamic, lora_rank=8"], med["dynamic, lora_rank=64"]
    print(f"\ndynamic rank 8 vs rank 64: {d8 / d64:.3f}x ({'faster' if d8 < d64 else 'not faster'}); total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
