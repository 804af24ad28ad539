"""Benchmarks on the real model, SmolLM2-135M-Instruct: a ``nested-loss`` training step vs a PEFT LoRA
step, and ``eval`` of 5 ranks (one load, ranks switched in place) vs 5 PEFT slices each loading the base.

Every timed job runs in its own process (``sync`` before each), so neither shares memory layout,
allocator state or caches with the other.

**train**: the base (the bfloat16 folder of :func:`mlora_export.base.packaged.materialize`) loaded in
float32 as ``mlora-export train`` does; LoRA on q, k, v, o, gate, up, down at rank ``--rank``, the
same ``s(r)``; job ``nested``: ``add_nested_adapter`` (``nested-loss``, train ranks 1, 2, 4, …, r)
with ``train_diagonal(step)`` before each step, as the Trainer callback calls it (each example gets
its rank and its diagonal on every forward); job ``peft``: a stock ``get_peft_model`` LoRA. The same
batch for both (``--batch`` records of the chat-templated training data, right-padded to the longest,
loss on the completions). A step: forward, backward, AdamW step, zero_grad. After ``--warmup``
steps, ``--steps`` timed steps; per job the median wall and CPU time of a step. The jobs run in the
order nested, peft, peft, nested (``--rounds`` 2) or nested, peft (1); the ratio is of the medians
over all timed steps of each kind.

**eval**: ``mlora-export eval WORK/nested --ranks 1,2,4,8,16`` (one process: the base loaded once,
each rank switched in place) vs, for each rank, one process that loads the base with transformers,
puts the baked slice on it with ``PeftModel.from_pretrained`` and scores it with the same scorer
(:func:`mlora_export.evaluation.scoring.score_model`). Both on ``WORK/heldout.jsonl`` with the same
metric, batch size and threads; wall time of whole processes (imports included, as a user waits for
them). The scores of both paths are compared too (they must agree: the same arithmetic).

    python scripts/real_model_adapter.py --work /work/real22 --cache /tmp/mcache     # the adapter and data, once
    python benchmarks/bench_real_model.py train --work /work/real22 --cache /tmp/mcache --threads 1
    python benchmarks/bench_real_model.py eval  --work /work/real22 --cache /tmp/mcache --threads 1 --metric exact-match
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
from typing import Any

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
EVAL_RANKS = (1, 2, 4, 8, 16)


def base_dir(cache: str | None) -> Path:
    from mlora_export.base.packaged import materialize

    return materialize("smollm2", cache)


def load(args: argparse.Namespace) -> dict[str, Any]:
    return {"loadavg": os.getloadavg(), "time_utc": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


# -- train step -------------------------------------------------------------------------------


def train_job(args: argparse.Namespace) -> dict[str, Any]:
    """One job (this process): ``args.job`` steps timed on the real model."""
    import torch
    from peft import LoraConfig, get_peft_model

    from mlora_export.adapter import MatryoshkaConfig
    from mlora_export.base import load_base_model, load_tokenizer
    from mlora_export.data import CompletionCollator, load_jsonl, tokenize_examples
    from mlora_export.method import peft_alpha_for
    from mlora_export.training import add_nested_adapter

    torch.set_num_threads(args.threads)
    base = base_dir(args.cache)
    model = load_base_model(base, "float32")
    tok = load_tokenizer(base)
    r = args.rank
    if args.job == "nested":
        ranks = tuple(2**i for i in range(r.bit_length()) if 2**i <= r)
        nested = add_nested_adapter(model, MatryoshkaConfig("nested-loss", r, ranks if ranks[-1] == r else (*ranks, r), "sqrt"),
                                    target_modules=TARGETS, seed=0)
        net, before = nested.model, nested.train_diagonal
    else:
        alpha, rslora = peft_alpha_for(r, "sqrt")
        torch.manual_seed(0)
        net = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=TARGETS, lora_dropout=0.0,
                                               task_type="CAUSAL_LM"))
        before = None
    examples = load_jsonl(args.work / "train.jsonl")[: args.batch]
    feats = tokenize_examples(examples, tok, max_length=128)
    batch = CompletionCollator(tok.pad_token_id)(feats)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    net.train()
    wall, cpu = [], []
    for i in range(args.warmup + args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        if before is not None:
            before(i)
        loss = net(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= args.warmup:
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    return {"job": args.job, "wall_s": wall, "cpu_s": cpu, "median_wall_s": statistics.median(wall), "median_cpu_s": statistics.median(cpu),
            "tokens": list(batch["input_ids"].shape), "params": sum(p.numel() for p in net.parameters()),
            "trainable": sum(p.numel() for p in net.parameters() if p.requires_grad)}


def run_train(args: argparse.Namespace) -> dict[str, Any]:
    order = ["nested", "peft", "peft", "nested"] if args.rounds >= 2 else ["nested", "peft"]
    before = load(args)
    jobs = []
    for job in order:
        subprocess.run(["sync"], check=False)
        out = subprocess.run([sys.executable, __file__, "train-job", "--job", job, *common_args(args), "--rank", str(args.rank),
                              "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup)],
                             capture_output=True, text=True, check=True)
        res = json.loads(out.stdout.strip().splitlines()[-1])
        jobs.append(res)
        print(f"{job}: median step {res['median_wall_s'] * 1e3:.0f} ms wall, {res['median_cpu_s'] * 1e3:.0f} ms CPU", file=sys.stderr)
    after = load(args)

    def pooled(kind: str, key: str) -> float:
        return statistics.median(x for j in jobs if j["job"] == kind for x in j[key])

    wall = {k: pooled(k, "wall_s") for k in ("nested", "peft")}
    cpu = {k: pooled(k, "cpu_s") for k in ("nested", "peft")}
    return {"benchmark": "train-step", "rank": args.rank, "batch_tokens": jobs[0]["tokens"], "threads": args.threads, "order": order,
            "steps_per_job": args.steps, "median_step_s": wall, "ratio_wall": wall["nested"] / wall["peft"],
            "median_cpu_s": cpu, "ratio_cpu": cpu["nested"] / cpu["peft"], "jobs": jobs, "load_before": before, "load_after": after,
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}


# -- eval -------------------------------------------------------------------------------------


def slice_job(args: argparse.Namespace) -> dict[str, Any]:
    """One PEFT slice evaluated in this process: the base loaded, the slice put on with PeftModel, scored."""
    import torch
    from peft import PeftModel

    from mlora_export.base import load_base_model, load_tokenizer
    from mlora_export.evaluation.data import load_eval_data
    from mlora_export.evaluation.scoring import score_model

    torch.set_num_threads(args.threads)
    base = base_dir(args.cache)
    tok = load_tokenizer(base)
    data = load_eval_data(args.work / "heldout.jsonl", tok, max_examples=args.max_examples)
    model = PeftModel.from_pretrained(load_base_model(base, "auto"), str(args.slice)).eval()
    point = score_model(model, tok, data, metric=args.metric, batch_size=args.batch_size, rank=args.rank)
    return {"rank": args.rank, "score": point.score}


def run_eval(args: argparse.Namespace) -> dict[str, Any]:
    from mlora_export.converters.slice import slice_adapter

    slices = args.work / "slices"
    if not slices.is_dir():
        slice_adapter(args.work / "nested", EVAL_RANKS, slices)
    base = base_dir(args.cache)
    before = load(args)
    tmp = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    common = ["--metric", args.metric, "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    if args.max_examples:
        common += ["--max-examples", str(args.max_examples)]

    def ours(i: int) -> tuple[float, dict[int, float]]:
        subprocess.run(["sync"], check=False)
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "mlora_export", "eval", str(args.work / "nested"), "--base-model", str(base), "--data",
                              str(args.work / "heldout.jsonl"), "--ranks", ",".join(map(str, EVAL_RANKS)), "--output", str(tmp / f"ours{i}"),
                              "--json", *common], capture_output=True, text=True, check=True)
        seconds = time.perf_counter() - t0
        res = json.loads(out.stdout)
        return seconds, {int(p["rank"]): p["score"] for p in res["adapters"][0]["ranks"]}

    def theirs() -> tuple[float, dict[int, float], list[float]]:
        scores, each = {}, []
        for k in EVAL_RANKS:
            subprocess.run(["sync"], check=False)
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, __file__, "slice-job", "--slice", str(slices / f"r{k}"), "--rank", str(k), *common_args(args),
                                  "--metric", args.metric, "--batch-size", str(args.batch_size),
                                  *(["--max-examples", str(args.max_examples)] if args.max_examples else [])],
                                 capture_output=True, text=True, check=True)
            each.append(time.perf_counter() - t0)
            scores[k] = json.loads(out.stdout.strip().splitlines()[-1])["score"]
        return sum(each), scores, each

    ours_s, ours_scores = [], {}
    theirs_s, theirs_scores, theirs_each = [], {}, []
    for i in range(args.rounds):  # ours, theirs, theirs, ours, ...
        steps = ("ours", "theirs") if i % 2 == 0 else ("theirs", "ours")
        for step in steps:
            if step == "ours":
                s, ours_scores = ours(i)
                ours_s.append(s)
            else:
                s, theirs_scores, each = theirs()
                theirs_s.append(s)
                theirs_each.append(each)
            print(f"round {i + 1}: {step} {s:.1f} s", file=sys.stderr)
    after = load(args)
    return {"benchmark": "eval", "metric": args.metric, "ranks": list(EVAL_RANKS), "threads": args.threads, "batch_size": args.batch_size,
            "rounds": args.rounds, "one_load_s": ours_s, "five_loads_s": theirs_s, "five_loads_each_s": theirs_each,
            "ratio": statistics.median(ours_s) / statistics.median(theirs_s),
            "scores_one_load": ours_scores, "scores_peft_slices": theirs_scores,
            "max_score_difference": max(abs(ours_scores[k] - theirs_scores[k]) for k in EVAL_RANKS),
            "load_before": before, "load_after": after, "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}


def common_args(args: argparse.Namespace) -> list[str]:
    return ["--work", str(args.work), *(["--cache", str(args.cache)] if args.cache else []), "--threads", str(args.threads)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["train", "eval", "train-job", "slice-job"])
    ap.add_argument("--work", type=Path, default=Path("/work/real22"))
    ap.add_argument("--cache", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--metric", default="exact-match", choices=["loss", "accuracy", "exact-match"])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-examples", type=int, default=None)
    ap.add_argument("--job", choices=["nested", "peft"], help=argparse.SUPPRESS)
    ap.add_argument("--slice", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    fn = {"train": run_train, "eval": run_eval, "train-job": train_job, "slice-job": slice_job}[args.what]
    print(json.dumps(fn(args), indent=None if args.what.endswith("job") else 2))


if __name__ == "__main__":
    main()
