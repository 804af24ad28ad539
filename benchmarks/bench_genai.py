"""Benchmark: per-token decode latency in ONNX Runtime GenAI, per rank, vs the base model.

A Llama-shaped model (hidden 512, 8 layers, 8 heads, intermediate 1376, vocabulary 32000,
random weights, about 59 M parameters) with a random rank-64 all-linear nested adapter (train
ranks 8, 16, 32, 64) is exported with ``mlora-export onnx --genai`` (``lora_rank`` input) and
``--genai --adapters-per-rank`` (Olive-style adapter files), and the base model alone with
GenAI's own model builder (``python -m onnxruntime_genai.models.builder -p fp32 -e cpu``: what
a team would otherwise deploy). Each timing job is its own process (``sync`` before each):
it loads one model with ``intra_op_num_threads`` fixed, runs one warm-up request, then
``--requests`` greedy requests of a ``--prompt``-token prompt and ``--new`` new tokens, and
reports the median over requests of the mean time per decoded token (the prompt step excluded)
and the median prompt step. The list of jobs runs ``--rounds`` times, interleaved, so that load
on a shared machine hits every job alike; the table gives the median and the minimum over rounds.

    python benchmarks/bench_genai.py [--workdir /tmp/bench-genai] [--threads 1] [--requests 5] [--prompt 32] [--new 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _models import TRAIN_RANKS, VOCAB, build_llama_nested



def build(work: Path) -> tuple[Path, Path]:
    """The base model folder (with token ids and a byte-level BPE tokenizer, for GenAI) and the nested adapter."""
    from mlora_export.demo.bpe_tokenizer import build_byte_bpe_tokenizer

    return build_llama_nested(work, config={"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}, tokenizer=build_byte_bpe_tokenizer(512))


def prepare(work: Path) -> None:
    """Build the models and the three exports (each export verified by its tool)."""
    from mlora_export.converters.onnx import OnnxExportOptions, export_genai

    base, nested = build(work)
    t0 = time.perf_counter()
    export_genai(nested, base, work / "genai")
    t1 = time.perf_counter()
    export_genai(nested, base, work / "genai-adapters", OnnxExportOptions(adapters_per_rank=True))
    t2 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(base), "-o", str(work / "builder"), "-p", "fp32", "-e", "cpu"],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    t3 = time.perf_counter()
    print(json.dumps({"export_genai_s": round(t1 - t0, 1), "export_genai_adapters_s": round(t2 - t1, 1), "builder_s": round(t3 - t2, 1)}))


def time_job(folder: Path, threads: int, requests: int, prompt: int, new: int, rank: int | None, adapter: str | None) -> dict[str, float]:
    """One timing job (in its own process): median per-token decode ms and median prompt-step ms."""
    import numpy as np
    import onnxruntime_genai as og

    cfg = og.Config(str(folder))
    cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    model = og.Model(cfg)
    adapters = None
    if adapter is not None:
        adapters = og.Adapters(model)
        adapters.load(str(folder / "adapters" / f"{adapter}.onnx_adapter"), adapter)
    rank_value = np.array(rank if rank is not None else 0, dtype=np.int64)  # outlives every generator (not copied by GenAI)
    ids = np.random.default_rng(0).integers(3, VOCAB, size=(1, prompt), dtype=np.int64).astype(np.int32)
    per_token, prefill = [], []
    for i in range(requests + 1):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=prompt + new, min_length=prompt + new, do_sample=False)
        gen = og.Generator(model, params)
        if rank is not None:
            gen.set_model_input("lora_rank", rank_value)
        if adapters is not None:
            gen.set_active_adapter(adapters, adapter)
        t0 = time.perf_counter()
        gen.append_tokens(ids)  # the prompt step
        t1 = time.perf_counter()
        n = 0
        while not gen.is_done():
            gen.generate_next_token()
            n += 1
        t2 = time.perf_counter()
        if i:  # the first request warms up
            prefill.append((t1 - t0) * 1e3)
            per_token.append((t2 - t1) * 1e3 / max(n, 1))
    return {"decode_ms_per_token": statistics.median(per_token), "prompt_ms": statistics.median(prefill), "tokens": n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--requests", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--job", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.job:  # a child process: one timing job
        spec = json.loads(args.job)
        print(json.dumps(time_job(Path(spec["folder"]), args.threads, args.requests, args.prompt, args.new, spec.get("rank"), spec.get("adapter"))))
        return
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-genai-"))
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "builder").exists():
        subprocess.run([sys.executable, "-c", f"import sys; sys.argv=['x']; sys.path.insert(1, 'benchmarks'); from bench_genai import prepare; from pathlib import Path; prepare(Path({str(work)!r}))"],
                       check=True, cwd=Path(__file__).resolve().parent.parent)
    jobs = [("GenAI model builder, base (fp32)", {"folder": str(work / "builder")})]
    jobs += [(f"--genai, lora_rank={k}", {"folder": str(work / "genai"), "rank": k}) for k in (0, *TRAIN_RANKS)]
    jobs += [("--genai --adapters-per-rank, no adapter", {"folder": str(work / "genai-adapters")})]
    jobs += [(f"--genai --adapters-per-rank, r{k}", {"folder": str(work / "genai-adapters"), "adapter": f"r{k}"}) for k in TRAIN_RANKS]
    load0 = os.getloadavg()
    results: dict[str, list[dict[str, float]]] = {label: [] for label, _ in jobs}
    for rnd in range(args.rounds):
        for label, spec in jobs:
            subprocess.run(["sync"], check=False)
            out = subprocess.run(
                [sys.executable, __file__, "--threads", str(args.threads), "--requests", str(args.requests), "--prompt", str(args.prompt),
                 "--new", str(args.new), "--job", json.dumps(spec)],
                check=True, capture_output=True, text=True,
            )
            res = json.loads(out.stdout.strip().splitlines()[-1])
            results[label].append(res)
            print(f"round {rnd + 1}: {label}: {res['decode_ms_per_token']:.2f} ms/token, prompt {res['prompt_ms']:.1f} ms", file=sys.stderr)
    load1 = os.getloadavg()

    def med(label: str, key: str = "decode_ms_per_token") -> float:
        return statistics.median(r[key] for r in results[label])

    def low(label: str) -> float:
        return min(r["decode_ms_per_token"] for r in results[label])

    anchor, ours0 = jobs[0][0], jobs[1][0]
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average {load0[0]:.2f} before, {load1[0]:.2f} after; "
          f"threads {args.threads}; prompt {args.prompt}, new tokens {args.new}, {args.requests} requests per job, {args.rounds} rounds\n")
    print("| model / rank | decode ms/token, median (min) | median × builder base | median × lora_rank 0 | min × builder base | prompt step ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, _ in jobs:
        d = med(label)
        print(f"| {label} | {d:.2f} ({low(label):.2f}) | {d / med(anchor):.2f} | {d / med(ours0):.2f} | {low(label) / low(anchor):.2f} | {med(label, 'prompt_ms'):.1f} |")


if __name__ == "__main__":
    main()
