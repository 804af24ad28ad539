"""Benchmark: re-nesting a rank-64 all-linear PEFT LoRA adapter of a 1.1B Llama-shaped model,
side by side with copying the adapter file once (`cp`) and with the dense-SVD route.

Goals (issue 11): re-nesting takes at most 25× the copy time, at least 100× less time than the
dense-SVD route on the same modules, with peak memory below the adapter's size plus 300 MB.

    python benchmarks/bench_renest.py [--workdir /tmp/bench-renest] [--repeats 3]

The adapter is the slice benchmark's (TinyLlama's shapes: hidden 2048, intermediate 5632, 22
layers, 32 heads, 4 KV heads; rank 64 on all seven projections; float32, random normal weights),
saved as a plain PEFT LoRA folder (`lora_alpha` 16). Every job runs in its own process, with
`sync` before it; inputs are in the page cache (one warm-up copy first). Each round, interleaved:

- `cp` of the adapter file (wall time);
- a fresh process timing the `renest_adapter` call (reading, the NaN/inf check, the QR/SVD work
  and writing all included; imports not) and reporting its peak RSS (the whole process);
- the CLI end to end (`python -m mlora_export renest`, interpreter start-up included).

The dense route (what LoRA resizing tools do: build `ΔW = s·B·A` and take its SVD; here
`torch.linalg.svd(ΔW, full_matrices=False)` in float32, torch's default threads) is measured
once on the seven modules of layer 0 (one per shape) and extrapolated to the 22 layers (×22):
the layers have the same shapes, so each costs the same.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS = 2048, 5632, 22, 32, 4
RANK, ALPHA = 64, 16


def shapes() -> dict[str, tuple[int, int]]:
    """Projection name → ``(in, out)``."""
    head = HIDDEN // HEADS
    return {
        "self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, KV_HEADS * head),
        "self_attn.v_proj": (HIDDEN, KV_HEADS * head), "self_attn.o_proj": (HIDDEN, HIDDEN),
        "mlp.gate_proj": (HIDDEN, INTER), "mlp.up_proj": (HIDDEN, INTER), "mlp.down_proj": (INTER, HIDDEN),
    }


def make_adapter(path: Path) -> None:
    import torch

    from mlora_export.adapter import build_peft_config, write_json
    from mlora_export.io.safetensors import save_tensors

    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(LAYERS):
        for name, (fin, fout) in shapes().items():
            key = f"base_model.model.model.layers.{layer}.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(RANK, fin, generator=gen) * 0.01
            tensors[f"{key}.lora_B.weight"] = torch.randn(fout, RANK, generator=gen) * 0.01
    path.mkdir(parents=True)
    save_tensors(path / "adapter_model.safetensors", tensors, metadata={"format": "pt"})
    targets = sorted({n.rsplit(".", 1)[-1] for n in shapes()})
    write_json(path / "adapter_config.json", build_peft_config(r=RANK, lora_alpha=ALPHA, use_rslora=False, target_modules=targets,
                                                               base_model="tinyllama-shaped"))


# Peak RSS from /proc/self/status (VmHWM, this process's own address space): getrusage's ru_maxrss
# carries over the parent's peak across fork + exec on Linux, so it would report the benchmark's own size.
RENEST_CHILD = r"""
import json, sys, time
def hwm_kb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
from mlora_export.converters.renest import renest_adapter
base = hwm_kb()
t0 = time.perf_counter()
res = renest_adapter(sys.argv[1], sys.argv[2])
dt = time.perf_counter() - t0
peak = hwm_kb()
print(json.dumps({"seconds": dt, "peak_rss_mb": peak / 1024, "import_rss_mb": base / 1024, "modules": res.modules,
                  "torch_imported": "torch" in sys.modules}))
"""

DENSE_CHILD = r"""
import json, sys, time
import torch
from safetensors import safe_open
alpha, rank = float(sys.argv[2]), int(sys.argv[3])
s = alpha / rank
out = {}
with safe_open(sys.argv[1], "pt") as f:
    for name in json.loads(sys.argv[4]):
        key = f"base_model.model.model.layers.0.{name}"
        a, b = f.get_tensor(key + ".lora_A.weight"), f.get_tensor(key + ".lora_B.weight")
        t0 = time.perf_counter()
        delta = (b * s) @ a                                  # the dense [out, in] delta
        u, sv, vh = torch.linalg.svd(delta, full_matrices=False)
        b_new, a_new = (u[:, :rank] * sv[:rank].sqrt()).contiguous(), (sv[:rank].sqrt()[:, None] * vh[:rank]).contiguous()
        out[name] = time.perf_counter() - t0
print(json.dumps({"seconds": out, "torch_threads": torch.get_num_threads()}))
"""


def _sync() -> None:
    subprocess.run(["sync"], check=True)


def _wall(cmd: list[str]) -> float:
    _sync()
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t0


def _child(code: str, *args: str) -> dict:
    _sync()
    res = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-dense", action="store_true", help="skip the (slow) dense-SVD route")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-renest-"))
    work.mkdir(parents=True, exist_ok=True)
    src = work / "peft-lora"
    if not src.exists():
        make_adapter(src)
    weights = src / "adapter_model.safetensors"
    size_mb = weights.stat().st_size / 2**20
    load_before = _load()
    subprocess.run(["cp", str(weights), str(work / "warm.safetensors")], check=True)  # warm the page cache
    (work / "warm.safetensors").unlink()
    cp_times, runs, cli_times = [], [], []
    for i in range(args.repeats):
        dst = work / f"copy{i}.safetensors"
        cp_times.append(_wall(["cp", str(weights), str(dst)]))
        dst.unlink()
        out = work / f"nested{i}"
        runs.append(_child(RENEST_CHILD, str(src), str(out)))
        shutil.rmtree(out)
        cli_times.append(_wall([sys.executable, "-m", "mlora_export", "renest", str(src), "--output", str(out)]))
        shutil.rmtree(out)
    dense = None
    if not args.skip_dense:
        dense = _child(DENSE_CHILD, str(weights), str(ALPHA), str(RANK), json.dumps(list(shapes())))
    cp_med = statistics.median(cp_times)
    rn_med = statistics.median(r["seconds"] for r in runs)
    report: dict = {
        "source_adapter_mb": round(size_mb, 1),
        "modules": runs[0]["modules"],
        "rounds": args.repeats,
        "load_average_before": load_before,
        "load_average_after": _load(),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cp_seconds": [round(t, 3) for t in cp_times],
        "renest_seconds": [round(r["seconds"], 3) for r in runs],
        "cli_seconds": [round(t, 3) for t in cli_times],
        "renest_over_cp (medians)": round(rn_med / cp_med, 2),
        "renest_over_cp (paired, per round)": [round(r["seconds"] / c, 2) for r, c in zip(runs, cp_times)],
        "cli_over_cp (medians)": round(statistics.median(cli_times) / cp_med, 2),
        "peak_rss_mb (whole renest process)": round(max(r["peak_rss_mb"] for r in runs), 1),
        "import_rss_mb": round(max(r["import_rss_mb"] for r in runs), 1),
        "peak_budget_mb (source + 300)": round(size_mb + 300, 1),
        "torch_imported": any(r["torch_imported"] for r in runs),
    }
    if dense is not None:
        per_layer = sum(dense["seconds"].values())
        report["dense_svd_seconds (layer 0, per module)"] = {k: round(v, 3) for k, v in dense["seconds"].items()}
        report["dense_svd_torch_threads"] = dense["torch_threads"]
        report["dense_svd_seconds (extrapolated: layer 0 × 22)"] = round(per_layer * LAYERS, 1)
        report["dense_over_renest (extrapolated / median)"] = round(per_layer * LAYERS / rn_med, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
