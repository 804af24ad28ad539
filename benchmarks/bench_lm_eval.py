"""`mlora-export eval --tasks` (lm-eval on one loaded model, ranks switched in place) vs one
`lm_eval` run per rank on that rank's PEFT slice (each a fresh process, as a user would run them).

The model is SmolLM2-135M-Instruct (the bf16 folder of ``mlora_export.base.packaged``; set
``MLORA_SMOLLM2_DIR`` or pass ``--base``). The data is the real-model demo's capitals task
(``mlora_export/demo/data/capitals-{train,eval}.jsonl``: "What is the capital of Rwanda? Answer
with the name of the city only." → "Kigali", as conversations). Two custom lm-eval tasks over a
local JSONL made from the 66 held-out questions (no downloads), both rendered with the model's
chat template (``--apply-chat-template``):

- ``capitals_gen``: greedy generation, exact match (case, punctuation and surrounding blanks ignored);
- ``capitals_mc``: the right capital against three other capitals of the held-out set, by
  log-likelihood (``acc``, ``acc_norm``).

The adapter is trained here, once (kept in ``--work`` for reruns): ``mlora-export train``,
nested-loss, ranks 1,2,4,8,16,32, all-linear, 30 steps of 8 conversations of the 180 training
ones. ``mlora-export slice`` then writes the six PEFT slices.

Timed, each as a subprocess from a cold start, one after the other, on ``capitals_gen``:

- ours: ``mlora-export eval NESTED --base-model BASE --tasks capitals_gen --include-path TASKS
  --apply-chat-template --ranks 1,2,4,8,16,32 ...`` (one process, one base load);
- lm-eval: six ``lm_eval --model hf --model_args pretrained=BASE,peft=SLICE --tasks capitals_gen
  --include_path TASKS --apply_chat_template ...`` runs, one per slice.

Both use the same batch size, device (cpu), dtype (``--dtype``, float32 by default) and ``--limit``; the
per-rank scores of the two must be equal (checked, printed). The machine's load is printed before
and after. ``--both-tasks`` then scores both tasks at every rank and the base (ours only) and
prints the per-rank numbers and AURAC.

    python benchmarks/bench_lm_eval.py --work /tmp/bench-lm-eval               # trains once, then times
    python benchmarks/bench_lm_eval.py --work /tmp/bench-lm-eval --both-tasks  # and the numbers of both tasks
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

RANKS = (1, 2, 4, 8, 16, 32)
TASK = "capitals_gen"
DATA = Path(__file__).resolve().parent.parent / "mlora_export" / "demo" / "data"

GEN_YAML = """task: capitals_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: generate_until
test_split: test
num_fewshot: 0
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["<|im_end|>", "\\n"]
  max_gen_toks: 16
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
    regexes_to_ignore: ["^\\\\s+", "\\\\s+$"]
metadata:
  version: 1.0
"""

MC_YAML = """task: capitals_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
num_fewshot: 0
doc_to_text: "{{{{question}}}}"
doc_to_target: label
doc_to_choice: choices
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def sh(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` (output to ``log``); return its wall seconds; raise on failure."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}).returncode
    if rc != 0:
        sys.exit(f"failed ({rc}): {' '.join(cmd)}; see {log}")
    return time.perf_counter() - t0


def write_data(work: Path) -> None:
    """The task data (each held-out question with its answer and four choices) and the two task YAMLs."""
    rows = [json.loads(line) for line in (DATA / "capitals-eval.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    capitals = [r["messages"][1]["content"] for r in rows]
    rnd = random.Random(0)
    with open(work / "capitals.jsonl", "w", encoding="utf-8") as f:
        for i, r in enumerate(rows):
            question, answer = r["messages"][0]["content"], r["messages"][1]["content"]
            choices = rnd.sample([c for c in capitals if c != answer], 3)
            choices.insert(i % 4, answer)
            f.write(json.dumps({"question": question, "answer": answer, "choices": choices, "label": i % 4}) + "\n")
    tasks = work / "tasks"
    tasks.mkdir(exist_ok=True)
    (tasks / "capitals_gen.yaml").write_text(GEN_YAML.format(data=work / "capitals.jsonl"), encoding="utf-8")
    (tasks / "capitals_mc.yaml").write_text(MC_YAML.format(data=work / "capitals.jsonl"), encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=os.environ.get("MLORA_SMOLLM2_DIR", "/tmp/mcache/smollm2-135m-instruct-bfloat16"))
    ap.add_argument("--work", default="/tmp/bench-lm-eval")
    ap.add_argument("--limit", type=int, default=66, help="task documents per rank (66: all)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--dtype", default="float32", help="both sides (bfloat16 matmuls are several times slower on most CPUs)")
    ap.add_argument("--train-steps", type=int, default=30)
    ap.add_argument("--both-tasks", action="store_true", help="also score capitals_mc and the base (our path only), for the numbers")
    args = ap.parse_args()
    base, work = Path(args.base), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "mlora_export"]
    lm_eval = shutil.which("lm_eval") or sys.exit("lm_eval not found: pip install 'mlora-export[lm-eval]'")

    write_data(work)
    nested, slices = work / "nested", work / "slices"
    if not nested.exists():
        t = sh(cli + ["train", "--base-model", str(base), "--data", str(DATA / "capitals-train.jsonl"), "--ranks", ",".join(map(str, RANKS)),
                      "--max-steps", str(args.train_steps), "--warmup-steps", "3", "--batch-size", "8", "--lr", "2e-3", "--seed", "0",
                      "--max-length", "128", "--dtype", "float32", "--output", str(nested)], work / "train.log")
        print(f"trained {nested} in {t:.0f} s ({args.train_steps} steps)")
    if not slices.exists():
        sh(cli + ["slice", str(nested), "--ranks", ",".join(map(str, RANKS)), "--output", str(slices)], work / "slice.log")

    load_before = os.getloadavg()
    common = ["--batch-size", str(args.batch_size), "--apply-chat-template", "--dtype", args.dtype]
    out = work / "ours"
    t_ours = sh(cli + ["eval", str(nested), "--base-model", str(base), "--tasks", TASK, "--include-path", str(work / "tasks"),
                       "--ranks", ",".join(map(str, RANKS)), "--limit", str(args.limit), "--device", "cpu", *common,
                       "--output", str(out), "--force"], work / "ours.log")
    ours = json.loads((out / "results.json").read_text())
    ours_scores = {p["rank"]: p["tasks"][f"{TASK}:exact_match"]["value"] for p in ours["adapters"][0]["ranks"]}

    t_theirs, theirs_scores = [], {}
    for k in RANKS:
        o = work / f"lm_eval_r{k}"
        shutil.rmtree(o, ignore_errors=True)
        t_theirs.append(sh([lm_eval, "--model", "hf", "--model_args", f"pretrained={base},peft={slices / f'r{k}'},dtype={args.dtype}",
                            "--tasks", TASK, "--include_path", str(work / "tasks"), "--limit", str(args.limit),
                            "--device", "cpu", "--batch_size", str(args.batch_size), "--apply_chat_template",
                            "--output_path", str(o)], work / f"lm_eval_r{k}.log"))
        res = json.loads(next(o.rglob("results_*.json")).read_text())
        theirs_scores[k] = res["results"][TASK]["exact_match,none"]
    load_after = os.getloadavg()

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; "
          f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min)")
    print(f"{'rank':>4}  {'ours':>8}  {'lm_eval':>8}")
    for k in RANKS:
        print(f"{k:>4}  {ours_scores[k]:8.3f}  {theirs_scores[k]:8.3f}{'' if ours_scores[k] == theirs_scores[k] else '  DIFFERENT'}")
    total = sum(t_theirs)
    print(f"ours (one process, one base load, 6 ranks): {t_ours:.1f} s")
    print(f"lm_eval x6 (fresh process per slice): {total:.1f} s ({', '.join(f'{t:.1f}' for t in t_theirs)})")
    print(f"speed-up: {total / t_ours:.2f}x")
    summary = {"model": str(base), "task": TASK, "limit": args.limit, "batch_size": args.batch_size, "dtype": args.dtype, "ranks": list(RANKS),
               "ours_s": t_ours, "lm_eval_s": t_theirs, "ratio": total / t_ours, "ours": ours_scores, "lm_eval": theirs_scores,
               "equal": ours_scores == theirs_scores, "load_before": load_before, "load_after": load_after}
    (work / "summary.json").write_text(json.dumps(summary, indent=2))

    if args.both_tasks:
        out2 = work / "ours-both"
        t = sh(cli + ["eval", str(nested), "--base-model", str(base), "--tasks", f"{TASK},capitals_mc", "--include-path", str(work / "tasks"),
                      "--ranks", ",".join(map(str, RANKS)), "--limit", str(args.limit), "--with-base", "--device", "cpu", *common,
                      "--output", str(out2), "--force"], work / "ours-both.log")
        both = json.loads((out2 / "results.json").read_text())
        names = both["lm_eval"]["headlines"] + (["tasks:mean"] if "tasks:mean" in both["lm_eval"]["metrics"] else [])
        print(f"\nboth tasks, with the base model (ours, {t:.0f} s):")
        print(f"{'rank':>4}  " + "  ".join(f"{n:>22}" for n in names))
        for p in [both["base"], *both["adapters"][0]["ranks"]]:
            print(f"{p['rank']:>4}  " + "  ".join(f"{p['tasks'][n]['value']:22.3f}" for n in names))
        for n in names:
            au = both["adapters"][0]["aurac_by_metric"][n]
            print(f"AURAC {n}: v1 {au['v1']:.3f}, v2 {au['v2']:.3f}")


if __name__ == "__main__":
    main()
