"""Benchmark: streaming merge vs PEFT merge_and_unload vs `cp -r`, on a TinyLlama-shaped model.

Builds (once, under --workdir) a TinyLlama-shaped base (hidden 2048, intermediate 5632, 22 layers,
32 heads, 4 KV heads, vocab 32000, bfloat16, ~1.1B parameters, several safetensors shards, random
weights written straight to disk) and a rank-64 nested adapter on all seven projections, then
measures side by side, each job in its own subprocess (wall time and peak RSS from ``wait4``):

- ``ours``: ``mlora-export merge nested --base-model base --rank 64`` (the CLI, end to end);
- ``peft``: ``AutoModelForCausalLM.from_pretrained`` + ``PeftModel.from_pretrained`` +
  ``merge_and_unload`` + ``save_pretrained``;
- ``cp``: ``cp -r base copy``.

and finally the peak RSS of our merge on a base with twice as many layers (44).

Usage::

    python benchmarks/bench_merge.py --workdir /tmp/mlora-bench-merge [--repeats 3] [--skip-peft]

Prints a Markdown table (and ``--json FILE`` writes the raw numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, VOCAB = 2048, 5632, 22, 32, 4, 32000
RANK = 64
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHARD_BYTES = 500 * 2**20


def build_base(path: Path, layers: int) -> None:
    """Write a TinyLlama-shaped bfloat16 base straight to safetensors shards (HF layout and index)."""
    import torch
    import transformers as tf

    from mlora_export.safetensors_io import dtype_name, write_safetensors

    if (path / "model.safetensors.index.json").exists():
        return
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = tf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=layers,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=2048,
        tie_word_embeddings=False, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
    )
    cfg.dtype = torch.bfloat16
    cfg.save_pretrained(tmp)
    tf.GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(tmp)
    with torch.device("meta"):
        model = tf.LlamaForCausalLM(cfg)
    shapes = [(name, tuple(p.shape)) for name, p in model.state_dict().items()]
    gen = torch.Generator().manual_seed(0)
    pool = (torch.randn(1 << 24, generator=gen) * 0.02).to(torch.bfloat16)

    def tensor(name: str, shape: tuple[int, ...], i: int) -> torch.Tensor:
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=torch.bfloat16)
        n = 1
        for s in shape:
            n *= s
        start = (i * 7919) % pool.numel()
        reps = (start + n) // pool.numel() + 1
        return pool.repeat(reps)[start : start + n].view(shape) if reps > 1 else pool[start : start + n].view(shape)

    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        nbytes = 2
        for s in shape:
            nbytes *= s
        if groups[-1] and size + nbytes > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += nbytes
    weight_map: dict[str, str] = {}
    total = 0
    for gi, group in enumerate(groups):
        fname = f"model-{gi + 1:05d}-of-{len(groups):05d}.safetensors"
        specs = [(n, dtype_name(torch.bfloat16), s) for n, s in group]
        total += write_safetensors(tmp / fname, specs, (tensor(n, s, i) for i, (n, s) in enumerate(group)), {"format": "pt"})
        weight_map.update({n: fname for n, _ in group})
    n_params = sum(p.numel() for p in model.parameters())
    with open(tmp / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {"total_parameters": n_params, "total_size": n_params * 2}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    os.replace(tmp, path)


def build_adapter(path: Path) -> None:
    """A rank-64 nested adapter (bfloat16) on all seven projections of every layer."""
    import torch

    from mlora_export.adapter import MatryoshkaConfig, save_nested

    if (path / "adapter_model.safetensors").exists():
        return
    dims = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, HIDDEN // HEADS * KV_HEADS), "v_proj": (HIDDEN, HIDDEN // HEADS * KV_HEADS),
            "o_proj": (HIDDEN, HIDDEN), "gate_proj": (HIDDEN, INTER), "up_proj": (HIDDEN, INTER), "down_proj": (INTER, HIDDEN)}
    gen = torch.Generator().manual_seed(1)
    factors = {}
    for layer in range(LAYERS):
        for t in TARGETS:
            fan_in, fan_out = dims[t]
            sub = "self_attn" if t in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            a = (torch.randn(RANK, fan_in, generator=gen) * 0.01).to(torch.bfloat16)
            b = (torch.randn(fan_out, RANK, generator=gen) * 0.01).to(torch.bfloat16)
            factors[f"model.layers.{layer}.{sub}.{t}"] = (a, b)
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_nested(tmp, factors, MatryoshkaConfig("matryoshka", RANK, (8, 16, 32, 64), "sqrt", 1.0, extra={"base_model": "tinyllama-shaped"}))
    os.replace(tmp, path)


PEFT_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter)
model = model.merge_and_unload()
model.save_pretrained(out)
"""


def measure(cmd: list[str]) -> tuple[float, float, str]:
    """Run ``cmd`` under ``/usr/bin/time``; return (wall seconds, peak RSS in MiB, stdout).

    ``/usr/bin/time`` reports the peak RSS of the command itself (measuring from this process
    with ``wait4`` would count the pages a forked child inherits from this fat parent).
    """
    import tempfile

    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
        t0 = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-f", "%e %M", "-o", tf.name, *cmd], capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"{cmd[:3]}… failed ({proc.returncode}): {proc.stderr[-2000:]}")
        _, max_kb = tf.read().split()[-2:]
    return wall, int(max_kb) / 1024, proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/mlora-bench-merge"))
    ap.add_argument("--repeats", type=int, default=3, help="rounds of ours and cp (median reported)")
    ap.add_argument("--peft-repeats", type=int, default=1, help="rounds that also run PEFT (it is slow)")
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--skip-double", action="store_true", help="skip the 44-layer memory check")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    wd: Path = args.workdir
    wd.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    build_base(wd / "base", LAYERS)
    build_adapter(wd / "nested")
    print(f"built inputs in {time.perf_counter() - t0:.1f} s under {wd}", file=sys.stderr)
    base_bytes = sum(p.stat().st_size for p in (wd / "base").iterdir())
    n_shards = len(list((wd / "base").glob("*.safetensors")))

    ours_cmd = [sys.executable, "-m", "mlora_export", "merge", str(wd / "nested"), "--base-model", str(wd / "base"),
                "--rank", str(RANK), "--output", str(wd / "out-ours"), "--force", "--json"]
    cp_cmd = ["cp", "-r", str(wd / "base"), str(wd / "out-cp")]
    peft_cmd = [sys.executable, "-c", PEFT_SCRIPT, str(wd / "base"), str(wd / "nested"), str(wd / "out-peft")]

    # warm the page cache with the inputs so that every contender starts from the same state
    subprocess.run(f"cat {wd / 'base'}/*.safetensors {wd / 'nested'}/* > /dev/null", shell=True, check=True)
    results: dict[str, list[tuple[float, float]]] = {"ours": [], "cp": [], "peft": []}
    inner: list[float] = []
    jobs = [("cp", cp_cmd, "out-cp"), ("ours", ours_cmd, "out-ours"), ("peft", peft_cmd, "out-peft")]
    for i in range(args.repeats):
        for name, cmd, out in jobs:
            if name == "peft" and (args.skip_peft or i >= args.peft_repeats):
                continue
            shutil.rmtree(wd / out, ignore_errors=True)
            subprocess.run(["sync"], check=False)  # no writeback of the previous job in this one's time
            wall, rss, stdout = measure(cmd)
            results[name].append((wall, rss))
            if name == "ours":
                inner.append(json.loads(stdout)["seconds"])
            print(f"{name}: {wall:.2f} s, {rss:.0f} MiB", file=sys.stderr)
            shutil.rmtree(wd / out, ignore_errors=True)
    subprocess.run(["sync"], check=False)

    double = None
    if not args.skip_double:
        build_base(wd / "base-44", 2 * LAYERS)
        shutil.rmtree(wd / "out-44", ignore_errors=True)
        subprocess.run(["sync"], check=False)
        double = measure([*ours_cmd[:6], str(wd / "base-44"), "--rank", str(RANK), "--output", str(wd / "out-44"), "--force", "--json"])[:2]
        print(f"ours on 44 layers: {double[0]:.2f} s, {double[1]:.0f} MiB", file=sys.stderr)
        shutil.rmtree(wd / "out-44", ignore_errors=True)
    med = {k: (statistics.median(w for w, _ in v), max(m for _, m in v)) for k, v in results.items() if v}
    print(f"\nTinyLlama-shaped base: {LAYERS} layers, bf16, {base_bytes / 2**30:.2f} GiB in {n_shards} shards; rank-{RANK} adapter on 7 projections; merge rank {RANK}.")
    load = os.getloadavg()[0]
    print(f"{os.cpu_count()} CPUs (load average {load:.1f} at the end); median of {args.repeats} runs for ours and cp, "
          f"{len(results['peft'])} for PEFT; every job in its own process, `sync` before each.\n")
    print("| job | wall time (s) | peak RSS (MiB) |")
    print("|---|---:|---:|")
    for name, label in (("ours", "mlora-export merge (CLI, end to end)"), ("peft", "PEFT merge_and_unload + save_pretrained"), ("cp", "cp -r of the base")):
        if name in med:
            print(f"| {label} | {med[name][0]:.2f} | {med[name][1]:.0f} |")
    if double:
        print(f"| mlora-export merge, 44-layer base ({2 * base_bytes / 2**30:.1f} GiB) | {double[0]:.2f} | {double[1]:.0f} |")
    print()
    if "peft" in med:
        print(f"- speed-up over PEFT: {med['peft'][0] / med['ours'][0]:.1f}x (target >= 4x)")
        print(f"- peak RSS vs PEFT: {med['ours'][1] / med['peft'][1]:.2f} (target <= 0.33)")
    print(f"- time vs cp -r: {med['ours'][0] / med['cp'][0]:.2f}x (target <= 2.5x); "
          f"merge alone (in-process, without Python/torch start-up): {statistics.median(inner):.2f} s = {statistics.median(inner) / med['cp'][0]:.2f}x cp")
    if double:
        print(f"- peak RSS, 44 vs 22 layers: {double[1]:.0f} vs {med['ours'][1]:.0f} MiB")
    if args.json:
        args.json.write_text(json.dumps({"runs": results, "inner_seconds": inner, "double": double, "base_bytes": base_bytes, "shards": n_shards}, indent=2))


if __name__ == "__main__":
    main()
