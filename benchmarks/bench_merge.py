"""Benchmark: streaming merge vs PEFT merge_and_unload vs `cp -r`, on a TinyLlama-shaped model.

What a user gets: a TinyLlama-shaped base (hidden 2048, intermediate 5632, 22 layers, 32 heads,
4 KV heads, vocab 32000, untied head, ~1.1B parameters) with **random normal** weights in
~500 MB safetensors shards (HF layout, ``model.safetensors.index.json``), in each ``--dtypes``
(bfloat16, float16, float32), and a rank-64 nested adapter on all seven projections with random
normal ``A`` and ``B`` (a real delta: no zeros, no repeated pattern). Inputs are built once under
``--workdir``. Then, side by side in one run, each job in its own process (wall time and peak
RSS from ``/usr/bin/time``), inputs read once into the page cache and ``sync`` before each job:

- ``cp``: ``cp -r base copy`` (one per dtype): page cache to page cache inside the kernel, and
  it returns before anything reaches the disk;
- ``disk``: the same number of bytes written past the page cache (``O_DIRECT``, 8 MiB writes of
  random bytes), which is how the merge writes: the floor of the merge's own write;
- ``ours``: ``mlora-export merge nested --base-model base --rank K`` (the CLI, end to end,
  Python start-up included), for each ``--ranks`` K;
- ``peft``: ``from_pretrained`` + ``PeftModel.from_pretrained`` (the rank-K slice) +
  ``merge_and_unload`` + ``save_pretrained``, for each K in ``--peft-ranks``;

and last, the peak RSS of our merge on a base with twice the layers (44, bfloat16, rank 64).

Usage::

    python benchmarks/bench_merge.py --workdir /tmp/mlora-bench-merge            # everything
    python benchmarks/bench_merge.py --small --dtypes bfloat16 --ranks 64        # quick: 4 layers

Prints Markdown tables and ratios (``--json FILE`` writes the raw numbers). The machine's load
average is printed before and after: on a shared machine, say so next to the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, VOCAB = 2048, 5632, 22, 32, 4, 32000
MAX_RANK = 64
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHARD_BYTES = 500 * 10**6
DTYPES = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def build_base(path: Path, layers: int, dtype_name: str) -> None:
    """Write a TinyLlama-shaped base with random normal weights straight to ~500 MB safetensors shards."""
    import torch
    import transformers as tf

    from mlora_export.io.safetensors import dtype_name as st_name
    from mlora_export.io.safetensors import write_safetensors

    if (path / "model.safetensors.index.json").exists():
        return
    dtype = getattr(torch, dtype_name)
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = tf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=layers,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=2048,
        tie_word_embeddings=False, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
    )
    cfg.dtype = dtype
    cfg.save_pretrained(tmp)
    tf.GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(tmp)
    with torch.device("meta"):
        model = tf.LlamaForCausalLM(cfg)
    shapes = [(name, tuple(p.shape)) for name, p in model.state_dict().items()]
    gen = torch.Generator().manual_seed(0)

    def tensor(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        t = torch.randn(shape, generator=gen, dtype=torch.float32)
        t = t.mul_(0.1).add_(1.0) if name.endswith("norm.weight") else t.mul_(0.02)
        return t.to(dtype)

    itemsize = torch.empty(0, dtype=dtype).element_size()
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        nbytes = itemsize * _numel(shape)
        if groups[-1] and size + nbytes > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += nbytes
    weight_map: dict[str, str] = {}
    for gi, group in enumerate(groups):
        fname = f"model-{gi + 1:05d}-of-{len(groups):05d}.safetensors"
        specs = [(n, st_name(dtype), s) for n, s in group]
        write_safetensors(tmp / fname, specs, (tensor(n, s) for n, s in group), {"format": "pt"})
        weight_map.update({n: fname for n, _ in group})
    n_params = sum(_numel(s) for _, s in shapes)
    with open(tmp / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {"total_parameters": n_params, "total_size": n_params * itemsize},
                   "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    os.replace(tmp, path)


def build_adapter(path: Path, layers: int) -> None:
    """A rank-64 nested adapter (bfloat16) on all seven projections of every layer, random normal A and B."""
    import torch

    from mlora_export.adapter import MatryoshkaConfig, save_nested

    if (path / "adapter_model.safetensors").exists():
        return
    kv = HIDDEN // HEADS * KV_HEADS
    dims = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, kv), "v_proj": (HIDDEN, kv), "o_proj": (HIDDEN, HIDDEN),
            "gate_proj": (HIDDEN, INTER), "up_proj": (HIDDEN, INTER), "down_proj": (INTER, HIDDEN)}
    gen = torch.Generator().manual_seed(1)
    factors = {}
    for layer in range(layers):
        for t in TARGETS:
            fan_in, fan_out = dims[t]
            sub = "self_attn" if t in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            a = (torch.randn(MAX_RANK, fan_in, generator=gen) * 0.01).to(torch.bfloat16)
            b = (torch.randn(fan_out, MAX_RANK, generator=gen) * 0.01).to(torch.bfloat16)
            factors[f"model.layers.{layer}.{sub}.{t}"] = (a, b)
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_nested(tmp, factors, MatryoshkaConfig("matryoshka", MAX_RANK, (8, 16, 32, 64), "sqrt", 1.0, extra={"base_model": "tinyllama-shaped"}))
    os.replace(tmp, path)


def build_slices(nested: Path, out: Path, ranks: list[int]) -> None:
    """Plain PEFT LoRA folders of the adapter at ``ranks`` (what PEFT loads for a rank-k merge)."""
    from mlora_export.converters.slice import slice_adapter

    missing = [k for k in ranks if not (out / f"r{k}" / "adapter_model.safetensors").exists()]
    if missing:
        tmp = out.with_name(out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        slice_adapter(nested, missing, tmp)
        out.mkdir(exist_ok=True)
        for k in missing:
            shutil.rmtree(out / f"r{k}", ignore_errors=True)
            os.replace(tmp / f"r{k}", out / f"r{k}")
        shutil.rmtree(tmp, ignore_errors=True)


DISK_SCRIPT = """
import errno, mmap, os, sys
path, total = sys.argv[1], int(sys.argv[2])
os.makedirs(os.path.dirname(path), exist_ok=True)
buf = mmap.mmap(-1, 8 << 20)
buf.write(os.urandom(8 << 20))
flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
try:
    fd = os.open(path, flags | getattr(os, "O_DIRECT", 0), 0o644)
except OSError as e:  # a file system without direct I/O (tmpfs): the page cache, as the merge falls back
    if e.errno != errno.EINVAL:
        raise
    fd = os.open(path, flags, 0o644)
done = 0
while done < total:  # whole 8 MiB writes, then the file cut to the exact size
    done += os.pwrite(fd, memoryview(buf), done)
os.ftruncate(fd, total)
os.close(fd)
"""

PEFT_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out, dtype = sys.argv[1:5]
model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype))
model = PeftModel.from_pretrained(model, adapter)
model = model.merge_and_unload()
model.save_pretrained(out)
"""


def measure(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, float, str]:
    """Run ``cmd`` under ``/usr/bin/time``; return (wall seconds, peak RSS in MiB, CPU seconds (user + system), stdout).

    On a shared machine the CPU seconds say what a job costs whatever the others are doing; the
    wall time is what a user waits.

    ``/usr/bin/time`` reports the peak RSS of the command itself (measuring from this process
    with ``wait4`` would count the pages a forked child inherits from this fat parent).
    """
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
        t0 = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-f", "%e %M %U %S", "-o", tf.name, *cmd], capture_output=True, text=True, env=env, check=False)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"{cmd[:3]}… failed ({proc.returncode}): {proc.stderr[-2000:]}")
        _, max_kb, user, system = tf.read().split()[-4:]
    return wall, int(max_kb) / 1024, float(user) + float(system), proc.stdout


def _uptime() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/mlora-bench-merge"))
    ap.add_argument("--layers", type=int, default=LAYERS, help="decoder layers of the base (22: TinyLlama)")
    ap.add_argument("--small", action="store_true", help="quick run: a 4-layer base (same tensor shapes)")
    ap.add_argument("--dtypes", default="bfloat16,float16,float32", help="base dtypes, comma-separated")
    ap.add_argument("--ranks", default="8,16,64", help="ranks to merge, comma-separated (at most 64)")
    ap.add_argument("--peft-ranks", default=None, help="ranks PEFT is run at (default: all of --ranks)")
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--skip-double", action="store_true", help="skip the flat-memory check on twice the layers")
    ap.add_argument("--repeats", type=int, default=1, help="rounds of every job (each round runs all jobs side by side)")
    ap.add_argument("--clean", action="store_true", help="delete the work dir's inputs at the end")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--warm-memory", type=float, default=0.0, metavar="GIB",
                    help="touch this much memory once before the jobs (on a VM whose host backs guest pages lazily, "
                         "the first write to a page costs ~3 s/GiB: page-cache jobs such as cp pay it, O_DIRECT ones do not)")
    args = ap.parse_args()
    layers = 4 if args.small else args.layers
    dtypes = [d for d in args.dtypes.split(",") if d]
    ranks = [int(r) for r in args.ranks.split(",") if r]
    peft_ranks = ranks if args.peft_ranks is None else [int(r) for r in args.peft_ranks.split(",") if r]
    if any(d not in DTYPES for d in dtypes) or any(not 1 <= r <= MAX_RANK for r in ranks + peft_ranks):
        ap.error(f"dtypes must be among {', '.join(DTYPES)} and ranks in [1, {MAX_RANK}]")
    wd: Path = args.workdir
    wd.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(wd).free
    print(f"free disk under {wd}: {free / 2**30:.1f} GiB", file=sys.stderr)

    t0 = time.perf_counter()
    bases = {d: wd / f"base-{layers}-{DTYPES[d]}" for d in dtypes}
    for d, p in bases.items():
        build_base(p, layers, d)
    nested = wd / f"nested-{layers}"
    build_adapter(nested, layers)
    slices = wd / f"slices-{layers}"
    if not args.skip_peft:
        build_slices(nested, slices, sorted(set(peft_ranks)))
    print(f"built inputs in {time.perf_counter() - t0:.1f} s under {wd}", file=sys.stderr)

    env = {**os.environ}
    here = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(here), env.get("PYTHONPATH", "")) if p)

    def ours_cmd(base: Path, k: int, out: Path) -> list[str]:
        return [sys.executable, "-m", "mlora_export", "merge", str(nested), "--base-model", str(base),
                "--rank", str(k), "--output", str(out), "--force", "--json"]

    jobs: list[tuple[str, str, int | None, list[str], Path, Path]] = []  # (kind, dtype, rank, cmd, output, input)
    for d in dtypes:
        base = bases[d]
        jobs.append(("cp", d, None, ["cp", "-r", str(base), str(wd / "out-cp")], wd / "out-cp", base))
        nbytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
        jobs.append(("disk", d, None, [sys.executable, "-c", DISK_SCRIPT, str(wd / "out-disk" / "x"), str(nbytes)], wd / "out-disk", base))
        for k in ranks:
            jobs.append(("ours", d, k, ours_cmd(base, k, wd / "out-ours"), wd / "out-ours", base))
            if not args.skip_peft and k in peft_ranks:
                adapter = slices / f"r{k}"
                jobs.append(("peft", d, k, [sys.executable, "-c", PEFT_SCRIPT, str(base), str(adapter), str(wd / "out-peft"), d],
                             wd / "out-peft", base))

    if args.warm_memory:
        t1 = time.perf_counter()
        subprocess.run([sys.executable, "-c", f"bytearray({int(args.warm_memory * 2**30)})"], check=True)
        print(f"touched {args.warm_memory:g} GiB in {time.perf_counter() - t1:.1f} s", file=sys.stderr)
    load_before = _uptime()
    print(f"load average before: {load_before}", file=sys.stderr)
    results: dict[str, list[dict[str, object]]] = {}
    for rnd in range(args.repeats):
        for kind, d, k, cmd, out, src in jobs:
            shutil.rmtree(out, ignore_errors=True)
            # the inputs in the page cache for every job alike, then no writeback left over in its time
            subprocess.run(f"cat {src}/*.safetensors {nested}/* > /dev/null", shell=True, check=True)
            subprocess.run(["sync"], check=False)
            wall, rss, cpu, stdout = measure(cmd, env)
            inner = json.loads(stdout)["seconds"] if kind == "ours" else None
            key = f"{kind}/{d}/{k}"
            results.setdefault(key, []).append({"wall": wall, "rss": rss, "cpu": cpu, "inner": inner, "load": os.getloadavg()[0]})
            print(f"round {rnd + 1} {key}: {wall:.2f} s, {cpu:.2f} s CPU, {rss:.0f} MiB" + (f" (merge itself {inner:.2f} s)" if inner else ""),
                  file=sys.stderr)
            shutil.rmtree(out, ignore_errors=True)
    subprocess.run(["sync"], check=False)

    double = None
    if not args.skip_double:
        base2 = wd / f"base-{2 * layers}-bf16"
        build_base(base2, 2 * layers, "bfloat16")
        out = wd / "out-double"
        shutil.rmtree(out, ignore_errors=True)
        subprocess.run(f"cat {base2}/*.safetensors > /dev/null", shell=True, check=True)
        subprocess.run(["sync"], check=False)
        wall, rss, cpu, _ = measure(ours_cmd(base2, MAX_RANK, out), env)
        double = {"wall": wall, "rss": rss, "cpu": cpu, "layers": 2 * layers}
        print(f"ours on {2 * layers} layers: {wall:.2f} s, {rss:.0f} MiB", file=sys.stderr)
        shutil.rmtree(out, ignore_errors=True)
        if args.clean:
            shutil.rmtree(base2, ignore_errors=True)
    load_after = _uptime()

    def best(key: str, field: str = "wall") -> float | None:
        runs = results.get(key)
        return min(float(r[field]) for r in runs) if runs and runs[0][field] is not None else None  # type: ignore[arg-type]

    def f(x: float | None, fmt: str = "{:.2f}") -> str:
        return "–" if x is None else fmt.format(x)

    def peak(key: str) -> float | None:
        runs = results.get(key)
        return max(float(r["rss"]) for r in runs) if runs else None  # type: ignore[arg-type]

    print(f"\nTinyLlama-shaped base, {layers} layers, random normal weights, ~500 MB shards; rank-{MAX_RANK} random normal "
          f"adapter on 7 projections. {os.cpu_count()} CPUs; load average (1, 5, 15 min) before {load_before}, after {load_after}. "
          f"{args.repeats} round(s), best of rounds; each job its own process, inputs in the page cache, `sync` before each.\n")
    print("| base | rank | cp -r (s) | O_DIRECT write (s) | ours (s) | ours: merge itself (s) | PEFT (s) | ours / cp | ours / O_DIRECT write | PEFT / ours "
          "| RSS ours (MiB) | RSS PEFT (MiB) | RSS ours / PEFT |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for d in dtypes:
        cp, disk = best(f"cp/{d}/None"), best(f"disk/{d}/None")
        for k in ranks:
            o, oi, p = best(f"ours/{d}/{k}"), best(f"ours/{d}/{k}", "inner"), best(f"peft/{d}/{k}")
            ro, rp = peak(f"ours/{d}/{k}"), peak(f"peft/{d}/{k}")

            print(f"| {d} | {k} | {f(cp)} | {f(disk)} | {f(o)} | {f(oi)} | {f(p)} | {f(o / cp if o and cp else None)}× | "
                  f"{f(o / disk if o and disk else None)}× | {f(p / o if p and o else None)}× | {f(ro, '{:.0f}')} | {f(rp, '{:.0f}')} | "
                  f"{f(ro / rp if ro and rp else None)} |")
    print("\nCPU seconds (user + system) of each job, the same runs: what it costs whatever else the machine runs.\n")
    print("| base | rank | cp -r | O_DIRECT write | ours | PEFT | ours / cp | PEFT / ours |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for d in dtypes:
        cp, disk = best(f"cp/{d}/None", "cpu"), best(f"disk/{d}/None", "cpu")
        for k in ranks:
            o, p = best(f"ours/{d}/{k}", "cpu"), best(f"peft/{d}/{k}", "cpu")
            print(f"| {d} | {k} | {f(cp)} | {f(disk)} | {f(o)} | {f(p)} | {f(o / cp if o and cp else None)}× | {f(p / o if p and o else None)}× |")
    if double:
        print(f"\nflat memory: ours at rank {MAX_RANK} on a {double['layers']}-layer bfloat16 base: {double['wall']:.2f} s, "
              f"peak RSS {double['rss']:.0f} MiB (vs {f(peak(f'ours/bfloat16/{MAX_RANK}'), '{:.0f}')} MiB on {layers} layers)")
    if args.json:
        args.json.write_text(json.dumps({"layers": layers, "load_before": load_before, "load_after": load_after,
                                         "results": results, "double": double}, indent=2))
    if args.clean:
        for p in (*bases.values(), nested, slices):
            shutil.rmtree(p, ignore_errors=True)


if __name__ == "__main__":
    main()
