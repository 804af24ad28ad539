"""The training recipe of issue 26 (``NestedRecipe``): each option's mechanism, in the plain loop and
through ``transformers.Trainer`` (``NestedTrainer``), against its definition."""

from __future__ import annotations

import copy
import math
import tempfile

import pytest
import torch

from mlora_export.adapter import MatryoshkaConfig
from mlora_export.errors import ConfigError
from mlora_export.training.rank_schedule import curriculum_start, curriculum_weights, loss_aware_weights, update_running_losses
from mlora_export.training import NestedRecipe, TrainSettings, add_nested_adapter
from mlora_export.training.recipe import lora_plus_param_groups, nested_lm_loss, rank_token_counts
from tests.common import build_model, targets_for

T = (1, 2, 4, 8)
R = 8

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _nested(recipe: NestedRecipe | None = None, method: str = "nested-loss", seed: int = 0):
    return add_nested_adapter(build_model("llama"), MatryoshkaConfig(method, R, T if method != "lora" else (R,), "sqrt"),
                              target_modules=targets_for("llama"), seed=seed, recipe=recipe)


# -- rank curriculum ---------------------------------------------------------------------------
def test_curriculum_weights_at_given_steps() -> None:
    """Geometric start (∝ 2^-i), linear to uniform over the first `fraction` of the steps, uniform (None) after."""
    start = curriculum_start(4)
    assert start == pytest.approx((8 / 15, 4 / 15, 2 / 15, 1 / 15))
    assert curriculum_weights(4, 0, 100, 0.5) == pytest.approx(start)
    half = curriculum_weights(4, 25, 100, 0.5)  # λ = 25 / 50
    assert half == pytest.approx(tuple(0.5 * s + 0.5 * 0.25 for s in start))
    assert sum(half) == pytest.approx(1.0)
    assert curriculum_weights(4, 50, 100, 0.5) is None and curriculum_weights(4, 99, 100, 0.5) is None
    assert curriculum_weights(4, 10, 100, 0.0) is None  # no curriculum
    # it ends at the user's weights
    target = (0.1, 0.2, 0.3, 0.4)
    assert curriculum_weights(4, 80, 100, 0.8, target) == pytest.approx(target)
    assert curriculum_weights(4, 40, 100, 0.8, target) == pytest.approx(tuple(0.5 * s + 0.5 * t for s, t in zip(start, target)))
    with pytest.raises(ConfigError):
        curriculum_weights(4, 0, 0, 0.5)


def test_curriculum_moves_the_assignment_from_low_ranks_to_stratified() -> None:
    nested = _nested(NestedRecipe(rank_curriculum=0.5))
    nested.train_diagonal(0, total_steps=10)
    early = nested.ranks_at(0, range(640))
    for q in range(10):  # systematic sampling: each block of 64 holds rank t ⌊64·w_t⌋ or ⌈64·w_t⌉ times
        block = early[64 * q : 64 * (q + 1)]
        for t, w in zip(T, curriculum_start(4)):
            assert math.floor(64 * w) <= block.count(t) <= math.ceil(64 * w)
    late = nested.ranks_at(5, range(12))
    assert sorted(late) == sorted(T * 3)  # uniform from λ = 1: the stratified assignment itself
    with pytest.raises(ConfigError, match="number of steps"):
        _nested(NestedRecipe(rank_curriculum=0.5)).ranks_at(0, range(4))


# -- loss-aware ranks --------------------------------------------------------------------------
def test_loss_aware_weights_follow_the_running_losses() -> None:
    assert loss_aware_weights(None, [None, 1.0], 0.5) is None  # a rank not seen yet: unchanged
    assert loss_aware_weights(None, [3.0, 1.0], 0.0) is None
    assert loss_aware_weights(None, [3.0, 1.0], 0.5) == pytest.approx((0.5 * 0.5 + 0.5 * 0.75, 0.5 * 0.5 + 0.5 * 0.25))
    assert loss_aware_weights((0.2, 0.8), [1.0, 1.0], 1.0) == pytest.approx((0.5, 0.5))
    running = update_running_losses([None, 2.0, 5.0], [6.0, 4.0, 0.0], [3.0, 1.0, 0.0])
    assert running == pytest.approx([2.0, 0.9 * 2.0 + 0.1 * 4.0, 5.0])  # first observation, EMA, no tokens: kept
    with pytest.raises(ConfigError):
        loss_aware_weights(None, [1.0, 1.0], 1.5)


def test_loss_aware_handle_folds_the_last_steps_losses() -> None:
    """The statistics of step s (every forward of it) become the running losses when step s+1's ranks are asked for."""
    nested = _nested(NestedRecipe(loss_aware_ranks=0.5))
    nested.model.train()
    ids = torch.randint(3, 96, (8, 6), generator=torch.Generator().manual_seed(0))
    nested.train_diagonal(0)
    sums = torch.zeros(4, dtype=torch.float64)
    counts = torch.zeros(4, dtype=torch.float64)
    for mb in ids.split(4):
        out = nested.model(input_ids=mb)
        nested.loss(out.logits, mb)
        _, s, c = nested_lm_loss(out.logits, mb, nested.last_example_ranks, T, per_rank=False)
        sums += s.double()
        counts += c
    assert nested.rank_losses == [None] * 4 and nested.rank_weights_at(0) is None  # same step: nothing folded yet
    w = nested.rank_weights_at(1)
    assert nested.rank_losses == pytest.approx((sums / counts).tolist())
    mean = (sums / counts).tolist()
    assert w == pytest.approx(tuple(0.5 * 0.25 + 0.5 * m / sum(mean) for m in mean))


# -- LoRA+ ---------------------------------------------------------------------------------------
def test_lora_plus_groups_put_b_at_ratio_times_lr_and_the_schedule_keeps_it() -> None:
    nested = _nested(NestedRecipe(lora_plus_ratio=16.0))
    groups = nested.param_groups(1e-3, weight_decay=0.01)
    names = {id(p): n for n, p in nested.model.named_parameters()}
    a, b = groups
    assert a["lr"] == 1e-3 and b["lr"] == pytest.approx(1.6e-2) and a["weight_decay"] == b["weight_decay"] == 0.01
    assert all(".lora_A." in names[id(p)] for p in a["params"]) and all(".lora_B." in names[id(p)] for p in b["params"])
    trainable = [p for p in nested.model.parameters() if p.requires_grad]
    assert len(a["params"]) + len(b["params"]) == len(trainable) and len(a["params"]) == len(b["params"])
    opt = torch.optim.AdamW(groups)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / 10)
    for _ in range(3):
        opt.step()
        sched.step()
    assert opt.param_groups[1]["lr"] / opt.param_groups[0]["lr"] == pytest.approx(16.0)
    # without LoRA+: one group, every trainable parameter
    (only,) = _nested().param_groups(1e-3)
    assert only["lr"] == 1e-3 and len(only["params"]) == len(trainable)
    assert lora_plus_param_groups([("x.lora_Bx.w", torch.nn.Parameter(torch.zeros(1)))], 1.0, 4.0)[0]["params"]  # a name component, not a substring


# -- the paper's initialisation of A -------------------------------------------------------------
def test_paper_init_scales_a_by_sqrt_in_over_r() -> None:
    """Same seed: A_paper = A_peft · sqrt(in/r), i.e. Kaiming-uniform on [in, r]: |A| ≤ 1/sqrt(r); B stays 0."""
    peft_init, paper = _nested(seed=3), _nested(NestedRecipe(a_init="paper"), seed=3)
    fa, fb = peft_init.factors(), paper.factors()
    for name, (a0, b0) in fa.items():
        a1, b1 = fb[name]
        fan_in = a0.shape[1]
        torch.testing.assert_close(a1, a0 * math.sqrt(fan_in / R))
        assert float(a1.abs().max()) <= 1 / math.sqrt(R) + 1e-6 < float(a1.abs().max()) * 1.2  # fills its bound
        assert float(a0.abs().max()) <= 1 / math.sqrt(fan_in) + 1e-6
        assert not b1.any() and not b0.any()


# -- per-rank loss ------------------------------------------------------------------------------
def _hand_batch():
    """Logits and labels of 5 examples with 1–4 supervised tokens (prompt and padding masked)."""
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(5, 6, 11, generator=gen)
    labels = torch.randint(0, 11, (5, 6), generator=gen)
    supervised = [2, 4, 1, 3, 4]  # tokens after the shift, at the end of each row
    for j, n in enumerate(supervised):
        labels[j, : 6 - n] = -100
    return logits, labels, supervised


def test_per_rank_loss_equals_its_definition_on_a_hand_built_batch() -> None:
    """(1/|P|) Σ_t (Σ_{j: t_j = t} Σ_tokens ℓ) / N_t, with the token loss computed here one by one."""
    logits, labels, supervised = _hand_batch()
    ranks = [1, 2, 1, 8, 2]  # rank 4 absent: |P| = 3

    def ce(j: int, i: int) -> float:  # the loss of predicting labels[j, i + 1] from position i
        return float(-torch.log_softmax(logits[j, i], -1)[labels[j, i + 1]])

    per_ex = [sum(ce(j, i) for i in range(5) if labels[j, i + 1] != -100) for j in range(5)]
    by_rank = {t: (sum(per_ex[j] for j in range(5) if ranks[j] == t), sum(supervised[j] for j in range(5) if ranks[j] == t)) for t in (1, 2, 8)}
    want = sum(s / n for s, n in by_rank.values()) / 3
    loss, sums, counts = nested_lm_loss(logits, labels, ranks, T, per_rank=True)
    assert float(loss) == pytest.approx(want, rel=1e-6)
    assert counts.tolist() == [3.0, 8.0, 0.0, 3.0]
    assert sums.tolist() == pytest.approx([by_rank[1][0], by_rank[2][0], 0.0, by_rank[8][0]], rel=1e-6)
    token_mean, _, _ = nested_lm_loss(logits, labels, ranks, T, per_rank=False)
    assert float(token_mean) == pytest.approx(sum(per_ex) / sum(supervised), rel=1e-6)
    assert rank_token_counts(labels, ranks, T).tolist() == counts.tolist()
    with pytest.raises(ConfigError, match="not train ranks"):
        nested_lm_loss(logits, labels, [1, 2, 3, 8, 2], T, per_rank=True)


def test_micro_batches_sum_to_the_step_loss_and_its_gradient() -> None:
    """Given the step's tokens per rank, the micro-batch losses add up to the whole batch's loss, per rank or not."""
    logits, labels, _ = _hand_batch()
    logits.requires_grad_(True)
    ranks = [1, 2, 1, 8, 2]
    for per_rank in (True, False):
        whole, _, _ = nested_lm_loss(logits, labels, ranks, T, per_rank=per_rank)
        (g_whole,) = torch.autograd.grad(whole, logits)
        step_tokens = rank_token_counts(labels, ranks, T)
        parts = [nested_lm_loss(logits[i:j], labels[i:j], ranks[i:j], T, per_rank=per_rank, rank_tokens=step_tokens)[0] for i, j in ((0, 2), (2, 5))]
        (g_parts,) = torch.autograd.grad(sum(parts), logits)
        assert float(sum(parts)) == pytest.approx(float(whole), rel=1e-6)
        torch.testing.assert_close(g_parts, g_whole)


def test_token_mean_is_transformers_own_loss() -> None:
    nested = _nested(NestedRecipe(loss_aware_ranks=0.5))
    nested.model.train()
    ids = torch.randint(3, 96, (6, 7), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :3] = -100
    nested.train_diagonal(0)
    out = nested.model(input_ids=ids, labels=labels)
    assert float(nested.loss(out.logits, labels)) == pytest.approx(float(out.loss), rel=1e-6)
    nested.train_diagonal(1)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    ranks_then = nested.ranks_at(1, range(6))
    loss = nested.forward_loss(batch)  # own loss (loss-aware), the same mean
    assert nested.last_example_ranks == ranks_then
    assert float(loss) == pytest.approx(float(nested.model(**batch).loss), rel=1e-6)


# -- options and their checks -------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "option"), [
    ({"lora_plus_ratio": 0}, "lora_plus_ratio"), ({"lora_plus_ratio": float("inf")}, "lora_plus_ratio"),
    ({"rank_curriculum": 1.5}, "rank_curriculum"), ({"rank_curriculum": -0.1}, "rank_curriculum"),
    ({"per_rank_loss": "yes"}, "per_rank_loss"), ({"a_init": "xavier"}, "a_init"),
    ({"loss_aware_ranks": -1.0}, "loss_aware_ranks"), ({"loss_aware_ranks": float("nan")}, "loss_aware_ranks"),
])
def test_recipe_refuses_bad_values(kwargs: dict, option: str) -> None:
    with pytest.raises(ConfigError) as e:
        NestedRecipe(**kwargs)
    assert e.value.option == option


def test_train_settings_hold_the_recipe_as_one_object() -> None:
    assert TrainSettings().recipe == NestedRecipe()
    with pytest.raises(ConfigError, match="NestedRecipe") as e:
        TrainSettings(recipe={"per_rank_loss": True}).validate()  # type: ignore[arg-type]
    assert e.value.option == "recipe"


@pytest.mark.parametrize("kwargs", [{"per_rank_loss": True}, {"rank_curriculum": 0.5}, {"loss_aware_ranks": 0.3}])
def test_per_example_options_need_nested_loss(kwargs: dict) -> None:
    with pytest.raises(ConfigError, match="nested-loss"):
        TrainSettings(method="dylora", recipe=NestedRecipe(**kwargs)).validate()
    with pytest.raises(ConfigError, match="nested-loss"):
        _nested(NestedRecipe(**kwargs), method="lora")
    # LoRA+ and the init apply to every method
    TrainSettings(method="lora", recipe=NestedRecipe(lora_plus_ratio=16.0, a_init="paper")).validate()
    assert NestedRecipe(lora_plus_ratio=16.0, per_rank_loss=True).changed() == {"lora_plus_ratio": 16.0, "per_rank_loss": True}


# -- the Trainer path --------------------------------------------------------------------------
def _rows(n: int = 16) -> list[dict]:
    """Examples of 4–9 tokens whose first two are a masked prompt: the ranks' token counts differ."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for j in range(n):
        length = 4 + j % 6
        ids = torch.randint(3, 96, (length,), generator=gen).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * length, "labels": [-100, -100] + ids[2:]})
    return rows


@pytest.mark.parametrize("recipe", [
    NestedRecipe(per_rank_loss=True),
    NestedRecipe(lora_plus_ratio=16.0, rank_curriculum=0.6, a_init="paper"),
    NestedRecipe(per_rank_loss=True, loss_aware_ranks=0.5, rank_curriculum=0.5),
], ids=["per-rank", "lora-plus+curriculum+init", "per-rank+loss-aware+curriculum"])
def test_trainer_with_gradient_accumulation_equals_the_plain_loop(recipe: NestedRecipe) -> None:
    """NestedTrainer, 2 micro-batches of 4 per step, trains the adapter the plain loop trains with one
    batch of 8 (sequential order, constant lr, no clipping): the step's loss is exact across micro-batches."""
    from torch.utils.data import SequentialSampler
    from transformers import TrainingArguments

    from mlora_export.data import CompletionCollator
    from mlora_export.training import NestedTrainer

    rows, collate, steps = _rows(), CompletionCollator(0), 2
    base = build_model("llama")

    def fresh():
        nested = add_nested_adapter(copy.deepcopy(base), MatryoshkaConfig("nested-loss", R, T, "sqrt"), target_modules=targets_for("llama"), seed=1, recipe=recipe)
        nested.model.train()
        return nested

    loop = fresh()
    opt = torch.optim.AdamW(loop.param_groups(5e-3), lr=5e-3, weight_decay=0.0)
    for step in range(steps):
        loop.train_diagonal(step, total_steps=steps)
        loop.forward_loss(collate(rows[step * 8 : (step + 1) * 8])).backward()
        opt.step()
        opt.zero_grad()

    class InOrder(NestedTrainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    tr = fresh()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=steps, learning_rate=5e-3,
            lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, report_to=[], save_strategy="no", disable_tqdm=True,
            remove_unused_columns=False, use_cpu=True, seed=0,
        )
        trainer = InOrder(tr, args=args, train_dataset=rows, data_collator=collate)
        trainer.train()
    lrs = sorted(g["lr"] for g in trainer.optimizer.param_groups if g["params"])
    assert lrs == pytest.approx([5e-3, 8e-2] if recipe.lora_plus_ratio else [5e-3])
    a, b = loop.factors(), tr.factors()
    for name in a:
        for x, y in zip(a[name], b[name]):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)
    if recipe.loss_aware_ranks:
        assert tr.rank_losses == pytest.approx(loop.rank_losses)


def test_trainer_loss_differs_from_a_per_micro_batch_normalisation() -> None:
    """Normalising each micro-batch by its own tokens per rank (what a naive hook would do) is not the
    step's per-rank loss when the micro-batches' rank mixes differ: the step totals are needed."""
    gen = torch.Generator().manual_seed(2)
    logits, labels = torch.randn(4, 5, 7, generator=gen), torch.randint(0, 7, (4, 5), generator=gen)
    labels[0, :3] = -100
    ranks = [1, 2, 1, 2]
    whole = nested_lm_loss(logits, labels, ranks, T, per_rank=True)[0]
    naive = sum(nested_lm_loss(logits[i : i + 2], labels[i : i + 2], ranks[i : i + 2], T, per_rank=True)[0] / 2 for i in (0, 2))
    assert abs(float(naive) - float(whole)) > 1e-3


def test_supervised_positions_give_the_per_example_token_losses() -> None:
    """The trainer's own-loss path scores the supervised positions only: the same per-example sums
    and counts as the full logits (``token_losses``)."""
    from mlora_export.training.recipe import token_losses
    from mlora_export.training.trainer import supervised_token_losses

    nested = _nested(NestedRecipe(per_rank_loss=True))
    nested.model.eval()  # one diagonal for both forwards: the full rank
    rows = _rows(6)
    from mlora_export.data import CompletionCollator

    batch = CompletionCollator(0)(rows)
    sums, counts = supervised_token_losses(nested.model, batch)
    logits = nested.model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    want_sums, want_counts = token_losses(logits, batch["labels"])
    torch.testing.assert_close(sums, want_sums, rtol=1e-5, atol=1e-5)
    assert counts.tolist() == want_counts.tolist() and min(counts.tolist()) > 0


def test_own_loss_refuses_a_forward_whose_loss_was_not_taken_and_packed_rows() -> None:
    """per_rank_loss computes the loss itself: a trainer that uses the model's own loss (TRL's
    SFTTrainer) is refused at its second forward; so is a packed row (several sequences, one row)."""
    nested = _nested(NestedRecipe(per_rank_loss=True))
    nested.model.train()
    ids = torch.randint(3, 96, (4, 6), generator=torch.Generator().manual_seed(3))
    nested.train_diagonal(0)
    nested.model(input_ids=ids, labels=ids).loss.backward()  # the model's own loss: not the recipe's
    with pytest.raises(ConfigError, match="compute the loss themselves") as e:
        nested.model(input_ids=ids, labels=ids)
    assert e.value.option == "per_rank_loss"
    fresh = _nested(NestedRecipe(per_rank_loss=True))
    fresh.model.train()
    fresh.train_diagonal(0)
    packed = {"input_ids": ids[:1], "position_ids": torch.tensor([[0, 1, 2, 0, 1, 2]])}  # two sequences in one row
    with pytest.raises(ConfigError, match="one sequence per row"):
        fresh.model(**packed)
    plain = _nested()  # without the recipe, the same packed row trains (each sequence its rank)
    plain.model.train()
    plain.train_diagonal(0)
    plain.model(**packed)
    assert len(plain.last_example_ranks) == 2


def test_loss_aware_run_is_not_resumed(tmp_path) -> None:
    """Its running per-rank losses are not in a checkpoint: a resumption is refused before anything is read."""
    from mlora_export.training import RunOptions, train

    settings = TrainSettings(train_ranks=T, max_steps=2, recipe=NestedRecipe(loss_aware_ranks=0.5))
    with pytest.raises(ConfigError, match="cannot be resumed exactly") as e:
        train(tmp_path / "base", tmp_path / "data.jsonl", tmp_path / "out", settings, RunOptions(resume=tmp_path / "run" / "checkpoint-1"))
    assert e.value.option == "loss_aware_ranks" and not (tmp_path / "out").exists()
