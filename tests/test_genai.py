"""ONNX Runtime GenAI export (KV cache, ``genai_config.json``): greedy tokens from the real
``onnxruntime_genai`` equal transformers + the PEFT slice (baked, from ``converters.slice``) at
several ranks, for pico Llama and Qwen2 models, with ``lora_rank`` set per request and with
``og.Adapters`` / ``set_active_adapter`` per rank; bad inputs.

Each (arch, kind) is exported once per module. The models carry a small byte-level BPE
``tokenizer.json`` (GenAI loads the tokenizer files of the folder; a WordLevel one is rejected).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mlora_export.cli.main import main
from mlora_export.converters.onnx import OnnxExportOptions, export_genai
from tests.common import random_nested

og = pytest.importorskip("onnxruntime_genai")

ARCHS = ("llama", "qwen2")
SCALING = {"llama": "sqrt", "qwen2": "rank"}
R = 8
TRAIN_RANKS = (1, 2, 4, 8)
VOCAB = 320  # 256 byte symbols, 3 specials, some merges
PROMPT = [1, 72, 101, 108, 108, 111, 44, 32, 119]
NEW_TOKENS = 12


def byte_bpe_tokenizer() -> Any:
    from mlora_export.demo.bpe_tokenizer import build_byte_bpe_tokenizer

    return build_byte_bpe_tokenizer(VOCAB)


def decoder_config(arch: str) -> Any:
    import transformers as tf

    common: dict[str, Any] = {
        "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 64, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
        "tie_word_embeddings": False,
    }
    if arch == "llama":
        return tf.LlamaConfig(**common)
    return tf.Qwen2Config(**common, use_sliding_window=False)


def build_decoder(arch: str) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    cls = {"llama": tf.LlamaForCausalLM, "qwen2": tf.Qwen2ForCausalLM}[arch]
    model = cls(decoder_config(arch)).eval()
    with torch.no_grad():  # unit-scale logits, so that greedy decoding has clear winners
        model.lm_head.weight.normal_(0.0, 32**-0.5)
    return model


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("genai")


@pytest.fixture(scope="module")
def models(workdir: Path) -> dict[str, dict[str, Path]]:
    """Per arch: ``base`` (model + byte-level BPE tokenizer), ``nested`` adapter, baked PEFT ``slices``."""
    from mlora_export.converters.slice import slice_adapter

    out = {}
    tokenizer = byte_bpe_tokenizer()
    for arch in ARCHS:
        model = build_decoder(arch)
        base = workdir / f"base-{arch}"
        model.save_pretrained(base)
        tokenizer.save_pretrained(base)
        nested = workdir / f"nested-{arch}"
        random_nested(model, nested, arch="llama", r=R, train_ranks=TRAIN_RANKS, scaling=SCALING[arch], std=0.2)
        slices = workdir / f"slices-{arch}"
        slice_adapter(nested, TRAIN_RANKS, slices)
        out[arch] = {"base": base, "nested": nested, "slices": slices}
    return out


@pytest.fixture(scope="module")
def exports(workdir: Path, models) -> Callable[[str, str], Path]:
    """``get(arch, kind)`` → GenAI export folder (``genai`` or ``genai-adapters``), exported once (verified)."""
    cache: dict[tuple[str, str], Path] = {}

    def get(arch: str, kind: str) -> Path:
        if (arch, kind) not in cache:
            out = workdir / f"{arch}-{kind}"
            res = export_genai(models[arch]["nested"], models[arch]["base"], out, OnnxExportOptions(adapters_per_rank=(kind == "genai-adapters")))
            assert res.kind == kind and res.checks and all(c.ok for c in res.checks)
            assert [c.rank for c in res.checks] == [0, *TRAIN_RANKS]
            cache[(arch, kind)] = out
        return cache[(arch, kind)]

    return get


def until_eos(tokens: list[int], eos: int = 2) -> list[int]:
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def reference_tokens(models, arch: str, k: int) -> list[int]:
    """Greedy tokens of transformers (float32) with the baked PEFT slice at rank ``k`` (``k = 0``: the base)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(models[arch]["base"], dtype=torch.float32).eval()
    if k:
        model = PeftModel.from_pretrained(model, models[arch]["slices"] / f"r{k}").eval()
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    return until_eos(out[0].tolist())


@pytest.fixture(scope="module")
def refs(models) -> Callable[[str, int], list[int]]:
    cache: dict[tuple[str, int], list[int]] = {}

    def get(arch: str, k: int) -> list[int]:
        if (arch, k) not in cache:
            cache[(arch, k)] = reference_tokens(models, arch, k)
        return cache[(arch, k)]

    return get


def generator(model: Any, rank: np.ndarray | None = None, adapters: Any = None, name: str | None = None) -> Any:
    """A greedy request on ``model``. GenAI's ``set_model_input`` does not copy: ``rank`` must outlive the generator."""
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(PROMPT) + NEW_TOKENS, do_sample=False)
    gen = og.Generator(model, params)
    if rank is not None:
        gen.set_model_input("lora_rank", rank)
    if adapters is not None:
        gen.set_active_adapter(adapters, name)
    gen.append_tokens(np.array([PROMPT], dtype=np.int32))
    return gen


def finish(gen: Any) -> list[int]:
    while not gen.is_done():
        gen.generate_next_token()
    return until_eos([int(t) for t in gen.get_sequence(0)])


@pytest.mark.parametrize("arch", ARCHS)
def test_genai_lora_rank_per_request(arch: str, exports, refs) -> None:
    """``set_model_input("lora_rank", k)`` per generator: GenAI's greedy tokens equal PEFT's at every
    train rank and the base at 0; two requests at other ranks interleaved on one model stay apart."""
    model = og.Model(str(exports(arch, "genai")))
    rank = {k: np.array(k, dtype=np.int64) for k in (0, *TRAIN_RANKS)}  # alive as long as the generators
    seen = set()
    for k in (0, *TRAIN_RANKS):
        got = finish(generator(model, rank=rank[k]))
        assert got == refs(arch, k), (arch, k)
        seen.add(tuple(got))
    assert len(seen) > 2  # the ranks generate differently
    a, b = generator(model, rank=rank[1]), generator(model, rank=rank[R])
    while not (a.is_done() and b.is_done()):
        for g in (a, b):
            if not g.is_done():
                g.generate_next_token()
    assert until_eos([int(t) for t in a.get_sequence(0)]) == refs(arch, 1)
    assert until_eos([int(t) for t in b.get_sequence(0)]) == refs(arch, R)
    with pytest.raises(Exception, match="lora_rank"):  # a required input: no silent default
        generator(model)


@pytest.mark.parametrize("arch", ARCHS)
def test_genai_adapters_per_rank(arch: str, exports, refs) -> None:
    """``og.Adapters`` + ``set_active_adapter`` select a rank per request; no active adapter = the base."""
    folder = exports(arch, "genai-adapters")
    model = og.Model(str(folder))
    adapters = og.Adapters(model)
    for k in TRAIN_RANKS:
        adapters.load(str(folder / "adapters" / f"r{k}.onnx_adapter"), f"r{k}")
    for k in TRAIN_RANKS:
        assert finish(generator(model, adapters=adapters, name=f"r{k}")) == refs(arch, k), (arch, k)
    assert finish(generator(model)) == refs(arch, 0)
    info = json.loads((folder / "export_info.json").read_text())
    assert info["kind"] == "genai-adapters" and info["adapter_files"] == {str(k): f"adapters/r{k}.onnx_adapter" for k in TRAIN_RANKS}


def test_genai_folder_layout(exports, models) -> None:
    """The graph's inputs and outputs are GenAI's names and dimensions; the config matches the model;
    GenAI's tokenizer reads the copied byte-level BPE files as transformers does."""
    import onnxruntime
    from transformers import AutoTokenizer

    folder = exports("qwen2", "genai")
    sess = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    ins = {i.name: i.shape for i in sess.get_inputs()}
    outs = {o.name: o.shape for o in sess.get_outputs()}
    assert list(ins)[:3] == ["input_ids", "attention_mask", "position_ids"] and list(ins)[-1] == "lora_rank"
    assert ins["attention_mask"] == ["batch_size", "total_sequence_length"]
    assert ins["past_key_values.1.value"] == ["batch_size", 2, "past_sequence_length", 8]
    assert outs["present.0.key"] == ["batch_size", 2, "total_sequence_length", 8]
    assert outs["logits"] == ["batch_size", "sequence_length", VOCAB]
    cfg = json.loads((folder / "genai_config.json").read_text())
    dec = cfg["model"]["decoder"]
    assert cfg["model"]["type"] == "qwen2" and (dec["num_hidden_layers"], dec["num_key_value_heads"], dec["head_size"]) == (2, 2, 8)
    assert cfg["search"]["past_present_share_buffer"] is False
    tok = og.Tokenizer(og.Model(str(folder)))
    hf = AutoTokenizer.from_pretrained(models["qwen2"]["base"])
    text = "hello world, the lazy fox"
    ids = list(tok.encode(text))
    assert ids == hf(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(np.array(ids, dtype=np.int32)) == text


# -- the command line ----------------------------------------------------------------------


def test_cli_genai_json(tmp_path: Path, models) -> None:
    """``mlora-export onnx --genai --no-verify --json`` writes a folder GenAI loads."""
    out = tmp_path / "cli-genai"
    args = ["onnx", str(models["llama"]["nested"]), "--base-model", str(models["llama"]["base"]), "--output", str(out), "--genai", "--no-verify", "--json"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["kind"] == "genai" and data["genai_config"] == "genai_config.json" and "lora_rank" in data["inputs"]
    assert data["outputs"][:3] == ["logits", "present.0.key", "present.0.value"]
    assert {"export_info.json", "genai_config.json", "model.onnx", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    assert og.Model(str(out)) is not None


@pytest.mark.parametrize("case", ["with-rank", "with-merged", "gpt2-base"])
def test_cli_genai_bad_input(case: str, tmp_path: Path, models, base_dirs) -> None:
    """Exit code 2, one line naming the problem, nothing written."""
    out = tmp_path / "out"
    nested, base, extra = models["llama"]["nested"], models["llama"]["base"], []
    if case == "with-rank":
        extra, expect = ["--rank", "2"], "--genai"
    elif case == "with-merged":
        extra, expect = ["--rank", "2", "--merged"], "--genai"
    else:
        from tests.common import build_model

        nested = tmp_path / "nested-gpt2"
        random_nested(build_model("gpt2"), nested, arch="gpt2", r=4, train_ranks=(2, 4))
        base, expect = base_dirs["gpt2"], "supports llama, qwen2"
    res = CliRunner().invoke(main, ["onnx", str(nested), "--base-model", str(base), "--output", str(out), "--genai", *extra])
    assert res.exit_code == 2, res.output
    assert expect in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not out.exists()
