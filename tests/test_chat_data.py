"""Conversational data: record kinds and their validation, the chat template's rendering and the
assistant mask on SmolLM2-135M-Instruct's real tokenizer and template, and the same tokens as TRL's
own preprocessing (``SFTTrainer``) for the same records.

The mask is checked three ways: SmolLM2's own template (no generation markers: prefix rendering),
the same template with ``{% generation %}`` markers (transformers' ``return_assistant_tokens_mask``;
the two must agree), and a Qwen3-style template that drops the reasoning of earlier assistant turns
(so a turn renders differently once the conversation goes on; the in-context rule must agree with
that template's own markers).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlora_export.data import (
    IGNORE_INDEX,
    DataSource,
    Example,
    load_jsonl,
    parse_columns,
    read_chat_template,
    read_records,
    render_with_spans,
    tokenize_conversation,
    tokenize_example,
    tokenize_records,
)
from mlora_export.errors import ConfigError, DataError

DATA = Path(__file__).parent / "data"

CHAT = [
    {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
                  {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
                  {"role": "assistant", "content": "Blue."}]},
]
CHAT_PC = [
    {"prompt": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}],
     "completion": [{"role": "assistant", "content": "4"}]},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
     "completion": [{"role": "assistant", "content": "Blue."}]},
]
#: SmolLM2's template with generation markers around each assistant turn's content and end-of-turn.
_SMOL_TURN = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
_SMOL_MARKED = ("{% if message['role'] == 'assistant' %}{{'<|im_start|>assistant\n'}}{% generation %}"
                "{{message['content'] + '<|im_end|>\n'}}{% endgeneration %}{% else %}" + _SMOL_TURN + "{% endif %}")


@pytest.fixture(scope="module")
def tok(smollm2_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def marked(tok) -> str:
    template = tok.chat_template.replace(_SMOL_TURN, _SMOL_MARKED)
    assert template != tok.chat_template and "{% generation %}" in template
    return template


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _ex(record: dict, where: str = "rec") -> Example:
    from mlora_export.data import parse_record

    return parse_record(record, where).located(where, 1)


# -- record kinds ------------------------------------------------------------------------------
def test_kinds_are_read_from_the_records(tmp_path: Path) -> None:
    kinds = {}
    for name, rows in {"text": [{"text": "abc"}], "pc": [{"prompt": "1+1=", "completion": "2"}], "chat": CHAT, "chat_pc": CHAT_PC,
                       "sharegpt": [{"conversations": [{"from": "user", "value": "hi"}, {"from": "assistant", "value": "yo"}]}]}.items():
        kinds[name] = read_records(_write(tmp_path / f"{name}.jsonl", rows)).kind
    assert kinds == {"text": "text", "pc": "prompt-completion", "chat": "messages", "chat_pc": "conversational-prompt-completion",
                     "sharegpt": "messages"}
    recs = read_records(tmp_path / "chat_pc.jsonl")
    assert recs.examples[0].prompt_turns == 3 and recs.examples[0].messages[3] == {"role": "assistant", "content": "4"}
    assert recs.name == "chat_pc.jsonl" and recs.examples[1].where.endswith("chat_pc.jsonl, line 2")


def test_message_keys_are_kept_and_nulls_dropped(tmp_path: Path) -> None:
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}}
    row = {"messages": [{"role": "user", "content": "2+2?", "name": None},
                        {"role": "assistant", "content": None, "tool_calls": [call]},
                        {"role": "tool", "name": "add", "content": "4"},
                        {"role": "assistant", "content": "4", "reasoning_content": "easy"}],
           "tools": json.dumps([{"type": "function", "function": {"name": "add"}}]), "chat_template_kwargs": {"enable_thinking": False}}
    ex = read_records(_write(tmp_path / "t.jsonl", [row])).examples[0]
    assert ex.messages[0] == {"role": "user", "content": "2+2?"}
    assert ex.messages[1] == {"role": "assistant", "tool_calls": [call]} and ex.messages[3]["reasoning_content"] == "easy"
    assert ex.tools == ({"type": "function", "function": {"name": "add"}},) and ex.template_kwargs == {"enable_thinking": False}


@pytest.mark.parametrize(
    "row, fragment",
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "has no assistant turn"),
        ({"messages": [{"role": "human", "content": "hi"}, {"role": "gpt", "content": "yo"}]}, "unknown role 'human'"),
        ({"messages": [{"role": "user", "content": ["hi"]}, {"role": "assistant", "content": "yo"}]}, '"content" must be a string, found a list'),
        ({"messages": [{"role": "user"}, {"role": "assistant", "content": "yo"}]}, 'has no "content"'),
        ({"messages": [{"content": "hi"}]}, 'has no "role"'),
        ({"messages": []}, "must be a non-empty list of messages"),
        ({"messages": "hi"}, "must be a non-empty list of messages, found a string"),
        ({"messages": [{"role": "assistant", "content": "yo"}, {"role": "user", "content": "hi"}]}, "opens with an assistant turn"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "text": "x"}, "keys of two record kinds"),
        ({"prompt": [{"role": "user", "content": "a"}], "completion": "b"}, "both as strings, or both as lists"),
        ({"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "user", "content": "b"}]}, "must open with the assistant turn"),
        ({"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "completion": [{"role": "assistant", "content": "c"}]},
         "the prompt ends with an assistant turn"),
        ({"text": "a\ud800b"}, "text holds a lone surrogate"),
        ({"messages": [{"role": "user", "content": "a\udc00"}, {"role": "assistant", "content": "b"}]}, "messages[0].content holds a lone surrogate"),
    ],
)
def test_malformed_records_name_the_line(tmp_path: Path, row: dict, fragment: str) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(CHAT[1] if "messages" in row or "prompt" in row else {"text": "ok"}) + "\n" + json.dumps(row) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        read_records(p)
    assert f"{p}, line 2" in str(e.value) and fragment in str(e.value)


def test_duplicate_keys_and_escaped_surrogates_are_refused(tmp_path: Path) -> None:
    p = tmp_path / "dup.jsonl"
    p.write_text('{"text": "a"}\n{"text": "b", "text": "c"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"line 2: the key 'text' appears twice"):
        load_jsonl(p)
    p.write_text('{"messages": [{"role": "user", "content": "a", "role": "assistant"}]}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"line 1: the key 'role' appears twice"):
        load_jsonl(p)
    p.write_text('{"text": "a\\ud800b"}\n', encoding="utf-8")  # the JSON escape of a lone surrogate
    with pytest.raises(DataError, match=r"line 1: text holds a lone surrogate"):
        load_jsonl(p)


@pytest.mark.parametrize("second", [{"prompt": "a", "completion": "b"}, CHAT[0], CHAT_PC[0]])
def test_a_file_mixing_kinds_is_refused(tmp_path: Path, second: dict) -> None:
    p = _write(tmp_path / "mixed.jsonl", [{"text": "abc"}, second])
    with pytest.raises(DataError, match=r"line 2: a .* record, but .*line 1 is a text record; a data file holds one kind"):
        read_records(p)


def test_json_array_parquet_and_column_mapping(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"question": "2+2?", "answer": "4", "id": 1}, {"question": "3+3?", "answer": "6", "id": 2}]
    (tmp_path / "qa.json").write_text(json.dumps(rows), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "qa.parquet")
    cols = parse_columns("question=prompt, answer=completion")
    assert cols == (("question", "prompt"), ("answer", "completion"))
    for name in ("qa.json", "qa.parquet"):
        recs = read_records(DataSource(str(tmp_path / name), columns=cols))
        assert [(e.prompt, e.completion) for e in recs] == [("2+2?", "4"), ("3+3?", "6")] and recs.kind == "prompt-completion"
    with pytest.raises(DataError, match=r"qa.json, item 1: expected a \"text\" key.*found keys 'question', 'answer', 'id'"):
        read_records(tmp_path / "qa.json")  # unmapped: no record keys at all
    with pytest.raises(DataError, match=r"qa.parquet, row 1: has no field 'q'"):
        read_records(DataSource(str(tmp_path / "qa.parquet"), columns=(("q", "prompt"),)))
    # a conversation column from a table: structs with null fields for the keys a message lacks
    pq.write_table(pa.Table.from_pylist([{"conv": CHAT[1]["messages"]}]), tmp_path / "chat.parquet")
    ex = read_records(DataSource(str(tmp_path / "chat.parquet"), columns=parse_columns("conv=messages"))).examples[0]
    assert ex.messages == tuple(CHAT[1]["messages"])
    for bad, frag in (("question", "not source=key"), ("q=answer", "'answer' is not a record key"), ("a=prompt,b=prompt", "twice")):
        with pytest.raises(ConfigError, match=frag):
            parse_columns(bad)
    with pytest.raises(ConfigError, match="applies to a Hub dataset id only"):
        read_records(DataSource(str(tmp_path / "qa.json"), split="test"))
    with pytest.raises(DataError, match="does not exist"):
        read_records(str(tmp_path / "missing" / "train.jsonl"))


# -- rendering and the assistant mask -----------------------------------------------------------
def _decoded_turns(tok, conv) -> list[str]:
    return [tok.decode(conv.input_ids[a:b]) for a, b in conv.turns]


def test_smollm2_template_prefix_mask_is_every_assistant_turn(tok) -> None:
    conv = tokenize_conversation(_ex(CHAT[0]), tok, tok.chat_template)
    assert conv.method == "prefix"
    assert _decoded_turns(tok, conv) == ["Hello! How can I help?<|im_end|>\n", "4<|im_end|>\n"]
    assert conv.input_ids == tok.apply_chat_template(CHAT[0]["messages"], tokenize=True, return_dict=True)["input_ids"]
    item = tokenize_example(_ex(CHAT[0]), tok, 10**6)
    learned = [t for t, label in zip(item["input_ids"], item["labels"]) if label != IGNORE_INDEX]
    assert tok.decode(learned) == "Hello! How can I help?<|im_end|>\n4<|im_end|>\n"
    assert tok.eos_token_id in learned  # the end-of-turn token is learned: the model learns to stop
    everything = tokenize_example(_ex(CHAT[0]), tok, 10**6, train_on_prompt=True)
    assert everything["labels"] == everything["input_ids"] == item["input_ids"]


def test_generation_markers_and_prefix_rendering_agree(tok, marked: str) -> None:
    for row in CHAT + CHAT_PC:
        by_prefix = tokenize_conversation(_ex(row), tok, tok.chat_template)
        by_markers = tokenize_conversation(_ex(row), tok, marked)
        assert by_markers.method == "markers" and by_prefix.method == "prefix"
        assert (by_prefix.input_ids, by_prefix.mask, by_prefix.turns) == (by_markers.input_ids, by_markers.mask, by_markers.turns)
    # conversational prompt-completion: only the completion's assistant turn, not the prompt's
    conv = tokenize_conversation(_ex(CHAT_PC[0]), tok, marked)
    assert _decoded_turns(tok, conv) == ["4<|im_end|>\n"]


def test_context_dependent_template_is_exact(tok) -> None:
    """A turn that renders differently once the conversation goes on (its <think> part dropped)."""
    think = read_chat_template(DATA / "think_template.jinja")
    think_marked = read_chat_template(DATA / "think_template_generation.jinja")
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>greet</think>Hello!"},
                        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>add</think>4"}]}
    chat = render_with_spans(tok, _ex(row), think)
    assert chat.method == "in-context"  # the prefix rule alone would take "<think>…" for the first turn
    assert [chat.text[a:b] for a, b in chat.spans] == ["Hello!<|im_end|>\n", "<think>\nadd\n</think>\n\n4<|im_end|>\n"]
    ours = tokenize_conversation(_ex(row), tok, think)
    theirs = tokenize_conversation(_ex(row), tok, think_marked)
    assert (ours.input_ids, ours.mask) == (theirs.input_ids, theirs.mask) and theirs.method == "markers"


@pytest.mark.parametrize(
    "turn, fragment",
    [
        # an earlier assistant turn says its content twice: no one place for it in the conversation
        ("{% if message['role'] == 'assistant' and not loop.last %}{{'<|im_start|>assistant\n' + message['content'] + ' / ' + "
         "message['content'] + '<|im_end|>\n'}}{% else %}" + _SMOL_TURN + "{% endif %}", "this turn differently once later turns follow"),
        # the generation prompt changes the conversation before the turn
        ("{{'<|im_start|>' + message['role'] + ('*' if add_generation_prompt else '') + '\n' + message['content'] + '<|im_end|>\n'}}",
         "the conversation before this turn differently with the generation prompt"),
    ],
)
def test_a_turn_that_cannot_be_placed_is_refused(tok, turn: str, fragment: str) -> None:
    template = tok.chat_template.replace(_SMOL_TURN, turn)
    assert template != tok.chat_template
    with pytest.raises(DataError, match=rf"rec: the chat template renders {fragment}.* \(assistant turn 1, message 2\).*generation") as e:
        tokenize_conversation(_ex(CHAT[0]), tok, template)
    assert e.value.option == "chat_template"


def test_no_chat_template_names_the_option(tok, tmp_path: Path) -> None:
    import copy

    bare = copy.deepcopy(tok)
    bare.chat_template = None
    recs = read_records(_write(tmp_path / "c.jsonl", CHAT))
    with pytest.raises(DataError, match="c.jsonl: conversational records are rendered with a chat template") as e:
        tokenize_records(recs, bare)
    assert e.value.option == "chat_template"
    # a Jinja file supplies one
    (tmp_path / "t.jsonl").write_text("")
    (tmp_path / "smol.jinja").write_text(tok.chat_template, encoding="utf-8")
    items = tokenize_records(recs, bare, chat_template=read_chat_template(tmp_path / "smol.jinja"))
    assert items == tokenize_records(recs, tok)
    for bad, frag in (("nope.jinja", "does not exist"), ("t.jsonl", "is empty")):
        with pytest.raises(DataError, match=frag):
            read_chat_template(tmp_path / bad)


def test_template_errors_name_the_record(tok, tmp_path: Path) -> None:
    strict = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system turns') }}{% endif %}{{ m['content'] }}{% endfor %}"
    recs = read_records(_write(tmp_path / "c.jsonl", CHAT))
    with pytest.raises(DataError, match=r"c.jsonl, line 2: the chat template cannot render this conversation \(no system turns\)"):
        tokenize_records(recs, tok, chat_template=strict)


def test_truncation_keeps_the_turns_within_max_length(tok) -> None:
    full = tokenize_example(_ex(CHAT[0]), tok, 10**6)
    cut = tokenize_example(_ex(CHAT[0]), tok, 40)
    assert cut == {"input_ids": full["input_ids"][:40], "labels": full["labels"][:40]}


# -- the same tokens as TRL ---------------------------------------------------------------------
def test_tokens_equal_trls_own_preprocessing(tok, marked: str, tmp_path: Path) -> None:
    """TRL 1.16's SFTTrainer tokenises the same records to the same input_ids and labels:
    ``messages`` with ``assistant_only_loss`` (TRL needs generation markers for it: SmolLM2's own
    template has none, ours uses it as it is), conversational prompt-completion with TRL's default
    completion-only loss, and ``messages`` without it (= ``train_on_prompt``)."""
    pytest.importorskip("trl")
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))

    def trl(rows: list[dict], template: str, **kw: object) -> list[dict[str, list[int]]]:
        t = AutoTokenizer.from_pretrained(tok.name_or_path)
        t.chat_template = template
        args = SFTConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False, max_length=None, disable_tqdm=True, **kw)
        out = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=t).train_dataset
        return [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in out]

    def ours(rows: list[dict], **kw: object) -> list[dict[str, list[int]]]:
        return [tokenize_example(_ex(r), tok, 10**6, **kw) for r in rows]

    assert trl(CHAT, marked, assistant_only_loss=True) == ours(CHAT)
    assert trl(CHAT_PC, tok.chat_template) == ours(CHAT_PC)
    assert trl(CHAT_PC, marked, assistant_only_loss=True) == ours(CHAT_PC)
    assert trl(CHAT, tok.chat_template) == ours(CHAT, train_on_prompt=True)
