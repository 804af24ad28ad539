"""Training-step cost of a nested adapter (``--method``, default ``nested-loss``) vs a stock PEFT LoRA adapter, side by side.

Both adapters have the same rank on the same Llama-shaped model (built from a config, random
weights) and see the same batch. A step is forward + backward + AdamW step + zero_grad; the nested
step also installs its diagonal (``train_diagonal(step)``), as the Trainer callback does, and for
``nested-loss`` every forward assigns each example its rank and installs the per-example
diagonals. The two are interleaved (A B, B A, A B, …) and the medians compared, so machine load
hits both alike. Wall time and this process's CPU time are both reported: on a shared machine,
the CPU time with ``--threads 1`` is the steadier measure.

Goal (issues 2 and 10): nested step ≤ 1.05 × the PEFT LoRA step.

    python benchmarks/bench_train_step.py                 # ~35 M params, 2 CPU cores: ~3 min
    python benchmarks/bench_train_step.py --preset 100m   # ~135 M params (Llama-shaped, vocab 32k)
    python benchmarks/bench_train_step.py --method matryoshka
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time

import torch

PRESETS = {
    "small": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8, vocab_size=8000),
    "100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12, vocab_size=32000),
}


def build(preset: str, seed: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(max_position_embeddings=2048, tie_word_embeddings=False, **PRESETS[preset])
    return LlamaForCausalLM(cfg).train()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--method", choices=["nested-loss", "matryoshka", "dylora", "lora"], default="nested-loss")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--reps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--plain-first", action="store_true", help="build the PEFT model before the nested one (layout control)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from peft import LoraConfig, get_peft_model

    from mlora_export.adapter import MatryoshkaConfig
    from mlora_export.method import peft_alpha_for
    from mlora_export.training import add_nested_adapter

    base = build(args.preset, 0)
    n_params = sum(p.numel() for p in base.parameters())
    r = args.rank
    ranks = tuple(2**i for i in range(r.bit_length()) if 2**i <= r)
    ranks = ranks if ranks[-1] == r else (*ranks, r)

    def build_nested(model: torch.nn.Module):
        return add_nested_adapter(copy.deepcopy(model), MatryoshkaConfig(args.method, r, (r,) if args.method == "lora" else ranks, "sqrt"), target_modules="all-linear", seed=0)

    def build_plain(model: torch.nn.Module) -> torch.nn.Module:
        alpha, rslora = peft_alpha_for(r, "sqrt")
        torch.manual_seed(0)
        return get_peft_model(copy.deepcopy(model), LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM"))

    if args.plain_first:  # memory placement control: build the PEFT model first
        plain = build_plain(base)
        nested = build_nested(base)
    else:
        nested = build_nested(base)
        plain = build_plain(base)
    del base

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, PRESETS[args.preset]["vocab_size"], (args.batch, args.seq), generator=gen)
    batch = {"input_ids": ids, "labels": ids.clone()}

    def make_step(model: torch.nn.Module, before=None):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        model.train()
        counter = [0]

        def step() -> tuple[float, float]:
            t0, c0 = time.perf_counter(), time.process_time()
            if before is not None:
                before(counter[0])
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            counter[0] += 1
            return time.perf_counter() - t0, time.process_time() - c0

        return step

    steps = {"nested": make_step(nested.model, nested.train_diagonal), "peft_lora": make_step(plain)}
    for _ in range(args.warmup):
        for fn in steps.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in steps}
    cpu: dict[str, list[float]] = {k: [] for k in steps}
    order = list(steps)
    for i in range(args.reps):
        for name in order if i % 2 == 0 else order[::-1]:
            wall, proc = steps[name]()
            times[name].append(wall)
            cpu[name].append(proc)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    pair_ratios = [a / b for a, b in zip(times["nested"], times["peft_lora"])]
    result = {
        "method": args.method,
        "preset": args.preset,
        "params": n_params,
        "rank": r,
        "train_ranks": list(ranks),
        "batch": [args.batch, args.seq],
        "reps": args.reps,
        "plain_first": args.plain_first,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "median_s": med,
        "ratio_of_medians": med["nested"] / med["peft_lora"],
        "median_pair_ratio": statistics.median(pair_ratios),
        "median_cpu_s": med_cpu,
        "cpu_ratio_of_medians": med_cpu["nested"] / med_cpu["peft_lora"],
        "times_s": times,
        "cpu_times_s": cpu,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"model: Llama-shaped {n_params / 1e6:.1f} M params ({args.preset}), all-linear LoRA rank {r}, batch {args.batch}x{args.seq}, "
              f"{torch.get_num_threads()} threads, {args.reps} interleaved reps")
        print(f"  {args.method} step   median {med['nested'] * 1e3:8.1f} ms")
        print(f"  PEFT LoRA step    median {med['peft_lora'] * 1e3:8.1f} ms")
        print(f"  ratio of medians  {result['ratio_of_medians']:.3f}   (median of paired ratios {result['median_pair_ratio']:.3f}; goal <= 1.05)")
        print(f"  CPU time (this process only): {args.method} {med_cpu['nested'] * 1e3:.1f} ms, PEFT LoRA {med_cpu['peft_lora'] * 1e3:.1f} ms, "
              f"ratio {result['cpu_ratio_of_medians']:.3f}")


if __name__ == "__main__":
    main()
