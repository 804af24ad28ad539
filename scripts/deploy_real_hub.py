#!/usr/bin/env python3
"""The real model's adapter as a Hub bundle: pushed to the suite's local Hub stand-in, one rank pulled by a latency budget.

Inputs: the trained nested adapter of ``scripts/real_model_adapter.py`` (``WORK/nested``, held-out
data ``WORK/heldout.jsonl``) on SmolLM2-135M-Instruct (the bfloat16 folder of
:func:`mlora_export.base.packaged.materialize`). Every step is the ``mlora-export`` command a user
runs (a subprocess), against ``tests/hub_server.py`` (the local Hub the test suite uses, driven by
the real ``huggingface_hub`` client over loopback):

1. ``mlora-export eval WORK/nested --metric exact-match --record`` (a copy of the adapter in
   ``WORK/hub/nested``), so that the bundle's card and ``pull --within`` have per-rank scores;
2. ``mlora-export bundle WORK/hub/nested --with-onnx BASE --measure-latency``: the dynamic-rank ONNX
   export (verified) and its per-rank latency on this machine, in the manifest;
3. ``mlora-export push-hub`` of that folder to the local Hub;
4. ``mlora-export pull --rank auto --max-latency-ms LIMIT`` with LIMIT the recorded latency of
   ``--budget-rank`` (so the ranks whose recorded latency fits are kept, and the largest is taken),
   and ``pull --rank auto --within 2`` (the smallest rank within 2 points of the best score);
5. the pulled folder loaded with ``PeftModel.from_pretrained`` on the base: its greedy answer to a
   held-out question equals that of the bundle's slice of the same rank read from disk.

Prints one JSON summary and writes ``WORK/hub/summary.json``. Usage::

    python scripts/deploy_real_hub.py --work /work/real22 --cache /tmp/mcache
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from real_model_adapter import heldout, hf_greedy, machine  # noqa: E402

REPO = "edge/smollm2-135m-iso3166-mlora"
TOKEN = "hf_edge_team"


def cli(*args: str, env: dict[str, str] | None = None) -> tuple[dict[str, Any], float]:
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "mlora_export", *args, "--json"], capture_output=True, text=True, check=False,
                          env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        sys.exit(f"mlora-export {args[0]} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout), round(time.time() - t0, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/work/real22"))
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--budget-rank", type=int, default=4, help="the latency limit is this rank's recorded latency")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-examples", type=int, default=69, help="held-out records the recorded evaluation scores (69: all)")
    args = ap.parse_args()

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mlora_export.base.packaged import materialize
    from tests.hub_server import HubServer

    torch.set_num_threads(args.threads)
    before = machine()
    base = materialize("smollm2", args.cache)
    d = args.work / "hub"
    d.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"machine_before": before}
    nested = d / "nested"
    if not (nested / "matryoshka_config.json").is_file() or "evaluation" not in json.loads((nested / "matryoshka_config.json").read_text()):
        shutil.rmtree(nested, ignore_errors=True)
        shutil.copytree(args.work / "nested", nested)
        res, s = cli("eval", str(nested), "--base-model", str(base), "--data", str(args.work / "heldout.jsonl"), "--metric", "exact-match",
                     "--max-examples", str(args.eval_examples), "--record", "--with-base", "--threads", str(args.threads), "--output", str(d / "eval"), "--force")
        summary["eval_seconds"] = s
    summary["evaluation"] = json.loads((d / "eval" / "results.json").read_text())["adapters"][0]["ranks"] if (d / "eval" / "results.json").is_file() else None
    bundle = d / "bundle"
    if not bundle.is_dir():
        res, s = cli("bundle", str(nested), "--ranks", "all", "--with-onnx", str(base), "--measure-latency",
                     "--base-model", "HuggingFaceTB/SmolLM2-135M-Instruct", "--license", "apache-2.0", "--repo-id", REPO, "--output", str(bundle))
        summary["bundle_seconds"] = s
    manifest = json.loads((bundle / "manifest.json").read_text())
    latency = {int(k): v for k, v in manifest["latency"]["ms"].items()}
    summary["recorded_latency"] = manifest["latency"]
    limit = latency[args.budget_rank]
    with HubServer(d / "hub-server", users={TOKEN: "edge"}) as hub:
        # as the suite does: Xet off (the stand-in speaks the LFS protocol), loopback unproxied, a fresh HF_HOME
        hub_env = {"HF_HUB_DISABLE_XET": "1", "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost", "HF_HOME": str(d / "hf-home")}
        pushed, s = cli("push-hub", str(bundle), "--repo-id", REPO, "--endpoint", hub.endpoint, "--token", TOKEN, env=hub_env)
        summary["push"] = {"seconds": s, "url": pushed.get("url"), "revision": pushed.get("revision")}
        pulls = {}
        for label, extra in (("max-latency", ["--max-latency-ms", f"{limit:.4f}"]), ("within-2", ["--within", "2"])):
            out = d / f"pulled-{label}"
            shutil.rmtree(out, ignore_errors=True)
            res, s = cli("pull", REPO, "--rank", "auto", *extra, "--endpoint", hub.endpoint, "--token", TOKEN, "--output", str(out), env=hub_env)
            pulls[label] = {"args": extra, "seconds": s, "result": res}
        if hub.bugs:
            sys.exit(f"the local Hub hit a bug of its own: {hub.bugs[:2]}")
    summary["latency_limit_ms"] = limit
    summary["pulls"] = pulls

    tok = AutoTokenizer.from_pretrained(base)
    prompt = heldout(args.work, 1)[0]["prompt"]
    checks = {}
    for label, p in pulls.items():
        k = int(p["result"]["rank"])
        pulled = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), str(d / f"pulled-{label}")).eval()
        local = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), str(bundle / f"r{k}")).eval()
        a, b = hf_greedy(pulled, tok, [prompt], 32)[0], hf_greedy(local, tok, [prompt], 32)[0]
        checks[label] = {"rank": k, "answer": tok.decode(a, skip_special_tokens=True), "equal_to_bundle_slice": a == b}
    summary["pulled_rank_answers"] = checks
    summary["machine_after"] = machine()
    (d / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    if not all(c["equal_to_bundle_slice"] for c in checks.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
