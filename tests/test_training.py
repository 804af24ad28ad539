"""Training: the forward of each method against the math by hand, the Trainer and plain-loop paths,
the nested property after a short run, and the saved folder loading in real PEFT."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from mlora_export.adapter import MatryoshkaConfig, NestedAdapter
from mlora_export.method import matryoshka_diagonal, peft_alpha_for, scale
from mlora_export.training import (
    NestedRankCallback,
    add_nested_adapter,
    load_nested_adapter,
)
from tests.common import (
    add_deltas,
    build_model,
    randomise_lora_b,
    sample_ids,
    targets_for,
)

T = (1, 2, 4, 8)
R = 8


pytestmark = pytest.mark.usefixtures("one_torch_thread")



def _by_hand(base: torch.nn.Module, nested, diag: list[float]) -> torch.nn.Module:
    """A copy of ``base`` with ``W += B · diag(d) · A`` for every adapted module (Conv1D transposed)."""
    d = torch.diag(torch.tensor(diag, dtype=torch.float32))
    return add_deltas(base, {name: b.float() @ d @ a.float() for name, (a, b) in nested.factors().items()})


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("scaling", ["sqrt", "rank", "none"])
def test_matryoshka_forward_equals_b_diag_p_a(arch: str, scaling: str) -> None:
    base = build_model(arch)
    nested = add_nested_adapter(copy.deepcopy(base), MatryoshkaConfig("matryoshka", R, T, scaling, 1.5), target_modules=targets_for(arch))
    randomise_lora_b(nested)
    nested.model.eval()
    ids = sample_ids()
    p = matryoshka_diagonal(R, T, scaling, 1.5)
    ref = _by_hand(base, nested, p)
    torch.testing.assert_close(_logits(nested.model, ids), _logits(ref, ids), rtol=1e-4, atol=1e-4)
    # and it is not the base: the adapter matters
    assert (_logits(nested.model, ids) - _logits(base, ids)).abs().max() > 1e-2


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_matryoshka_forward_bfloat16(arch: str) -> None:
    """bfloat16 base and adapter: equal to the by-hand reference within bfloat16 rounding
    (the reference rounds W + ΔW to bfloat16 once; the adapter path rounds A·x, d·A·x and B·(…)).
    Observed max error ≈ 5e-3 on logits of magnitude ≈ 0.4; a wrong diagonal differs by ≈ 0.4."""
    base = build_model(arch, torch.bfloat16)
    nested = add_nested_adapter(copy.deepcopy(base), MatryoshkaConfig("matryoshka", R, T, "sqrt"), target_modules=targets_for(arch))
    randomise_lora_b(nested)
    nested.model.eval()
    ids = sample_ids()
    ref = _by_hand(base, nested, matryoshka_diagonal(R, T, "sqrt"))
    out, want = _logits(nested.model, ids), _logits(ref, ids)
    torch.testing.assert_close(out, want, rtol=1e-2, atol=1.5e-2)
    assert (out - _logits(base, ids)).abs().max() > 0.1


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("scaling", ["sqrt", "rank", "none"])
def test_lora_method_equals_plain_peft_lora(arch: str, scaling: str) -> None:
    """method 'lora' == stock PEFT LoRA with lora_alpha/use_rslora set for s(r), same seed → same init."""
    from peft import LoraConfig, get_peft_model

    base = build_model(arch)
    nested = add_nested_adapter(copy.deepcopy(base), MatryoshkaConfig("lora", R, (R,), scaling, 2.0), target_modules=targets_for(arch), seed=7)
    alpha, rslora = peft_alpha_for(R, scaling, 2.0)
    torch.manual_seed(7)
    plain = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=R, lora_alpha=alpha, use_rslora=rslora, target_modules=targets_for(arch), fan_in_fan_out=arch == "gpt2", lora_dropout=0.0),
    )
    ours = dict(nested.model.named_parameters())
    for name, param in plain.named_parameters():
        if "lora_A" in name:
            torch.testing.assert_close(ours[name], param, rtol=0, atol=0)  # same initialisation
    randomise_lora_b(nested)
    with torch.no_grad():
        for name, param in plain.named_parameters():
            if "lora_B" in name:
                param.copy_(ours[name])
    nested.model.eval()
    plain.eval()
    ids = sample_ids()
    torch.testing.assert_close(_logits(nested.model, ids), _logits(plain, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dylora_uses_the_sampled_prefix_and_its_scale(arch: str) -> None:
    base = build_model(arch)
    nested = add_nested_adapter(copy.deepcopy(base), MatryoshkaConfig("dylora", R, T, "sqrt"), target_modules=targets_for(arch), seed=5)
    randomise_lora_b(nested)
    nested.model.eval()
    ids = sample_ids()
    seen = set()
    for step in range(12):
        d = nested.train_diagonal(step)
        b = nested.sampled_rank
        assert b in T and b == nested.sample_rank(step)
        seen.add(b)
        assert d == [scale(b, "sqrt")] * b + [0.0] * (R - b)
        ref = _by_hand(base, nested, d)
        torch.testing.assert_close(_logits(nested.model, ids), _logits(ref, ids), rtol=1e-4, atol=1e-4)
    assert len(seen) > 1


def test_dylora_sampling_covers_train_ranks_and_is_the_same_on_every_process() -> None:
    cfg = MatryoshkaConfig("dylora", 32, (1, 2, 4, 8, 16, 32), "sqrt")
    a = add_nested_adapter(build_model("llama"), cfg, target_modules=["q_proj"], seed=11)
    b = add_nested_adapter(build_model("llama", seed=1), cfg, target_modules=["q_proj"], seed=11)  # "another process"
    ranks = [a.sample_rank(step) for step in range(400)]
    assert ranks == [b.sample_rank(step) for step in range(400)]
    counts = {t: ranks.count(t) for t in cfg.train_ranks}
    assert set(ranks) == set(cfg.train_ranks)
    assert min(counts.values()) > 400 / 6 * 0.5, counts  # roughly uniform
    c = add_nested_adapter(build_model("llama"), cfg, target_modules=["q_proj"], seed=12)
    assert [c.sample_rank(s) for s in range(400)] != ranks  # the seed matters


def test_set_rank_in_place_equals_delta_w_k() -> None:
    base = build_model("llama")
    nested = add_nested_adapter(copy.deepcopy(base), MatryoshkaConfig("matryoshka", R, T, "sqrt"), target_modules=targets_for("llama"))
    randomise_lora_b(nested)
    nested.model.eval()
    ids = sample_ids()
    for k in (0, 1, 3, 8):
        nested.set_rank(k)
        d = [scale(k, "sqrt")] * k + [0.0] * (R - k) if k else [0.0] * R
        torch.testing.assert_close(_logits(nested.model, ids), _logits(_by_hand(base, nested, d), ids), rtol=1e-4, atol=1e-4)


# -- training runs ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    """An untrained tiny Llama-style model + char tokenizer, and tokenised slices of the built-in sort task (learned from scratch)."""
    from mlora_export.base import load_tokenizer
    from mlora_export.data import load_dataset
    from mlora_export.demo import builtin_dataset_path
    from mlora_export.demo.tiny import build_tiny_model

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("tiny") / "base"
    build_tiny_model(path, seed=0)
    tok = load_tokenizer(path)
    train = load_dataset(builtin_dataset_path("train", "sort"), tok, 48)
    held = load_dataset(builtin_dataset_path("eval", "sort"), tok, 48)[:96]
    torch.set_num_threads(before)
    return {"path": path, "tokenizer": tok, "train": train, "eval": held}


def _rank_losses(nested, tiny) -> dict[int, float]:
    from mlora_export.training import heldout_loss

    out = {}
    for k in (0, *nested.config.train_ranks):
        nested.set_rank(k)
        out[k] = heldout_loss(nested.model, tiny["eval"], tiny["tokenizer"].pad_token_id)
    return out


def test_trainer_path_lowers_heldout_loss_at_every_train_rank(tiny, tmp_path) -> None:
    """Stock transformers.Trainer + NestedRankCallback (through finetune.train), matryoshka: every nested
    rank ends below the base model's held-out loss, and the saved folder loads in real PEFT."""
    from peft import PeftModel

    from mlora_export.base import load_base_model
    from mlora_export.demo import builtin_dataset_path
    from mlora_export.training import TrainSettings, heldout_loss, train

    s = TrainSettings(method="matryoshka", train_ranks=(1, 2, 4, 8), max_steps=40, lr=1e-2, batch_size=16, max_length=48, epochs=None, seed=0)
    res = train(tiny["path"], builtin_dataset_path("train", "sort"), tmp_path / "nested", s)
    assert res.steps == 40 and res.is_main_process and res.world_size == 1
    adapter = NestedAdapter.load(tmp_path / "nested")
    assert adapter.config.method == "matryoshka" and adapter.max_rank == 8 and adapter.config.train_ranks == (1, 2, 4, 8)
    assert adapter.config.extra["training"]["steps"] == 40
    # all-linear: every Linear of the blocks, not the output head
    assert {n.rsplit(".", 1)[-1] for n in adapter.modules} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    nested = load_nested_adapter(load_base_model(tiny["path"]), adapter)
    losses = _rank_losses(nested, tiny)
    for k in (1, 2, 4, 8):
        assert losses[k] < losses[0] - 0.05, losses
    # PEFT with none of our code: the folder is a rank-8 LoRA adapter at s(8)
    peft_model = PeftModel.from_pretrained(load_base_model(tiny["path"]), str(tmp_path / "nested"))
    assert math.isclose(heldout_loss(peft_model, tiny["eval"], tiny["tokenizer"].pad_token_id), losses[8], rel_tol=1e-5)


def test_plain_pytorch_loop_lowers_heldout_loss_at_every_train_rank(tiny, tmp_path) -> None:
    from mlora_export.base import load_base_model
    from mlora_export.data import CompletionCollator

    torch.manual_seed(0)
    nested = add_nested_adapter(load_base_model(tiny["path"]), MatryoshkaConfig("matryoshka", 8, (1, 2, 4, 8), "sqrt"), seed=0)
    before = _rank_losses(nested, tiny)
    collate = CompletionCollator(tiny["tokenizer"].pad_token_id)
    opt = torch.optim.AdamW([p for p in nested.model.parameters() if p.requires_grad], lr=1e-2)
    nested.model.train()
    for step in range(40):
        nested.train_diagonal(step)  # once per optimisation step
        batch = collate(tiny["train"][step * 16 : (step + 1) * 16])
        loss = nested.model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = _rank_losses(nested, tiny)
    assert before[0] == pytest.approx(after[0])  # rank 0 is the untouched base
    for k in (1, 2, 4, 8):
        assert after[k] < before[k] - 0.05, (before, after)
    nested.save(tmp_path / "loop")
    assert NestedAdapter.load(tmp_path / "loop").config.method == "matryoshka"


def test_trainer_calls_train_diagonal_once_per_optimisation_step(tiny) -> None:
    """With gradient accumulation, every micro-batch of optimisation step n sees DyLoRA's b(n)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from mlora_export.base import load_base_model
    from mlora_export.data import CompletionCollator

    nested = add_nested_adapter(load_base_model(tiny["path"]), MatryoshkaConfig("dylora", 8, (1, 2, 4, 8), "sqrt"), seed=3)
    forwards: list[int | None] = []
    nested.model.register_forward_pre_hook(lambda mod, args: forwards.append(nested.sampled_rank))

    class Steps(TrainerCallback):
        def __init__(self) -> None:
            self.steps: list[int] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append(state.global_step)

    steps = Steps()
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=4, gradient_accumulation_steps=3, max_steps=7, learning_rate=1e-3,
            report_to=[], save_strategy="no", disable_tqdm=True, remove_unused_columns=False, use_cpu=True, seed=0,
        )
        trainer = Trainer(
            model=nested.model, args=args, train_dataset=tiny["train"][:200],
            data_collator=CompletionCollator(tiny["tokenizer"].pad_token_id), callbacks=[NestedRankCallback(nested), steps],
        )
        trainer.train()
    assert steps.steps == list(range(1, 8))
    assert forwards == [nested.sample_rank(n) for n in range(7) for _ in range(3)]
    assert len(set(forwards)) > 1
    # when training ends the model is the full-rank adapter, what the saved folder computes in PEFT
    buf = next(m for n, m in nested.model.named_modules() if n.endswith("lora_A.default")).mlora_diag
    assert buf.tolist() == pytest.approx([scale(8, "sqrt")] * 8)


def test_save_refuses_existing_output_and_writes_nothing_partial(tmp_path) -> None:
    from mlora_export.errors import OutputExistsError

    nested = add_nested_adapter(build_model("gpt2"), MatryoshkaConfig("matryoshka", 4, (2, 4), "rank"), target_modules=targets_for("gpt2"))
    nested.save(tmp_path / "a")
    adapter = NestedAdapter.load(tmp_path / "a")
    assert adapter.fan_in_fan_out and adapter.config.scaling == "rank"
    with pytest.raises(OutputExistsError):
        nested.save(tmp_path / "a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_train_gpt2_conv1d_on_text_data_loads_in_peft(tmp_path) -> None:
    """finetune.train on a GPT-2-style model (Conv1D, fan_in_fan_out) with {"text": ...} data and
    bfloat16 weights: the saved adapter is the one PEFT loads (rank r at s(r))."""
    import json

    import transformers as tf
    from peft import PeftModel

    from mlora_export.base import load_base_model
    from mlora_export.demo.tiny import build_char_tokenizer
    from mlora_export.training import TrainSettings, train

    tok = build_char_tokenizer()
    torch.manual_seed(0)
    tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                     bos_token_id=1, eos_token_id=2, pad_token_id=0)).save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": f"the {w} sat"}) + "\n" for w in ("cat", "dog", "hen", "owl")), encoding="utf-8")
    s = TrainSettings(method="matryoshka", train_ranks=(2, 4), scaling="none", alpha=0.5, max_steps=3, lr=5e-2, batch_size=2, epochs=None, dtype="bfloat16")
    res = train(tmp_path / "gpt2", tmp_path / "t.jsonl", tmp_path / "nested", s)
    assert res.steps == 3
    adapter = NestedAdapter.load(tmp_path / "nested")
    # PEFT keeps the trainable LoRA weights in float32 on a bfloat16 base (autocast_adapter_dtype)
    assert adapter.fan_in_fan_out and adapter.dtype == "F32" and {n.rsplit(".", 1)[-1] for n in adapter.modules} == {"c_attn", "c_proj", "c_fc"}
    ids = tok(["the cat sat", "an owl"], return_tensors="pt", padding=True)["input_ids"]
    base = load_base_model(tmp_path / "gpt2")
    ours = load_nested_adapter(load_base_model(tmp_path / "gpt2"), adapter)
    peft_model = PeftModel.from_pretrained(load_base_model(tmp_path / "gpt2"), str(tmp_path / "nested"))
    out = _logits(ours.model, ids)
    torch.testing.assert_close(out, _logits(peft_model, ids), rtol=1e-5, atol=1e-5)
    assert (out - _logits(base, ids)).abs().max() > 1e-3  # it trained


# -- the handle: PEFT's own save and merge, global state, refused options ------------------------


def test_peft_save_pretrained_and_merge_after_remove_are_the_rank_r_adapter(tmp_path) -> None:
    """What Trainer checkpoints write (PEFT's save_pretrained of nested.model) loads in plain PEFT as
    the rank-r adapter at s(r); after remove() PEFT's merge_and_unload computes that same adapter."""
    from peft import PeftModel

    base = build_model("llama")
    nested = add_nested_adapter(copy.deepcopy(base), MatryoshkaConfig("matryoshka", R, T, "sqrt", 2.0), target_modules=targets_for("llama"))
    randomise_lora_b(nested)
    nested.model.eval()
    ids = sample_ids()
    want = _logits(_by_hand(base, nested, [scale(R, "sqrt", 2.0)] * R), ids)
    nested.model.save_pretrained(tmp_path / "ckpt")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ckpt")).eval()
    torch.testing.assert_close(_logits(loaded, ids), want, rtol=1e-4, atol=1e-4)
    nested.set_rank(2)  # remove() ignores the rank in use: it hands back the full adapter
    nested.remove()
    torch.testing.assert_close(_logits(nested.model, ids), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(_logits(nested.model.merge_and_unload(), ids), want, rtol=1e-4, atol=1e-4)
    with pytest.raises(Exception, match="was removed"):
        nested.set_rank(4)


def test_add_nested_adapter_leaves_global_rng_alone_and_is_seeded() -> None:
    """A is initialised from ``seed`` alone, and torch's global random state is as it was."""
    cfg = MatryoshkaConfig("matryoshka", 4, (2, 4), "sqrt")
    model = build_model("gpt2")
    state = torch.get_rng_state()
    a = add_nested_adapter(model, cfg, target_modules=["c_attn"], seed=9)
    assert torch.equal(torch.get_rng_state(), state)
    b = add_nested_adapter(build_model("gpt2", seed=4), cfg, target_modules=["c_attn"], seed=9)
    c = add_nested_adapter(build_model("gpt2"), cfg, target_modules=["c_attn"], seed=10)
    fa, fb, fc = a.factors(), b.factors(), c.factors()
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k][0], fb[k][0]) for k in fa)
    assert not any(torch.equal(fa[k][0], fc[k][0]) for k in fa)


@pytest.mark.parametrize(
    "targets, kwargs, fragment",
    [
        (["embed_tokens", "q_proj"], {}, "not nn.Linear or Conv1D: model.embed_tokens (Embedding)"),
        (["mlp"], {}, "model.layers.0.mlp (LlamaMLP)"),
        (["nothing"], {}, "match no Linear or Conv1D layer"),
        (["q_proj"], {"use_dora": True}, "use_dora are not supported"),
        (["q_proj"], {"modules_to_save": ["lm_head"]}, "modules_to_save are not supported"),
        (["q_proj"], {"lora_alpha": 16}, "lora_alpha are set by add_nested_adapter"),
        (["q_proj"], {"init_lora_weights": "pissa"}, "init_lora_weights='pissa' is not supported"),
    ],
)
def test_add_nested_adapter_refuses_what_the_format_cannot_hold(targets, kwargs, fragment) -> None:
    from mlora_export.errors import ConfigError

    model = build_model("llama")
    with pytest.raises(ConfigError) as e:
        add_nested_adapter(model, MatryoshkaConfig("matryoshka", 4, (2, 4), "sqrt"), target_modules=targets, **kwargs)
    assert fragment in str(e.value)
    assert not any("lora" in n for n, _ in model.named_modules())  # the model was not touched


def test_layers_to_transform_saves_exact_targets_that_plain_peft_loads(tmp_path) -> None:
    from peft import PeftModel

    base = build_model("llama")
    nested = add_nested_adapter(copy.deepcopy(base), MatryoshkaConfig("matryoshka", 4, (2, 4), "rank"), target_modules=["q_proj", "v_proj"], layers_to_transform=[1])
    assert nested.module_names == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    randomise_lora_b(nested)
    nested.set_rank(4)
    nested.model.eval()
    nested.save(tmp_path / "n")
    adapter = NestedAdapter.load(tmp_path / "n")
    assert adapter.peft_config["target_modules"] == nested.module_names
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "n")).eval()
    assert sum("lora_A" in n for n, _ in loaded.named_parameters()) == 2
    ids = sample_ids()
    torch.testing.assert_close(_logits(loaded, ids), _logits(nested.model, ids), rtol=1e-5, atol=1e-5)


def test_diagonal_switches_back_and_survives_a_deep_copy() -> None:
    """set_rank then train_diagonal re-installs p (the same-diagonal short cut must not skip it), and
    a deep copy of the model keeps computing with its own diagonal."""
    base = build_model("gpt2")
    nested = add_nested_adapter(copy.deepcopy(base), MatryoshkaConfig("matryoshka", R, T, "none"), target_modules=targets_for("gpt2"))
    randomise_lora_b(nested)
    nested.model.eval()
    ids = sample_ids()
    p = matryoshka_diagonal(R, T, "none")
    nested.set_rank(2)
    nested.train_diagonal(0)
    torch.testing.assert_close(_logits(nested.model, ids), _logits(_by_hand(base, nested, p), ids), rtol=1e-4, atol=1e-4)
    twin = copy.deepcopy(nested.model)
    nested.set_rank(1)
    torch.testing.assert_close(_logits(twin, ids), _logits(_by_hand(base, nested, p), ids), rtol=1e-4, atol=1e-4)
    from mlora_export.training import NestedLoraModel

    handle = NestedLoraModel(twin, nested.config)  # a handle on the copy: hooks are not doubled
    handle.set_rank(8)
    d8 = [scale(8, "none")] * R
    torch.testing.assert_close(_logits(twin, ids), _logits(_by_hand(base, nested, d8), ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lr_scheduler": "nope"}, "unknown learning-rate scheduler 'nope'"),
        ({"dropout": "x"}, "dropout must be a number in [0, 1)"),
        ({"dropout": 1.0}, "dropout must be a number in [0, 1)"),
        ({"weight_decay": -1.0}, "weight decay must be a non-negative number"),
        ({"max_grad_norm": float("nan")}, "max grad norm must be a non-negative number"),
        ({"warmup_steps": -2}, "warmup steps must be a non-negative integer"),
        ({"warmup_steps": 1.5}, "warmup steps must be a non-negative integer"),
        ({"dtype": "float8"}, "unknown dtype 'float8'"),
        ({"epochs": None, "max_steps": None}, "give a number of epochs or a number of steps (max_steps)"),
    ],
)
def test_train_settings_refuse_bad_loop_settings(kwargs: dict, message: str) -> None:
    """Every loop setting is checked before any I/O, with a ConfigError naming it (exit 2 in the CLI)."""
    from mlora_export.errors import ConfigError
    from mlora_export.training import TrainSettings

    with pytest.raises(ConfigError) as err:
        TrainSettings(**kwargs).validate()
    assert message in str(err.value)
