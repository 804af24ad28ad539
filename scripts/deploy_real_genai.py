#!/usr/bin/env python3
"""The real model in ONNX Runtime GenAI: ``mlora-export onnx --genai``, greedy tokens vs PEFT per rank, decode latency per rank.

Inputs: the trained nested adapter of ``scripts/real_model_adapter.py`` (``WORK/nested``, held-out
prompts in ``WORK/heldout.jsonl``) on SmolLM2-135M-Instruct (the bfloat16 folder of
:func:`mlora_export.base.packaged.materialize`).

1. ``mlora-export onnx WORK/nested --base-model BASE --genai -o WORK/genai/export`` (CLI, timed; its
   own verification table, float64 reference on text, is recorded) and, as the anchor a team would
   otherwise deploy for the base, GenAI's model builder on the same base
   (``python -m onnxruntime_genai.models.builder -p fp32 -e cpu``).
2. Greedy tokens: for ``--prompts`` held-out questions (chat template rendered, the HF tokenizer's
   ids appended to the generator) ``og.Generator`` at ``lora_rank`` 0, 1, 2, 4, 8, 16 against
   transformers + ``PeftModel.from_pretrained`` of the baked slice (rank 0: the base), float32,
   ``--new`` tokens at most, stopped at EOS.
3. Latency: one ``og.Model`` per export in this process (the rank is per request, as served),
   ``intra_op_num_threads`` = each of ``--threads``; ``--rounds`` rounds, each one request per
   configuration (interleaved), a held-out prompt then ``--bench-tokens`` new tokens (EOS ignored
   by ``min_length``); the mean time per decoded token (prompt step excluded); median and min over rounds.

Prints a JSON summary and writes ``WORK/genai/summary.json`` (parts skipped keep their earlier values). Usage::

    python scripts/deploy_real_genai.py --work /work/real22 --cache /tmp/mcache --threads 2 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_model_adapter import heldout, hf_greedy, machine

RANKS = (0, 1, 2, 4, 8, 16)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def export(args: argparse.Namespace, base: Path, d: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if not (d / "export").is_dir():
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-m", "mlora_export", "onnx", str(args.work / "nested"), "--base-model", str(base), "--genai",
                               "--output", str(d / "export"), "--json"], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            sys.exit(f"mlora-export onnx --genai failed ({proc.returncode}): {proc.stderr[-2000:]}")
        out["export_seconds"] = round(time.time() - t0, 1)
    info = json.loads((d / "export" / "export_info.json").read_text())
    out["verification"] = info["verification"]
    out["verified_on"] = info.get("verified_on")
    if not (d / "builder").is_dir():
        t0 = time.time()
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(base), "-o", str(d / "builder"), "-p", "fp32", "-e", "cpu"],
                       check=True, capture_output=True)
        out["builder_seconds"] = round(time.time() - t0, 1)
    return out


def og_model(folder: Path, threads: int) -> Any:
    import onnxruntime_genai as og

    cfg = og.Config(str(folder))
    cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    return og.Model(cfg)


def og_generate(model: Any, ids: list[int], rank: int | None, new: int, min_new: int = 0) -> tuple[list[int], float, float]:
    """``(new token ids, prompt step ms, decode ms per token)`` of one greedy request at ``lora_rank = rank``."""
    import numpy as np
    import onnxruntime_genai as og

    rank_value = np.array(rank or 0, dtype=np.int64)  # kept alive for the generator's life (GenAI does not copy it)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + new, min_length=len(ids) + min_new, do_sample=False)
    gen = og.Generator(model, params)
    if rank is not None:
        gen.set_model_input("lora_rank", rank_value)
    t0 = time.perf_counter()
    gen.append_tokens(np.asarray([ids], dtype=np.int32))
    t1 = time.perf_counter()
    n = 0
    while not gen.is_done():
        gen.generate_next_token()
        n += 1
    t2 = time.perf_counter()
    seq = list(gen.get_sequence(0))
    del rank_value
    return seq[len(ids):], (t1 - t0) * 1e3, (t2 - t1) * 1e3 / max(n, 1)


def greedy(args: argparse.Namespace, base: Path, d: Path) -> dict[str, Any]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mlora_export.converters.slice import slice_adapter

    torch.set_num_threads(max(args.thread_list))
    if not (d / "slices").is_dir():
        slice_adapter(args.work / "nested", [k for k in RANKS if k], d / "slices")
    tok = AutoTokenizer.from_pretrained(base)
    records = heldout(args.work, args.prompts)
    prompt_ids = [tok(r["prompt"], add_special_tokens=False)["input_ids"] for r in records]
    model = og_model(d / "export", max(args.thread_list))
    hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    eos = tok.eos_token_id
    out = {}
    for k in RANKS:
        m = hf if k == 0 else PeftModel.from_pretrained(hf, str(d / "slices" / f"r{k}")).eval()
        ref = hf_greedy(m, tok, [r["prompt"] for r in records], args.new)
        got = [og_generate(model, ids, k, args.new)[0] for ids in prompt_ids]
        # compared up to EOS, EOS itself left out: generate() returns it, GenAI's sequence stops before it
        stopped = sum(eos in g or len(g) < args.new for g in got)
        ref = [b[: b.index(eos)] if eos in b else b for b in ref]
        got = [g[: g.index(eos)] if eos in g else g for g in got]
        equal = sum(a == b for a, b in zip(got, ref))
        first_diff = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))) for a, b in zip(got, ref) if a != b]
        correct = sum(tok.decode(b, skip_special_tokens=True).strip() == r["completion"] for b, r in zip(ref, records))
        out[str(k)] = {"prompts": len(records), "tokens_equal": equal, "genai_stopped_before_max": stopped, "first_difference_at_token": first_diff, "correct_peft": correct,
                       "example_peft": tok.decode(ref[0], skip_special_tokens=True), "example_genai": tok.decode(got[0], skip_special_tokens=True)}
        if k:
            hf = m.unload()
        log(f"greedy rank {k}: {equal}/{len(records)} equal")
    return out


def latency(args: argparse.Namespace, base: Path, d: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    ids = tok(heldout(args.work, 1)[0]["prompt"], add_special_tokens=False)["input_ids"]
    out: dict[str, Any] = {}
    for threads in args.thread_list:
        ours, builder = og_model(d / "export", threads), og_model(d / "builder", threads)
        configs: list[tuple[str, Any, int | None]] = [("builder base (fp32)", builder, None)]
        configs += [(f"--genai lora_rank={k}", ours, k) for k in RANKS]
        for _, model, k in configs:  # warm-up
            og_generate(model, ids, k, 4, 4)
        per: dict[str, list[float]] = {c[0]: [] for c in configs}
        prompt_ms: dict[str, list[float]] = {c[0]: [] for c in configs}
        for rnd in range(args.rounds):
            for name, model, k in configs:
                _, pms, tms = og_generate(model, ids, k, args.bench_tokens, args.bench_tokens)
                per[name].append(tms)
                prompt_ms[name].append(pms)
            log(f"latency threads={threads} round {rnd + 1}/{args.rounds}")
        anchor, zero = statistics.median(per[configs[0][0]]), statistics.median(per["--genai lora_rank=0"])
        out[str(threads)] = {name: {"ms_per_token_median": statistics.median(v), "ms_per_token_min": min(v),
                                    "x_builder": statistics.median(v) / anchor, "x_rank0": statistics.median(v) / zero,
                                    "prompt_ms_median": statistics.median(prompt_ms[name]), "runs": v} for name, v in per.items()}
        del ours, builder
    return {"per_threads": out, "prompt_tokens": len(ids), "bench_tokens": args.bench_tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/work/real22"))
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--threads", default="2", help="ONNX Runtime intra-op threads, comma-separated")
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--bench-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--skip-greedy", action="store_true")
    ap.add_argument("--skip-latency", action="store_true")
    args = ap.parse_args()
    args.thread_list = [int(t) for t in args.threads.split(",")]

    from mlora_export.base.packaged import materialize

    before = machine()
    base = materialize("smollm2", args.cache)
    d = args.work / "genai"
    d.mkdir(parents=True, exist_ok=True)
    previous = json.loads((d / "summary.json").read_text()) if (d / "summary.json").is_file() else {}
    summary: dict[str, Any] = {**previous, "machine_before": before, "base": str(base), "threads": args.thread_list,
                               "export": {**previous.get("export", {}), **export(args, base, d)}}
    if not args.skip_greedy:
        summary["greedy"] = greedy(args, base, d)
    if not args.skip_latency:
        summary["latency"] = latency(args, base, d)
    summary["machine_after"] = machine()
    (d / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
