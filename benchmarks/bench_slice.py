"""Benchmark: slicing a rank-64 all-linear adapter of a 1.1B Llama-shaped model into ranks
1,2,4,8,16,32,64, side by side with copying the source adapter file once (`cp`).

Goal (issue 2): slice time ≤ 2× the copy time; peak memory < source adapter size + 300 MB.

    python benchmarks/bench_slice.py [--workdir /tmp/bench-slice] [--repeats 3]

The adapter is random (float32) with TinyLlama's shapes (hidden 2048, intermediate 5632,
22 layers, 32 heads, 4 KV heads). Each round, interleaved: `cp` of the adapter file (a process,
wall time); a fresh process that times the `slice_adapter` call (load and validation included)
and reports its peak RSS (the whole process: interpreter, numpy, and the pages of the memory-mapped
source it touched); and the CLI end to end (`python -m mlora_export slice`, a process, wall
time, interpreter start-up included). Inputs are in the page cache (one warm-up copy first).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS = 2048, 5632, 22, 32, 4
RANK = 64
RANKS = [1, 2, 4, 8, 16, 32, 64]


def make_adapter(path: Path) -> None:
    import torch

    from mlora_export.adapter import MatryoshkaConfig, save_nested

    head = HIDDEN // HEADS
    shapes = {  # name: (in, out)
        "self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, KV_HEADS * head),
        "self_attn.v_proj": (HIDDEN, KV_HEADS * head), "self_attn.o_proj": (HIDDEN, HIDDEN),
        "mlp.gate_proj": (HIDDEN, INTER), "mlp.up_proj": (HIDDEN, INTER), "mlp.down_proj": (INTER, HIDDEN),
    }
    gen = torch.Generator().manual_seed(0)
    factors = {}
    for layer in range(LAYERS):
        for name, (fin, fout) in shapes.items():
            factors[f"model.layers.{layer}.{name}"] = (torch.randn(RANK, fin, generator=gen) * 0.01, torch.randn(fout, RANK, generator=gen) * 0.01)
    cfg = MatryoshkaConfig("matryoshka", RANK, tuple(RANKS), "sqrt", 1.0, extra={"base_model": "tinyllama-shaped"})
    save_nested(path, factors, cfg)


CHILD = r"""
import json, resource, sys, time
from mlora_export.converters.slice import slice_adapter
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
slice_adapter(sys.argv[1], [1, 2, 4, 8, 16, 32, 64], sys.argv[2])
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": dt, "peak_rss_mb": peak / 1024, "import_rss_mb": base / 1024,
                  "torch_imported": "torch" in sys.modules}))
"""


def _wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-slice-"))
    work.mkdir(parents=True, exist_ok=True)
    src = work / "nested"
    if not src.exists():
        make_adapter(src)
    weights = src / "adapter_model.safetensors"
    size_mb = weights.stat().st_size / 2**20
    subprocess.run(["cp", str(weights), str(work / "warm.safetensors")], check=True)  # warm the page cache
    cp_times, slice_runs, cli_times = [], [], []
    ranks = ",".join(str(k) for k in RANKS)
    for i in range(args.repeats):
        dst = work / f"copy{i}.safetensors"
        cp_times.append(_wall(["cp", str(weights), str(dst)]))
        dst.unlink()
        out = work / f"slices{i}"
        res = subprocess.run([sys.executable, "-c", CHILD, str(src), str(out)], check=True, capture_output=True, text=True)
        slice_runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
        shutil.rmtree(out)
        cli_times.append(_wall([sys.executable, "-m", "mlora_export", "slice", str(src), "--ranks", ranks, "--output", str(out)]))
        shutil.rmtree(out)
    cp_med = statistics.median(cp_times)
    sl_med = statistics.median(r["seconds"] for r in slice_runs)
    cli_med = statistics.median(cli_times)
    peak = max(r["peak_rss_mb"] for r in slice_runs)
    report = {
        "source_adapter_mb": round(size_mb, 1),
        "output_mb": round(size_mb * sum(RANKS) / RANK, 1),
        "rounds": args.repeats,
        "cp_seconds": [round(t, 3) for t in cp_times],
        "slice_seconds": [round(r["seconds"], 3) for r in slice_runs],
        "cli_seconds": [round(t, 3) for t in cli_times],
        "slice_over_cp (medians)": round(sl_med / cp_med, 2),
        "slice_over_cp (paired, per round)": [round(r["seconds"] / c, 2) for r, c in zip(slice_runs, cp_times)],
        "cli_over_cp (medians)": round(cli_med / cp_med, 2),
        "peak_rss_mb (whole slicing process)": round(peak, 1),
        "peak_budget_mb (source + 300)": round(size_mb + 300, 1),
        "torch_imported": any(r["torch_imported"] for r in slice_runs),
    }
    print(json.dumps(report, indent=2))
    (work / "warm.safetensors").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
