"""``train`` and ``eval`` on conversational data through the CLI: a tiny model with a chat template
(fast), bad data refused the same way by both commands (exit 2, one line, nothing written: issue 23's
lone surrogates, duplicate keys and mixed files), and a few steps on the real SmolLM2-135M-Instruct
with its own chat template (slow)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlora_export.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n"
                 "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
WORDS = ["cab", "fed", "hgi", "lkj", "onm", "rqp", "uts", "xwv"]


def _chat(w: str, turns: int = 1) -> dict:
    msgs = [{"role": "system", "content": "sort the letters"}]
    for v in [w] * turns:
        msgs += [{"role": "user", "content": v}, {"role": "assistant", "content": "".join(sorted(v))}]
    return {"messages": msgs}


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Llama with a character tokenizer, with and without a chat template."""
    from mlora_export.demo.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("chat-cli")
    build_tiny_model(root / "plain", seed=0, hidden_size=32, intermediate_size=48)
    build_tiny_model(root / "chat", seed=0, hidden_size=32, intermediate_size=48)
    (root / "chat" / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    (root / "template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    return {"plain": root / "plain", "chat": root / "chat", "template": root / "template.jinja"}


def run(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def refused(res, *fragments: str) -> str:
    err = res.stderr.strip()
    assert res.exit_code == 2, res.output
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for f in fragments:
        assert f in err, err
    return err


def test_train_and_eval_a_conversational_file(bases: dict[str, Path], tmp_path: Path) -> None:
    from mlora_export.adapter import NestedAdapter

    data = _write(tmp_path / "chat.jsonl", [_chat(w, turns=1 + i % 2) for i, w in enumerate(WORDS)])
    out = tmp_path / "nested"
    res = run("train", "--base-model", bases["chat"], "--data", data, "--ranks", "1,2", "--output", out, "--max-steps", "2",
              "--batch-size", "4", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads((out / "matryoshka_config.json").read_text())["training"]["data_kind"] == "messages"
    assert NestedAdapter.load(out).max_rank == 2
    res = run("eval", out, "--base-model", bases["chat"], "--data", data, "--metric", "exact-match", "--max-new-tokens", "4",
              "--output", tmp_path / "eval", "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["data"]["kind"] == "messages" and info["data"]["examples"] == len(WORDS)
    assert [p["rank"] for p in info["adapters"][0]["ranks"]] == [1, 2]


def test_no_chat_template_names_the_flag_and_the_flag_supplies_one(bases: dict[str, Path], tmp_path: Path) -> None:
    data = _write(tmp_path / "chat.jsonl", [_chat(w) for w in WORDS[:4]])
    out = tmp_path / "nested"
    refused(run("train", "--base-model", bases["plain"], "--data", data, "--ranks", "1", "--output", out, "--max-steps", "1"),
            "has none", "(pass --chat-template FILE)")
    assert not out.exists()
    res = run("train", "--base-model", bases["plain"], "--data", data, "--ranks", "1", "--output", out, "--max-steps", "1",
              "--chat-template", bases["template"])
    assert res.exit_code == 0, res.output
    refused(run("eval", out, "--base-model", bases["plain"], "--data", data, "--output", tmp_path / "e"), "(pass --chat-template FILE)")
    res = run("eval", out, "--base-model", bases["plain"], "--data", data, "--output", tmp_path / "e", "--chat-template", bases["template"])
    assert res.exit_code == 0, res.output
    refused(run("train", "--base-model", bases["plain"], "--data", data, "--ranks", "1", "--output", tmp_path / "n2",
                "--chat-template", tmp_path / "none.jinja"), "none.jinja' does not exist")


@pytest.mark.parametrize(
    "lines, fragment",
    [
        (['{"text": "a\\ud800b"}'], "line 1: text holds a lone surrogate"),
        (['{"prompt": "x", "completion": "y\\udfff"}'], "line 1: completion holds a lone surrogate"),
        (['{"text": "ok"}', '{"text": "a", "text": "b"}'], "line 2: the key 'text' appears twice"),
        (['{"text": "ok"}', '{"prompt": "x", "completion": "y"}'], "line 2: a prompt-completion record, but"),
        (['{"prompt": "x", "completion": "y"}', json.dumps(_chat("abc"))], "line 2: a messages record, but"),
        ([json.dumps({"messages": [{"role": "user", "content": "x"}]})], "line 1: the conversation has no assistant turn"),
        ([json.dumps({"messages": [{"role": "human", "content": "x"}, {"role": "assistant", "content": "y"}]})], "unknown role 'human'"),
        ([json.dumps({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]})], '"content" must be a string'),
    ],
)
def test_bad_data_is_refused_alike_by_train_and_eval(bases: dict[str, Path], tmp_path: Path, lines: list[str], fragment: str) -> None:
    """Issue 23: a lone surrogate gave TypeError (exit 1) in both; a duplicate key and a mixed file
    passed train; now one rule, one line, exit 2, nothing written."""
    from tests.common import random_nested

    from mlora_export.base import load_base_model

    data = _write(tmp_path / "bad.jsonl", lines)
    adapter = tmp_path / "adapter"
    random_nested(load_base_model(bases["chat"]), adapter, arch="llama", r=2, train_ranks=(1, 2), std=0.1, seed=0)
    for args, out in ((["train", "--base-model", bases["chat"], "--data", data, "--ranks", "1,2", "--max-steps", "1"], tmp_path / "t"),
                      (["eval", adapter, "--base-model", bases["chat"], "--data", data], tmp_path / "e")):
        refused(run(*args, "--output", out), str(data), fragment)
        assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}")]


def test_eval_scores_exactly_the_tokens_training_learns(bases: dict[str, Path], tmp_path: Path) -> None:
    """Conversational eval: the scored positions are the learned labels of training, and the loss is
    the mean cross-entropy over them (training's held-out loss); generation starts from the
    template's generation prompt and stops at the end-of-turn token."""
    from mlora_export.base import load_base_model, load_tokenizer
    from mlora_export.data import IGNORE_INDEX, read_records, tokenize_records
    from mlora_export.evaluation import load_eval_data, score_model
    from mlora_export.evaluation.scoring import stop_token_ids
    from mlora_export.training.pipeline import heldout_loss

    data = _write(tmp_path / "chat.jsonl", [_chat(w, turns=2) for w in WORDS[:4]])
    tok = load_tokenizer(bases["chat"])
    model = load_base_model(bases["chat"])
    features = tokenize_records(read_records(data), tok, 10**6)
    ev = load_eval_data(data, tok)
    for f, e in zip(features, ev.examples):
        assert list(e.input_ids) == f["input_ids"]
        assert list(e.scored) == [i > 0 and label != IGNORE_INDEX for i, label in enumerate(f["labels"])]
        n = len(e.prompt_ids)  # the generation prompt of the last turn is the conversation's tokens before it
        assert e.input_ids[:n] == e.prompt_ids and tok.decode(list(e.input_ids[n:])).startswith(e.completion + tok.eos_token)
    assert math.isclose(score_model(model, tok, ev).loss, heldout_loss(model, features, tok.pad_token_id), rel_tol=1e-5)
    assert ev.stop_ids == (tok.eos_token_id,) and stop_token_ids(model, tok, ev) == [tok.eos_token_id]


@pytest.mark.slow
def test_smollm2_trains_and_evaluates_on_chat_data(smollm2_dir: Path, tmp_path: Path) -> None:
    """The real chat model with its own template: a few steps of `train` on a conversational file,
    then `eval` at two ranks with exact match (generation stops at <|im_end|>)."""
    rows = [{"messages": [{"role": "user", "content": f"Say the word {w} in capitals."}, {"role": "assistant", "content": w.upper()}]}
            for w in ("apple", "river", "stone", "cloud", "green", "light", "sound", "water")]
    data = _write(tmp_path / "chat.jsonl", rows)
    out = tmp_path / "nested"
    res = run("train", "--base-model", smollm2_dir, "--data", data, "--ranks", "1,2", "--output", out, "--max-steps", "2",
              "--batch-size", "4", "--max-length", "48", "--target-modules", "q_proj,v_proj", "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["steps"] == 2 and math.isfinite(info["final_loss"])
    res = run("eval", out, "--base-model", smollm2_dir, "--data", data, "--ranks", "1,2", "--metric", "exact-match", "--max-examples", "4",
              "--max-new-tokens", "8", "--output", tmp_path / "eval", "--json")
    assert res.exit_code == 0, res.output
    ev = json.loads(res.stdout)
    assert ev["data"]["kind"] == "messages" and [p["rank"] for p in ev["adapters"][0]["ranks"]] == [1, 2]
    assert all(0.0 <= p["exact_match"] <= 1.0 and math.isfinite(p["loss"]) for p in ev["adapters"][0]["ranks"])


@pytest.mark.slow
def test_smollm2_generation_stops_at_its_end_of_turn(smollm2_dir: Path) -> None:
    from mlora_export.base import load_base_model, load_tokenizer
    from mlora_export.evaluation import greedy_completions, load_eval_data
    from mlora_export.evaluation.scoring import stop_token_ids

    tok = load_tokenizer(smollm2_dir)
    model = load_base_model(smollm2_dir, "float32")
    from mlora_export.data import Records, parse_record

    ex = parse_record({"messages": [{"role": "user", "content": "What is the capital of France? One word."},
                                    {"role": "assistant", "content": "Paris"}]}, "rec").located("rec", 1)
    data = load_eval_data(Records((ex,), ex.kind, "rec", "rec", "0" * 64), tok)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end in data.stop_ids and im_end in stop_token_ids(model, tok, data)
    assert tok.decode(list(data.examples[0].prompt_ids)).endswith("<|im_start|>assistant\n")
    (answer,) = greedy_completions(model, tok, data, max_new_tokens=24)
    assert "Paris" in answer and "<|im_start|>" not in answer and "user" not in answer
