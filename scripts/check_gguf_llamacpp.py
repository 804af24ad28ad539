#!/usr/bin/env python3
"""Check `mlora-export gguf` files in the real llama.cpp runtime (not in CI: the build takes 15-35 min).

1. Downloads the ``llama-cpp-python==0.3.36`` source package with pip and builds llama.cpp from its
   ``vendor/llama.cpp`` (CMake, CPU only, ``nice -n 10``, ``--jobs`` parallel jobs; only the tools
   used here: ``llama-debug`` and ``llama-completion``). A build already in ``--work`` is reused.
2. Builds a tiny Llama (grouped-query attention, so the key permutation is exercised), a tiny
   Qwen2 and a tiny GPT-2 (Conv1D targets) with one byte-level BPE tokenizer trained on the built-in data, and
   converts each base to GGUF (f32) with llama.cpp's own ``convert_hf_to_gguf.py``. (The converter
   identifies a BPE pre-tokenizer by hashing a vocabulary it knows; ours is new, so its check is
   told the pre-tokenizer is ``gpt-2``, the regex the tokenizer was trained with.)
3. Writes a nested adapter with random-normal ``A`` and ``B`` (so the adapter moves the logits),
   its GGUF files (``export_gguf``) and its baked PEFT slices at two ranks.
4. For each rank compares llama.cpp (``llama-debug --save-logits``: last-position logits of the
   prompt; ``llama-completion --temp 0``: greedy continuation) with base + ``--lora rK.gguf``
   against transformers + ``PeftModel.from_pretrained(base, slice rK)`` on llama.cpp's own prompt
   token ids. The converter's file for the GPT-2 slice is loaded too, to record what llama.cpp says.

Prints one JSON summary (also written to ``WORK/summary.json``). Usage::

    python scripts/check_gguf_llamacpp.py --work ~/.cache/mlora-export/llama-cpp-check --jobs 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

SDIST = "llama-cpp-python==0.3.36"
TOOLS = ("llama-debug", "llama-completion")
ARCHS = ("llama", "qwen2", "gpt2")
PROMPT = "sort jigb = bgij sort lok ="
N_PREDICT = 24

#: convert_hf_to_gguf.py with the pre-tokenizer check told "gpt-2" (see the module docstring).
CONVERT_BASE = r"""
import runpy, sys
root = sys.argv[1]
sys.path.insert(0, root)
sys.path.insert(1, root + "/gguf-py")
import conversion.base as cb
cb.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv = [root + "/convert_hf_to_gguf.py", *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def fetch_and_build(work: Path, jobs: int) -> tuple[Path, float | None]:
    """The llama.cpp source folder (with build/bin), and the build's wall time (None: reused)."""
    src = work / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"
    bins = src / "build" / "bin"
    if all((bins / t).is_file() for t in TOOLS):
        return src, None
    if not (src / "CMakeLists.txt").is_file():
        work.mkdir(parents=True, exist_ok=True)
        log(f"downloading {SDIST} (source)")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-q", "-d", str(work), SDIST], check=True)
        with tarfile.open(work / "llama_cpp_python-0.3.36.tar.gz") as tar:
            tar.extractall(work, filter="data")
    nice = ["nice", "-n", "10"]
    t0 = time.time()
    log(f"building llama.cpp ({', '.join(TOOLS)}) with {jobs} job(s); this takes 15-35 min on 2 cores")
    subprocess.run([*nice, "cmake", "-S", str(src), "-B", str(src / "build"), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_TESTS=OFF",
                    "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_OPENSSL=OFF", "-DGGML_NATIVE=ON",
                    *(["-G", "Ninja"] if shutil.which("ninja") else [])], check=True, stdout=subprocess.DEVNULL)
    subprocess.run([*nice, "cmake", "--build", str(src / "build"), "-j", str(jobs), "--target", *TOOLS], check=True, stdout=subprocess.DEVNULL)
    return src, time.time() - t0


def build_tokenizer(out: Path) -> Any:
    """A byte-level BPE (GPT-2 regex) trained on the built-in data: a format llama.cpp reads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    import mlora_export

    data = Path(mlora_export.__file__).parent / "data"
    text = [json.loads(line)["prompt"] + json.loads(line)["completion"] for f in sorted(data.glob("*.jsonl")) for line in f.read_text().splitlines() if line]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def build_base(arch: str, tokenizer: Any, out: Path) -> Any:
    import torch
    import transformers as tf

    torch.manual_seed(0)
    v = len(tokenizer)
    if arch == "llama":
        cfg = tf.LlamaConfig(vocab_size=v, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=256, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
        model = tf.LlamaForCausalLM(cfg)
    elif arch == "qwen2":
        # transformers (and so the converter) loads this folder's tokenizer as a Qwen2Tokenizer, which
        # adds <|endoftext|> as id v: the vocabulary has room for it
        cfg = tf.Qwen2Config(vocab_size=v + 1, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=256, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
        model = tf.Qwen2ForCausalLM(cfg)
    else:
        cfg = tf.GPT2Config(vocab_size=v, n_embd=64, n_layer=2, n_head=4, n_positions=256, n_ctx=256, bos_token_id=0, eos_token_id=1)
        model = tf.GPT2LMHeadModel(cfg)
    with torch.no_grad():  # unit-scale logits, so that the greedy tokens depend on the weights
        model.lm_head.weight.normal_(0.0, 64 ** -0.5)
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return model


def build_nested(model: Any, arch: str, out: Path, r: int = 16, std: float = 0.15) -> None:
    import torch
    from transformers.pytorch_utils import Conv1D

    from mlora_export.adapter import MatryoshkaConfig, save_nested

    targets = ("c_attn", "c_proj", "c_fc") if arch == "gpt2" else ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    gen = torch.Generator().manual_seed(1)
    factors = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (torch.nn.Linear, Conv1D)) and name.rsplit(".", 1)[-1] in targets:
            fan_in, fan_out = (mod.weight.shape[0], mod.weight.shape[1]) if isinstance(mod, Conv1D) else (mod.in_features, mod.out_features)
            factors[name] = (torch.randn(r, fan_in, generator=gen) * std, torch.randn(fan_out, r, generator=gen) * std)
    out.mkdir(parents=True)
    save_nested(out, factors, MatryoshkaConfig("matryoshka", r, (4, 8, 16), "sqrt", 1.0, extra={"base_model": str(out.parent / f"base-{arch}")}),
                fan_in_fan_out=arch == "gpt2")


def run_tool(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=600, check=False)


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the character that stands for each byte → the byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_bytes(tokenizer: Any, ids: list[int]) -> bytes:
    """The bytes that ``ids`` stand for, as llama-completion prints them: special tokens print
    nothing, and a NUL byte neither (it prints each piece with ``LOG("%s", piece.c_str())``)."""
    dec = _byte_decoder()
    special = set(tokenizer.all_special_ids)
    out = b"".join(bytes(dec[ch] for ch in tokenizer.convert_ids_to_tokens(i)) for i in ids if i not in special)
    return out.replace(b"\x00", b"")


def llama_logits(bins: Path, base_gguf: Path, lora: Path | None, out: Path, threads: int) -> tuple[Any, list[int], str]:
    import numpy as np

    out.mkdir(parents=True, exist_ok=True)
    cmd = [str(bins / "llama-debug"), "-m", str(base_gguf), "-p", PROMPT, "--save-logits", "--logits-output-dir", str(out), "-t", str(threads), "-c", "256"]
    if lora is not None:
        cmd += ["--lora", str(lora)]
    proc = run_tool(cmd)
    stem = out / f"llamacpp-{base_gguf.stem}"
    if proc.returncode != 0 or not Path(f"{stem}.bin").is_file():
        return None, [], proc.stderr[-3000:]
    return np.fromfile(f"{stem}.bin", dtype=np.float32), np.fromfile(f"{stem}-tokens.bin", dtype=np.int32).tolist(), ""


def llama_greedy(bins: Path, base_gguf: Path, lora: Path | None, threads: int) -> bytes:
    cmd = [str(bins / "llama-completion"), "-m", str(base_gguf), "-p", PROMPT, "-n", str(N_PREDICT), "--temp", "0", "--top-k", "1",
           "-t", str(threads), "-c", "256", "--no-display-prompt", "-no-cnv", "--seed", "0"]
    if lora is not None:
        cmd += ["--lora", str(lora)]
    # llama.cpp prints through an asynchronous logger that can lose the tail of stdout at exit: a
    # complete run ends with the "\n\n" printed after the last token, so retry until one does.
    for _ in range(10):
        proc = subprocess.run(cmd, capture_output=True, timeout=600, check=False)  # bytes: a token may be part of a UTF-8 character
        if proc.returncode != 0:
            raise RuntimeError(f"llama-completion failed: {proc.stderr[-800:].decode(errors='replace')}")
        if proc.stdout.endswith(b"\n\n"):
            return proc.stdout[:-2]
    raise RuntimeError("llama-completion's output was cut short 10 times in a row")


def hf_outputs(model: Any, tokenizer: Any, ids: list[int]) -> tuple[Any, bytes]:
    import torch

    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model(x).logits[0, -1].float().numpy()
        gen = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=N_PREDICT, do_sample=False, pad_token_id=1)
    return logits, token_bytes(tokenizer, gen[0, len(ids):].tolist())


def check_arch(arch: str, work: Path, llama_cpp: Path, ranks: tuple[int, ...], threads: int) -> dict[str, Any]:
    import numpy as np
    from peft import PeftModel

    from mlora_export.converters.gguf import GgufOptions, export_gguf
    from mlora_export.converters.slice import slice_adapter

    bins = llama_cpp / "build" / "bin"
    d = work / f"run-{arch}"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    tokenizer = build_tokenizer(d)
    model = build_base(arch, tokenizer, d / f"base-{arch}")
    base_gguf = d / "base.gguf"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run([sys.executable, "-c", CONVERT_BASE, str(llama_cpp), str(d / f"base-{arch}"), "--outtype", "f32", "--outfile", str(base_gguf)],
                   check=True, env=env, capture_output=True)
    build_nested(model, arch, d / "nested", std=0.4 if arch == "gpt2" else 0.15)  # GPT-2's layer norms damp the adapter more
    export_gguf(d / "nested", ranks, d / "gguf", GgufOptions(out_type="f32"), base_model=d / f"base-{arch}")
    slice_adapter(d / "nested", ranks, d / "slices")

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(d / f"base-{arch}")  # as the converter reads it
    base_logits, ids, err = llama_logits(bins, base_gguf, None, d / "logits-base", threads)
    if base_logits is None:
        raise RuntimeError(f"llama-debug failed on the base: {err}")
    hf_base_logits, hf_base_text = hf_outputs(model, tokenizer, ids)
    result: dict[str, Any] = {
        "prompt_tokens": len(ids),
        "base": {"max_abs_logit_diff_llamacpp_vs_hf": float(np.abs(base_logits - hf_base_logits).max()),
                 "greedy_equal": llama_greedy(bins, base_gguf, None, threads) == hf_base_text},
        "ranks": {},
    }
    for k in ranks:
        peft_model = PeftModel.from_pretrained(model, str(d / "slices" / f"r{k}")).eval()
        logits, ids_k, err = llama_logits(bins, base_gguf, d / "gguf" / f"r{k}.gguf", d / f"logits-r{k}", threads)
        if logits is None:
            raise RuntimeError(f"llama-debug --lora r{k}.gguf failed: {err}")
        assert ids_k == ids
        hf_logits, hf_text = hf_outputs(peft_model, tokenizer, ids)
        cpp_text = llama_greedy(bins, base_gguf, d / "gguf" / f"r{k}.gguf", threads)
        result["ranks"][k] = {
            "max_abs_logit_diff_llamacpp_lora_vs_peft": float(np.abs(logits - hf_logits).max()),
            "max_abs_logit_change_by_adapter_peft": float(np.abs(hf_logits - hf_base_logits).max()),
            "argmax_equal": int(logits.argmax()) == int(hf_logits.argmax()),
            "greedy_equal": cpp_text == hf_text,
            "greedy_differs_from_base": hf_text != hf_base_text,
            "greedy_bytes_llamacpp": cpp_text.decode(errors="backslashreplace"),
            "greedy_bytes_peft": hf_text.decode(errors="backslashreplace"),
        }
        model = peft_model.unload()
    if arch == "gpt2":  # what llama.cpp says of the converter's file for the same slice
        k = ranks[0]
        ref = d / f"converter-r{k}.gguf"
        subprocess.run([sys.executable, str(llama_cpp / "convert_lora_to_gguf.py"), "--base", str(d / f"base-{arch}"), "--outtype", "f32",
                        "--outfile", str(ref), str(d / "slices" / f"r{k}")], check=True, env=env, capture_output=True)
        logits, _, err = llama_logits(bins, base_gguf, ref, d / "logits-converter", threads)
        lines = [line.split(" E ", 1)[-1] for line in err.splitlines() if "lora" in line.lower()]
        result["converter_file_in_llamacpp"] = {"rank": k, "loaded": logits is not None, "message": " | ".join(lines[:2])}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "mlora-export" / "llama-cpp-check")
    ap.add_argument("--jobs", type=int, default=2, help="parallel build jobs")
    ap.add_argument("--threads", type=int, default=1, help="threads for llama.cpp and torch")
    ap.add_argument("--ranks", default="4,16")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    ranks = tuple(sorted(int(k) for k in args.ranks.split(",")))
    llama_cpp, build_s = fetch_and_build(args.work, args.jobs)
    summary: dict[str, Any] = {"llama_cpp": f"{SDIST} sdist, vendor/llama.cpp", "build_seconds": build_s, "ranks": ranks, "prompt": PROMPT, "n_predict": N_PREDICT}
    for arch in ARCHS:
        log(f"checking {arch}")
        summary[arch] = check_arch(arch, args.work, llama_cpp, ranks, args.threads)
    (args.work / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    ok = all(r["greedy_equal"] and r["argmax_equal"] for a in ARCHS for r in summary[a]["ranks"].values())
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
