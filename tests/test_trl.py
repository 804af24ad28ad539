"""TRL's ``SFTTrainer`` with the nested method (the recipe of docs/train.md): on conversational data
it trains the nested adapter ``mlora-export train`` writes for the same data, seed and steps.

The base is a pico Llama with SmolLM2-135M-Instruct's real tokenizer and chat template (so the
tokens are those of a real chat model, and a step takes milliseconds). What is made equal, and why
the rest already is (read from TRL 1.16's ``sft_trainer.py`` and ``transformers.Trainer``):

- tokens and labels: TRL's preprocessing and our reader give the same ``input_ids`` and ``labels``
  (tests/test_chat_data.py); no example is truncated or dropped, so both datasets have the same length;
- data order: both are a ``transformers.Trainer`` sampling with ``seed`` (TRL's ``shuffle_dataset``
  is off; ``data_seed`` unset falls back to ``seed``, which is what we set);
- optimiser, scheduler, clipping: ``TrainingArguments`` defaults on both sides (AdamW, linear decay,
  no warmup, no weight decay, norm 1.0) with the same learning rate;
- SFTConfig's own defaults that differ from ``TrainingArguments``: ``bf16=True`` and
  ``gradient_checkpointing=True``, turned off (``bf16`` would autocast; checkpointing changes
  nothing but time) — the recipe's ``SFTConfig`` sets them to what ``mlora-export train`` runs;
- loss: TRL's fused LM head sums the supervised tokens' log-probabilities in tiles and divides by
  ``num_items_in_batch``; the model's own loss does the same in one piece: equal to float rounding;
- the adapter: ``add_nested_adapter(seed=…)`` initialises ``A`` from the seed alone, and the
  ``nested-loss`` ranks depend on seed, step and position only.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from mlora_export.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")
trl = pytest.importorskip("trl")

PC_ROWS = [
    {"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}], "completion": [{"role": "assistant", "content": f"{a + b}{'!' * (a % 3)}"}]}
    for a, b in ((3, 4), (12, 30), (7, 7), (21, 1), (9, 40), (2, 2), (15, 16), (8, 13), (31, 5), (6, 19), (11, 11), (4, 27))
]
CHAT_ROWS = [
    {"messages": [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": f"Colour of {thing}?"},
                  {"role": "assistant", "content": colour}, {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes."}]}
    for thing, colour in (("grass", "Green."), ("sky", "Blue."), ("snow", "White."), ("coal", "Black."), ("blood", "Red."),
                          ("sun", "Yellow."), ("night", "Dark."), ("milk", "White."))
]
#: SmolLM2's template with generation markers around each assistant turn (TRL's assistant_only_loss needs them).
_TURN = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
_MARKED = ("{% if message['role'] == 'assistant' %}{{'<|im_start|>assistant\n'}}{% generation %}"
           "{{message['content'] + '<|im_end|>\n'}}{% endgeneration %}{% else %}" + _TURN + "{% endif %}")


@pytest.fixture(scope="module")
def base(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pico Llama (random weights) with SmolLM2-135M-Instruct's tokenizer and chat template."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    folder = tmp_path_factory.mktemp("trl") / "base"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _sft_recipe(base: Path, rows: list[dict], out: Path, *, steps: int, seed: int, template: str | None = None, **sft: object) -> list[float]:
    """The recipe of docs/train.md: a nested adapter on the model, TRL's SFTTrainer with the nested callback, save."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from mlora_export.adapter import MatryoshkaConfig
    from mlora_export.training import NestedRankCallback, add_nested_adapter

    tokenizer = AutoTokenizer.from_pretrained(base)
    if template is not None:
        tokenizer.chat_template = template
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    nested = add_nested_adapter(model, MatryoshkaConfig("nested-loss", 8, (1, 2, 4, 8), "sqrt"), target_modules="all-linear", seed=seed)
    args = SFTConfig(
        output_dir=str(out.parent / f"{out.name}-trl"), max_steps=steps, per_device_train_batch_size=4, learning_rate=0.01, seed=seed,
        max_length=256, bf16=False, gradient_checkpointing=False, report_to=[], save_strategy="no", logging_steps=1,
        disable_tqdm=True, use_cpu=True, dataloader_pin_memory=False, **sft,
    )
    trainer = SFTTrainer(model=nested.model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         callbacks=[NestedRankCallback(nested)])
    trainer.train()
    nested.save(out)
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _ours(base: Path, rows: list[dict], out: Path, *, steps: int, seed: int, extra: tuple[str, ...] = ()) -> dict:
    data = out.parent / f"{out.name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    res = CliRunner().invoke(main, ["train", "--base-model", str(base), "--data", str(data), "--ranks", "1,2,4,8", "--output", str(out),
                                    "--max-steps", str(steps), "--batch-size", "4", "--lr", "0.01", "--seed", str(seed), "--max-length", "256",
                                    "--logging-steps", "1", "--json", *extra], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


@pytest.mark.parametrize("kind", ["prompt-completion", "messages"])
def test_sft_trainer_recipe_saves_the_adapter_mlora_export_train_writes(base: Path, tmp_path: Path, monkeypatch, kind: str) -> None:
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    if kind == "prompt-completion":  # TRL's conversational prompt-completion: completion-only loss by default
        rows, template, sft, extra = PC_ROWS, None, {}, ()
    else:  # multi-turn messages: loss on every assistant turn (TRL: assistant_only_loss, with generation markers)
        from transformers import AutoTokenizer

        template = AutoTokenizer.from_pretrained(base).chat_template.replace(_TURN, _MARKED)
        assert template.count("{% generation %}") == 1
        (tmp_path / "marked.jinja").write_text(template, encoding="utf-8")
        rows, sft, extra = CHAT_ROWS, {"assistant_only_loss": True}, ("--chat-template", str(tmp_path / "marked.jinja"))
    trl_losses = _sft_recipe(base, rows, tmp_path / "trl", steps=4, seed=3, template=template, **sft)
    info = _ours(base, rows, tmp_path / "ours", steps=4, seed=3, extra=extra)
    assert info["examples"] == len(rows) and info["steps"] == 4
    # the same losses step by step (the data order, tokens, labels and ranks agree) ...
    assert [loss for _, loss in info["losses"]] == pytest.approx(trl_losses, rel=1e-4)
    # ... and the same adapter, to float rounding
    a, b = load_file(str(tmp_path / "trl" / "adapter_model.safetensors")), load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=2e-6, msg=key)
    assert max(float(v.abs().max()) for k, v in b.items() if "lora_B" in k) > 1e-2  # it trained (lora_B starts at zero)
    cfg_a = json.loads((tmp_path / "trl" / "matryoshka_config.json").read_text())
    cfg_b = json.loads((tmp_path / "ours" / "matryoshka_config.json").read_text())
    assert {k: cfg_a[k] for k in ("method", "max_rank", "train_ranks", "scaling")} == {k: cfg_b[k] for k in ("method", "max_rank", "train_ranks", "scaling")}
    if kind != "prompt-completion":
        return
    # a different seed gives another adapter: the comparison above has teeth
    _ours(base, rows, tmp_path / "seed4", steps=4, seed=4, extra=extra)
    c = load_file(str(tmp_path / "seed4" / "adapter_model.safetensors"))
    assert max(float((b[k] - c[k]).abs().max()) for k in b) > 1e-3
