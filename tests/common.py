"""Shared helpers for tests: pico models built from transformers configs, random nested adapters,
and the reference ``ΔW_k`` of docs/design.md §1 applied by hand."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from mlora_export.adapter import MatryoshkaConfig, NestedAdapter, save_nested

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]
BERT_TARGETS = ["query", "key", "value", "dense"]


def tiny_config(arch: str) -> Any:
    """A pico config for ``llama`` (nn.Linear), ``gpt2`` (Conv1D) or ``bert`` (classifier)."""
    import transformers as tf

    if arch == "llama":
        return tf.LlamaConfig(
            vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
            tie_word_embeddings=False,
        )
    if arch == "gpt2":
        return tf.GPT2Config(
            vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )
    if arch == "bert":
        return tf.BertConfig(
            vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=64, num_labels=3, pad_token_id=0,
        )
    raise ValueError(arch)


def build_model(arch: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tiny_config(arch)
    cls = {"llama": tf.LlamaForCausalLM, "gpt2": tf.GPT2LMHeadModel, "bert": tf.BertForSequenceClassification}[arch]
    model = cls(cfg).to(dtype).eval()
    return model


def targets_for(arch: str) -> list[str]:
    return {"llama": LLAMA_TARGETS, "gpt2": GPT2_TARGETS, "bert": BERT_TARGETS}[arch]


def adapted_modules(model: torch.nn.Module, targets: list[str]) -> dict[str, torch.nn.Module]:
    """Module name → module for every Linear/Conv1D whose last name component is in ``targets``."""
    from transformers.pytorch_utils import Conv1D

    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (torch.nn.Linear, Conv1D)) and name.rsplit(".", 1)[-1] in targets:
            out[name] = mod
    return out


def module_shape(mod: torch.nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a Linear or Conv1D."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(mod, Conv1D):
        return mod.weight.shape[0], mod.weight.shape[1]
    return mod.in_features, mod.out_features


def random_nested(
    model: torch.nn.Module,
    path: Path,
    *,
    arch: str,
    r: int = 8,
    train_ranks: tuple[int, ...] = (1, 2, 4, 8),
    scaling: str = "sqrt",
    alpha: float = 1.0,
    method: str = "matryoshka",
    dtype: torch.dtype = torch.float32,
    seed: int = 1,
    std: float = 0.3,
    task_type: str | None = None,
) -> NestedAdapter:
    """Write a nested adapter with random (non-zero) A and B for ``model``; return it loaded."""
    gen = torch.Generator().manual_seed(seed)
    factors = {}
    for name, mod in adapted_modules(model, targets_for(arch)).items():
        fan_in, fan_out = module_shape(mod)
        a = torch.randn(r, fan_in, generator=gen) * std
        b = torch.randn(fan_out, r, generator=gen) * std
        factors[name] = (a.to(dtype), b.to(dtype))
    cfg = MatryoshkaConfig(method, r, train_ranks, scaling, alpha, extra={"base_model": f"tiny-{arch}"})
    if task_type is None:
        task_type = "SEQ_CLS" if arch == "bert" else "CAUSAL_LM"
    save_nested(path, factors, cfg, fan_in_fan_out=(arch == "gpt2"), task_type=task_type)
    return NestedAdapter.load(path)


def add_deltas(model: torch.nn.Module, deltas: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A copy of ``model`` with ``W += delta`` (``[out, in]``, float32) for each named module, rounded once.

    ``Conv1D`` weights are stored ``[in, out]``: their delta is transposed.
    """
    from transformers.pytorch_utils import Conv1D

    out = copy.deepcopy(model)
    mods = dict(out.named_modules())
    for name, delta in deltas.items():
        mod = mods[name]
        if isinstance(mod, Conv1D):
            delta = delta.T
        with torch.no_grad():
            mod.weight.copy_((mod.weight.float() + delta).to(mod.weight.dtype))
    return out


def apply_delta_by_hand(model: torch.nn.Module, adapter: NestedAdapter, k: int) -> torch.nn.Module:
    """A copy of ``model`` with ``W += s(k)·B[:, :k]·A[:k, :]`` (docs/design.md §1), computed from the raw tensors.

    Deliberately independent of the library's readers: reads the safetensors file whole.
    """
    from safetensors.torch import load_file

    tensors = load_file(str(adapter.weights_path))
    s = adapter.config.scale(k)
    deltas = {}
    for name in adapter.modules:
        a = tensors[f"base_model.model.{name}.lora_A.weight"][:k].float()
        b = tensors[f"base_model.model.{name}.lora_B.weight"][:, :k].float()
        deltas[name] = s * (b @ a)
    return add_deltas(model, deltas)


def randomise_lora_b(nested: Any, seed: int = 3, std: float = 0.2) -> None:
    """PEFT initialises ``lora_B`` to zero; give it random normal values so the adapter changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, mod in nested.model.named_modules():
            if name.endswith("lora_B.default"):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) * std)


def sample_ids(batch: int = 2, seq: int = 7, vocab: int = 96, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, seq), generator=gen)


def poison_weights(path: Path, values: dict[str, float]) -> None:
    """Set the middle element of each tensor named in ``values`` (a NaN, an infinity) in the
    safetensors file ``path``, keeping the file's tensor order."""
    from safetensors.torch import load_file

    from mlora_export.io.safetensors import dtype_name, read_header, write_safetensors

    order = list(read_header(path).tensors)
    tensors = {k: t.clone() for k, t in load_file(str(path)).items()}  # not views of the file being rewritten
    for key, value in values.items():
        tensors[key].view(-1)[tensors[key].numel() // 2] = value
    specs = [(k, dtype_name(tensors[k].dtype), tuple(tensors[k].shape)) for k in order]
    write_safetensors(path, specs, [tensors[k] for k in order], {"format": "pt"})


# -- multi-process training runs (tests/test_ddp.py, tests/test_sharded.py) -----------------------

#: The words of the sort task the multi-process runs train on (each sorted is the completion).
SORT_WORDS = ("cab", "fed", "hgi", "lkj", "onm", "rqp", "uts", "xwv", "bca", "edf", "gih", "jlk", "mon", "pqr", "tsu", "wxv")


def write_sort_task(root: Path) -> dict[str, Path]:
    """A tiny Llama base (``root/base``) and 128 sort-task records (``root/train.jsonl``), the input
    of every multi-process training test; returns ``{"root", "base", "data"}``."""
    import json

    from mlora_export.demo.tiny import build_tiny_model

    build_tiny_model(root / "base", seed=0, hidden_size=32, intermediate_size=48)
    rows = [{"prompt": f"sort {w} =", "completion": " " + "".join(sorted(w))} for w in SORT_WORDS] * 8
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return {"root": root, "base": root / "base", "data": root / "train.jsonl"}


def launch_env() -> dict[str, str]:
    """The environment of a launched training run: one thread per process, debug tracebacks, and
    none of the launcher variables of an enclosing run (the launcher sets its own)."""
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "MLORA_DEBUG": "1"}
    # the launched processes import this checkout's package, as the test process does (not another install)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root, *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    for key in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def sort_train_args(s: dict[str, Path], out: Path, batch: int, method: str) -> list[str]:
    """``mlora-export train`` on the sort task: 6 steps of ``batch`` × 2 micro-batches per process.

    The runs compared must train alike on any number of processes: for dylora the sampled rank
    must agree across processes; for nested-loss each example's rank must be that of its position
    in the global batch, whichever process runs it; or the runs diverge."""
    return [
        "train", "--base-model", str(s["base"]), "--data", str(s["data"]), "--ranks", "1,2,4,8", "--method", method,
        "--output", str(out), "--max-steps", "6", "--batch-size", str(batch), "--grad-accum", "2", "--lr", "0.02",
        "--seed", "3", "--json",
    ]
