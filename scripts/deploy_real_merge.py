#!/usr/bin/env python3
"""The real model merged: ``mlora-export merge`` of one rank, loaded with ``from_pretrained``, vs base + PEFT slice.

Inputs: the trained nested adapter of ``scripts/real_model_adapter.py`` (``WORK/nested``, held-out
prompts in ``WORK/heldout.jsonl``) on SmolLM2-135M-Instruct (the bfloat16 folder of
:func:`mlora_export.base.packaged.materialize`).

For each rank of ``--ranks``: ``mlora-export merge`` (the CLI, timed) written as float32 and in the
base's own bfloat16 (the default); each loaded with ``AutoModelForCausalLM.from_pretrained`` and run
in float32 on ``--prompts`` held-out records (chat-templated question and the reference answer,
teacher-forced); compared with transformers + ``PeftModel.from_pretrained`` of the baked slice on
the float32 base. Reported: max |Δlogit| of each merge vs PEFT, the adapter's own effect
(max |PEFT − base|), the bfloat16 rounding's own effect (``W + ΔW`` rounded to bfloat16 by hand),
and the greedy (argmax) token agreement over all positions.

Prints a JSON summary and writes ``WORK/merge/summary.json``. Usage::

    python scripts/deploy_real_merge.py --work /work/real22 --cache /tmp/mcache --ranks 4,16
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_model_adapter import heldout, machine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/work/real22"))
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--ranks", default="4,16")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import numpy as np
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mlora_export.adapter import NestedAdapter
    from mlora_export.base.packaged import materialize
    from mlora_export.converters.slice import slice_adapter

    torch.set_num_threads(args.threads)
    before = machine()
    base_dir = materialize("smollm2", args.cache)
    d = args.work / "merge"
    d.mkdir(parents=True, exist_ok=True)
    ranks = [int(r) for r in args.ranks.split(",")]
    tok = AutoTokenizer.from_pretrained(base_dir)
    texts = [r["prompt"] + r["completion"] for r in heldout(args.work, args.prompts)]
    batch = [torch.tensor([tok(t, add_special_tokens=False)["input_ids"]]) for t in texts]

    def logits(model: Any) -> np.ndarray:
        with torch.no_grad():
            return np.concatenate([model(input_ids=ids).logits[0].double().numpy() for ids in batch])

    def load(path: Path) -> Any:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    base_logits = logits(load(base_dir))
    nested = NestedAdapter.load(args.work / "nested")
    out: dict[str, Any] = {}
    for k in ranks:
        slice_dir = d / f"slices-r{k}" / f"r{k}"
        if not slice_dir.is_dir():
            slice_adapter(args.work / "nested", [k], d / f"slices-r{k}")
        ref = logits(PeftModel.from_pretrained(load(base_dir), str(slice_dir)).eval())
        by_hand = load(base_dir)
        with nested.reader() as rd, torch.no_grad():
            for name in nested.modules:
                w = by_hand.get_submodule(name).weight
                w.copy_((w + rd.delta_weight(name, k)).to(torch.bfloat16).float())
        rounding = float(np.abs(logits(by_hand) - ref).max())
        del by_hand
        row: dict[str, Any] = {"adapter_effect": float(np.abs(ref - base_logits).max()), "bf16_rounding_by_hand": rounding,
                               "positions": int(ref.shape[0])}
        for dtype in ("float32", "bfloat16"):
            target = d / f"merged-r{k}-{dtype}"
            shutil.rmtree(target, ignore_errors=True)
            t0 = time.time()
            proc = subprocess.run([sys.executable, "-m", "mlora_export", "merge", str(args.work / "nested"), "--base-model", str(base_dir),
                                   "--rank", str(k), "--dtype", dtype, "--output", str(target)], capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                sys.exit(f"mlora-export merge failed ({proc.returncode}): {proc.stderr[-1500:]}")
            seconds = time.time() - t0
            got = logits(load(target))
            stored = json.loads((target / "config.json").read_text()).get("dtype") or json.loads((target / "config.json").read_text()).get("torch_dtype")
            row[dtype] = {"merge_seconds": round(seconds, 1), "stored_dtype": stored, "max_abs_logit_diff_vs_peft": float(np.abs(got - ref).max()),
                          "argmax_equal": int((got.argmax(-1) == ref.argmax(-1)).sum())}
        out[str(k)] = row
        print(f"rank {k}: {json.dumps(row)}", file=sys.stderr, flush=True)
    summary = {"machine_before": before, "base": str(base_dir), "ranks": out, "texts": len(texts), "threads": args.threads, "machine_after": machine()}
    (d / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
