"""JSONL data: validation messages, completion-only labels, padding, the built-in tasks and base, the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlora_export.data import (
    IGNORE_INDEX,
    CompletionCollator,
    Example,
    ensure_pad_token,
    load_jsonl,
    tokenize_example,
    tokenize_examples,
)
from mlora_export.demo import builtin_dataset_path
from mlora_export.errors import DataError


@pytest.fixture(scope="module")
def tok():
    from mlora_export.demo.tiny import build_char_tokenizer

    return build_char_tokenizer()


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_load_jsonl_both_formats_skips_blank_lines(tmp_path: Path) -> None:
    p = _write(tmp_path / "d.jsonl", [json.dumps({"text": "abc"}), "", json.dumps({"text": "de", "id": 5})])
    assert load_jsonl(p) == [Example(text="abc", line=1), Example(text="de", line=3)]
    q = _write(tmp_path / "e.jsonl", ["", json.dumps({"prompt": "1+1=", "completion": "2", "id": 5})])
    assert load_jsonl(q) == [Example(prompt="1+1=", completion="2", line=2)]


@pytest.mark.parametrize(
    "line, fragment",
    [
        ("{not json", "line 2: not valid JSON"),
        ('["a list"]', "line 2: expected a JSON object"),
        ('{"prompt": "x"}', "line 2: has prompt but no 'completion'"),
        ('{"completion": "x"}', "line 2: has completion but no 'prompt'"),
        ('{"prompt": "x", "completion": 3}', "line 2: 'completion' must be a string"),
        ('{"prompt": "x", "completion": ""}', "line 2: 'completion' is empty"),
        ('{"text": 1}', "line 2: 'text' must be a string"),
        ('{"input": "x", "output": "y"}', "line 2: expected a \"text\" key, \"prompt\" and \"completion\" keys (strings, or lists of messages), "
                                         "or a \"messages\" list of {\"role\", \"content\"} objects, found keys 'input', 'output'"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path: Path, line: str, fragment: str) -> None:
    p = _write(tmp_path / "bad.jsonl", [json.dumps({"text": "ok"}), line])
    with pytest.raises(DataError) as e:
        load_jsonl(p)
    assert fragment in str(e.value) and str(p) in str(e.value)


def test_missing_empty_and_non_utf8_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="is not a file"):
        load_jsonl(tmp_path)
    (tmp_path / "empty.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="has no examples"):
        load_jsonl(tmp_path / "empty.jsonl")
    (tmp_path / "latin.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match="not UTF-8"):
        load_jsonl(tmp_path / "latin.jsonl")


def test_completion_labels_mask_the_prompt(tok) -> None:
    item = tokenize_example(Example(prompt="ab=", completion="ba"), tok, 64)
    ids, labels = item["input_ids"], item["labels"]
    assert ids == [tok.bos_token_id, *tok("ab=", add_special_tokens=False)["input_ids"], *tok("ba", add_special_tokens=False)["input_ids"], tok.eos_token_id]
    assert labels == [IGNORE_INDEX] * 4 + ids[4:]
    text = tokenize_example(Example(text="hi"), tok, 64)
    assert text["labels"] == text["input_ids"] and text["input_ids"][-1] == tok.eos_token_id


def test_truncation_drops_examples_without_completion_tokens(tok, caplog: pytest.LogCaptureFixture) -> None:
    exs = [Example(prompt="x" * 20, completion="y", line=1), Example(prompt="a", completion="b", line=2)]
    out = tokenize_examples(exs, tok, max_length=8)
    assert len(out) == 1 and "lines 1" in caplog.text
    caplog.clear()
    with pytest.raises(DataError, match="raise the max length") as e:
        tokenize_examples(exs[:1], tok, max_length=8)
    assert e.value.option == "max_length"  # the CLI turns it into its flag
    assert caplog.text == ""  # the error alone, not a warning before it


def test_text_gets_one_eos_even_when_the_tokenizer_adds_it() -> None:
    class AddsEos:
        eos_token_id = 2

        def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
            ids = [10 + ord(c) % 50 for c in text]
            return {"input_ids": [1, *ids, 2] if add_special_tokens else ids}

    item = tokenize_example(Example(text="hey"), AddsEos(), 64)
    assert item["input_ids"][-2:] != [2, 2] and item["input_ids"][-1] == 2 and item["labels"] == item["input_ids"]


def test_char_tokenizer_one_token_per_character_newlines_included(tok) -> None:
    text = "a\n\nb  c\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.unk_token_id not in ids
    assert tok.decode(ids) == text


def test_collator_pads_with_ignored_labels() -> None:
    batch = CompletionCollator(pad_token_id=0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_pad_token_falls_back_to_eos() -> None:
    from mlora_export.demo.tiny import build_char_tokenizer

    t = build_char_tokenizer()
    t.pad_token = None
    ensure_pad_token(t)
    assert t.pad_token == t.eos_token


def test_builtin_tasks_ship_and_validate(tok) -> None:
    """The demo's task (the rare '~' of the base's pre-training language: one fixed letter derangement) and the
    sort task (for models trained from scratch) ship, with held-out prompts never seen in training."""
    train, held = load_jsonl(builtin_dataset_path("train")), load_jsonl(builtin_dataset_path("eval"))
    val = load_jsonl(builtin_dataset_path("val"))
    assert len(train) == 4000 and len(held) == len(val) == 300
    prompts = [{e.prompt for e in split} for split in (train, val, held)]
    assert not prompts[0] & prompts[1] and not prompts[0] & prompts[2] and not prompts[1] & prompts[2]
    table: dict[str, str] = {}
    for e in train + val + held:
        word = e.prompt.removesuffix("~")
        assert e.prompt.endswith("~") and word.isalpha() and 4 <= len(word) <= 8 and len(e.completion) == len(word), e
        for a, b in zip(word, e.completion):
            assert table.setdefault(a, b) == b, (a, b)  # one mapping for every record
    assert len(table) == 52 and len(set(table.values())) == 52 and all(a != b for a, b in table.items())  # a derangement
    train, held = load_jsonl(builtin_dataset_path("train", "sort")), load_jsonl(builtin_dataset_path("eval", "sort"))
    assert len(train) >= 1000 and len(held) >= 100
    assert not {e.prompt for e in train} & {e.prompt for e in held}  # held out means held out
    ex = held[0]
    word = ex.prompt.removeprefix("sort ").removesuffix(" =")
    assert ex.completion == " " + "".join(sorted(word))
    with pytest.raises(DataError, match="no split"):
        builtin_dataset_path("nope")


def test_the_demo_base_ships_as_recorded() -> None:
    """The pre-trained base in the package loads with the Auto classes, is what its record says (sha256,
    parameters, shape), and its tokenizer is a byte-level BPE (the form llama.cpp and ONNX Runtime GenAI read)."""
    import hashlib

    from transformers import AutoConfig, AutoTokenizer

    from mlora_export.demo import pretrained_base_dir, pretrained_base_record

    path, record = pretrained_base_dir(), pretrained_base_record()
    assert hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest() == record["model_sha256"]
    cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    assert {k: getattr(cfg, k) for k in record["shape"]} == record["shape"]
    assert json.loads((path / "tokenizer.json").read_text())["model"]["type"] == "BPE"
    t = AutoTokenizer.from_pretrained(path, local_files_only=True)
    assert len(t) == cfg.vocab_size and t("ab~")["input_ids"] == [t.bos_token_id, *t.convert_tokens_to_ids(["a", "b", "~"])]
    assert 0.3 < record["base_exact_match"]["demo held-out split"] < 0.8  # the task is half known, not unknown or solved
    assert sum(f.stat().st_size for f in path.iterdir()) < 4 << 20  # a few MB in the package


def test_tiny_model_folder_loads_with_auto_classes(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mlora_export.demo.tiny import build_tiny_model

    state = torch.get_rng_state()
    info = build_tiny_model(tmp_path / "m", seed=1)
    assert torch.equal(torch.get_rng_state(), state)  # seeded without touching torch's global RNG
    again = build_tiny_model(tmp_path / "m2", seed=1)
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == (tmp_path / "m2" / "model.safetensors").read_bytes()
    assert again["params"] == info["params"]
    assert (tmp_path / "m" / "model.safetensors").is_file() and not list((tmp_path / "m").glob("*.bin"))
    t = AutoTokenizer.from_pretrained(tmp_path / "m", local_files_only=True)
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "m", local_files_only=True)
    assert len(t) == info["vocab_size"] == m.config.vocab_size
    assert t.decode(t("sort cab =")["input_ids"], skip_special_tokens=True) == "sort cab ="


def test_json_error_names_the_column_in_the_line(tmp_path) -> None:
    """A record cut short reports the column where it ends, not column 1 of the next line."""
    from mlora_export.data import load_jsonl
    from mlora_export.errors import DataError

    p = tmp_path / "bad.jsonl"
    line = '{"prompt": "sort cab =", "completion": '
    p.write_text('{"prompt": "a", "completion": "b"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"line 2: not valid JSON \(Expecting value at column {len(line) + 1}\)"):
        load_jsonl(p)
