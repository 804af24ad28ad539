"""``nested-loss``: every example trained at one train rank exactly as that rank is served (docs/design.md §1).

The per-example forward against the math by hand, the stratified assignment, gradient accumulation
and process layouts against one big batch, the Trainer path against the plain loop, and a short
run whose rank-``k`` slices load in real PEFT.
"""

from __future__ import annotations

import collections
import copy
import math
import tempfile

import pytest
import torch

from mlora_export.adapter import MatryoshkaConfig, NestedAdapter
from mlora_export.errors import ConfigError
from mlora_export.method import check_rank_weights, example_ranks, rank_diagonal, scale
from mlora_export.training import NestedRankCallback, add_nested_adapter
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




def _no_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Train mode without dropout (GPT-2's configs default to 0.1): only the diagonals differ from eval."""
    for mod in model.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    return model


def _lora_grads(nested) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in nested.model.named_parameters() if p.requires_grad and p.grad is not None}


# -- the forward ---------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("scaling", ["sqrt", "rank"])
def test_per_example_forward_equals_w_plus_b_diag_dj_a_by_hand(arch: str, scaling: str) -> None:
    """Example j of a training forward computes W x + B·diag(d_j)·A x with d_j the inference
    diagonal of its own rank t_j (s(t_j) on the first t_j components), for every j."""
    base = _no_dropout(build_model(arch))
    nested = add_nested_adapter(copy.deepcopy(base), MatryoshkaConfig("nested-loss", R, T, scaling, 1.5), target_modules=targets_for(arch))
    randomise_lora_b(nested)
    nested.model.train()  # no dropout: train mode changes nothing but the per-example diagonals
    ids = sample_ids(batch=7, seq=6)
    nested.train_diagonal(5)
    with torch.no_grad():
        out = nested.model(input_ids=ids).logits
    ranks = nested.last_example_ranks
    assert ranks == example_ranks(T, range(7), seed=0, step=5)
    assert set(ranks) == set(T)  # 7 examples over 4 ranks: every rank at least once
    factors = nested.factors()
    for j, t in enumerate(ranks):
        d = torch.diag(torch.tensor(rank_diagonal(R, t, scaling, 1.5)))
        ref = add_deltas(base, {name: b @ d @ a for name, (a, b) in factors.items()})
        with torch.no_grad():
            want = ref(input_ids=ids[j : j + 1]).logits
        torch.testing.assert_close(out[j : j + 1], want, rtol=1e-4, atol=1e-4)
    # and the examples really differ by rank: rank 1 alone is not rank 8
    assert scale(1, scaling, 1.5) != scale(8, scaling, 1.5)


def test_per_example_forward_bfloat16() -> None:
    """bfloat16 base and adapter: each example within bfloat16 rounding of its rank's by-hand forward."""
    base = build_model("llama", torch.bfloat16)
    nested = add_nested_adapter(copy.deepcopy(base), MatryoshkaConfig("nested-loss", R, T, "sqrt"), target_modules=targets_for("llama"))
    randomise_lora_b(nested)
    nested.model.train()
    ids = sample_ids(batch=4)
    nested.train_diagonal(0)
    with torch.no_grad():
        out = nested.model(input_ids=ids).logits.float()
    factors = nested.factors()
    for j, t in enumerate(nested.last_example_ranks):
        d = torch.diag(torch.tensor(rank_diagonal(R, t, "sqrt")))
        ref = add_deltas(base, {n: b.float() @ d @ a.float() for n, (a, b) in factors.items()})
        with torch.no_grad():
            want = ref(input_ids=ids[j : j + 1]).logits.float()
        torch.testing.assert_close(out[j : j + 1], want, rtol=1e-2, atol=2e-2)


def test_eval_mode_and_set_rank_leave_the_per_example_mode() -> None:
    """In eval mode during training the model runs the full rank r (what is saved); set_rank(k) serves rank k."""
    base = build_model("llama")
    nested = add_nested_adapter(copy.deepcopy(base), MatryoshkaConfig("nested-loss", R, T, "sqrt"), target_modules=targets_for("llama"))
    randomise_lora_b(nested)
    ids = sample_ids(batch=3)
    nested.train_diagonal(0)
    nested.model.eval()
    with torch.no_grad():
        during = nested.model(input_ids=ids).logits
    nested.set_rank(R)
    with torch.no_grad():
        full = nested.model(input_ids=ids).logits
    torch.testing.assert_close(during, full, rtol=0, atol=0)
    nested.model.train()
    nested.set_rank(2)  # leaves the per-example mode: a forward in train mode is rank 2 for every example
    with torch.no_grad():
        two = nested.model(input_ids=ids).logits
    nested.model.eval()
    with torch.no_grad():
        two_eval = nested.model(input_ids=ids).logits
    torch.testing.assert_close(two, two_eval, rtol=0, atol=0)
    assert (two - full).abs().max() > 1e-3


# -- the assignment ------------------------------------------------------------------------------
@pytest.mark.parametrize("ranks", [(1, 2, 4, 8), (1, 2, 4, 8, 16, 32)])
@pytest.mark.parametrize("n", [1, 5, 6, 7, 12, 13, 32, 100])
def test_assignment_is_stratified_for_any_batch_size(ranks: tuple[int, ...], n: int) -> None:
    for step in range(5):
        got = example_ranks(ranks, range(n), seed=3, step=step)
        counts = collections.Counter(got)
        full = [counts.get(t, 0) for t in ranks]
        assert max(full) - min(full) <= 1, (n, full)
        assert set(got) <= set(ranks)


def test_assignment_is_a_function_of_seed_step_and_position() -> None:
    whole = example_ranks(T, range(24), seed=1, step=9)
    # any split of the positions (micro-batches, processes) gives the same ranks
    parts = example_ranks(T, range(5), seed=1, step=9) + example_ranks(T, range(5, 24), seed=1, step=9)
    assert parts == whole
    assert example_ranks(T, [17, 3, 11], seed=1, step=9) == [whole[17], whole[3], whole[11]]
    assert example_ranks(T, range(24), seed=1, step=9) == whole  # no hidden state
    assert example_ranks(T, range(24), seed=2, step=9) != whole
    assert example_ranks(T, range(24), seed=1, step=10) != whole
    # shuffled, not in rank order
    assert any(whole[i : i + 4] != list(T) for i in range(0, 24, 4))


def test_weights_are_respected_in_expectation_and_per_block() -> None:
    ranks = (1, 2, 4, 8, 16, 32)
    w = check_rank_weights([1, 1, 1, 1, 2, 2], ranks)
    assert w == pytest.approx((0.125, 0.125, 0.125, 0.125, 0.25, 0.25))
    total: collections.Counter[int] = collections.Counter()
    n = 40  # not a multiple of the 64-position block
    steps = 400
    for step in range(steps):
        total.update(example_ranks(ranks, range(n), seed=0, step=step, weights=w))
    for t, wt in zip(ranks, w):
        expected = steps * n * wt
        assert abs(total[t] - expected) < 4 * math.sqrt(expected), (t, total[t], expected)
    # a whole block of 64 positions holds 64·w_t of each rank exactly (64·w is whole here)
    block = collections.Counter(example_ranks(ranks, range(64), seed=5, step=1, weights=w))
    assert [block[t] for t in ranks] == [8, 8, 8, 8, 16, 16]
    # a zero weight never draws its rank
    w0 = check_rank_weights([0, 1, 1, 1, 1, 1], ranks)
    assert 1 not in example_ranks(ranks, range(640), seed=0, step=0, weights=w0)


@pytest.mark.parametrize(
    "weights, fragment",
    [([1, 1], "one weight per train rank"), ([1, 1, -1, 1], "non-negative"), ([0, 0, 0, 0], "all zero"),
     ([1, 1, float("nan"), 1], "finite"), ([1, 1, "x", 1], "finite")],
)
def test_bad_rank_weights_are_refused(weights: list, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        check_rank_weights(weights, T)


def test_rank_weights_round_trip_and_only_for_nested_loss(tmp_path) -> None:
    with pytest.raises(ConfigError, match="nested-loss"):
        MatryoshkaConfig("dylora", R, T, rank_weights=(1, 1, 1, 1))
    cfg = MatryoshkaConfig("nested-loss", R, T, rank_weights=(1, 1, 2, 4))
    assert cfg.rank_weights == pytest.approx((0.125, 0.125, 0.25, 0.5))
    again = MatryoshkaConfig.from_dict(cfg.to_dict())
    assert again.rank_weights == pytest.approx(cfg.rank_weights) and again.method == "nested-loss" and again.p is None


# -- accumulation, processes, Trainer ----------------------------------------------------------
def _fresh(seed: int = 0):
    nested = add_nested_adapter(build_model("llama"), MatryoshkaConfig("nested-loss", R, T, "sqrt"), target_modules=targets_for("llama"), seed=seed)
    randomise_lora_b(nested)
    nested.model.train()
    return nested


def test_gradient_accumulation_equals_one_big_batch() -> None:
    """m micro-batches of b examples (each rank by its position in the step) give the gradient of one
    batch of m·b; examples have equal length, so the mean of micro-batch means is the batch mean."""
    ids = sample_ids(batch=12, seq=6, seed=4)
    big = _fresh()
    big.train_diagonal(3)
    big.model(input_ids=ids, labels=ids).loss.backward()
    want, want_ranks = _lora_grads(big), big.last_example_ranks

    acc = _fresh()
    acc.train_diagonal(3)
    ranks = []
    for mb in ids.split(4):
        (acc.model(input_ids=mb, labels=mb).loss / 3).backward()
        ranks += acc.last_example_ranks
    assert ranks == want_ranks
    got = _lora_grads(acc)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6)
    # the micro-batch losses summed first and one backward: each graph keeps its own diagonals
    once = _fresh()
    once.train_diagonal(3)
    sum(once.model(input_ids=mb, labels=mb).loss / 3 for mb in ids.split(4)).backward()
    for k, v in _lora_grads(once).items():
        torch.testing.assert_close(v, want[k], rtol=1e-4, atol=1e-6)


def test_processes_see_the_ranks_of_their_global_positions() -> None:
    """W processes × m micro-batches: process p's micro-batch μ holds global positions (μ·W + p)·b + j,
    the order in which accelerate shards a global batch; together they assign the one-process ranks."""
    W, m, b = 2, 3, 4
    single = _fresh()
    single.train_diagonal(7)
    ids = sample_ids(batch=W * m * b, seq=5, seed=2)
    with torch.no_grad():
        single.model(input_ids=ids)
    whole = single.last_example_ranks
    for p in range(W):
        proc = _fresh()
        proc.train_diagonal(7, process_index=p, num_processes=W)
        for mu in range(m):
            start = (mu * W + p) * b
            with torch.no_grad():
                proc.model(input_ids=ids[start : start + b])
            assert proc.last_example_ranks == whole[start : start + b]


def test_trainer_path_equals_the_plain_loop(base_dirs, tmp_path) -> None:
    """A stock transformers.Trainer with NestedRankCallback trains the same adapter as a plain loop
    over the same batches (sequential order, constant lr, no clipping)."""
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainingArguments

    from mlora_export.data import CompletionCollator

    gen = torch.Generator().manual_seed(0)
    rows = [{"input_ids": x.tolist(), "attention_mask": [1] * 6, "labels": x.tolist()} for x in torch.randint(3, 96, (24, 6), generator=gen)]
    collate = CompletionCollator(0)

    def fresh():
        nested = add_nested_adapter(build_model("llama"), MatryoshkaConfig("nested-loss", R, T, "sqrt"), target_modules=targets_for("llama"), seed=1)
        nested.model.train()
        return nested

    loop = fresh()
    params = [p for p in loop.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-3, weight_decay=0.0)
    for step in range(4):
        loop.train_diagonal(step)
        loop.model(**collate(rows[step * 6 : (step + 1) * 6])).loss.backward()
        opt.step()
        opt.zero_grad()

    class InOrder(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    tr = fresh()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=6, max_steps=4, learning_rate=5e-3, lr_scheduler_type="constant",
            max_grad_norm=0.0, weight_decay=0.0, report_to=[], save_strategy="no", disable_tqdm=True,
            remove_unused_columns=False, use_cpu=True, seed=0,
        )
        InOrder(model=tr.model, args=args, train_dataset=rows, data_collator=collate, callbacks=[NestedRankCallback(tr)]).train()
    a, b = loop.factors(), tr.factors()
    moved = 0.0
    for name in a:
        for x, y in zip(a[name], b[name]):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)
        moved = max(moved, float(a[name][1].abs().max()))
    assert moved > 1e-3  # it trained (B starts at zero)


def test_short_trainer_run_lowers_every_rank_and_slices_load_in_peft(tmp_path) -> None:
    """finetune.train (the CLI's Trainer path) with nested-loss: every train rank ends below the base's
    held-out loss, and each rank's PEFT slice gives exactly the in-place rank's loss."""
    from peft import PeftModel

    from mlora_export.base import load_base_model, load_tokenizer
    from mlora_export.converters.slice import slice_adapter
    from mlora_export.data import load_dataset
    from mlora_export.demo import builtin_dataset_path
    from mlora_export.demo.tiny import build_tiny_model
    from mlora_export.training import (
        TrainSettings,
        heldout_loss,
        load_nested_adapter,
        train,
    )

    base = tmp_path / "base"
    build_tiny_model(base, seed=0)
    tok = load_tokenizer(base)
    held = load_dataset(builtin_dataset_path("eval", "sort"), tok, 48)[:96]
    s = TrainSettings(train_ranks=(1, 2, 4, 8), max_steps=40, lr=1e-2, batch_size=16, max_length=48, epochs=None, seed=0)
    assert s.method == "nested-loss"  # the default
    train(base, builtin_dataset_path("train", "sort"), tmp_path / "nested", s)
    adapter = NestedAdapter.load(tmp_path / "nested")
    assert adapter.config.method == "nested-loss" and adapter.config.p is None
    nested = load_nested_adapter(load_base_model(base), adapter)
    losses = {}
    for k in (0, 1, 2, 4, 8):
        nested.set_rank(k)
        losses[k] = heldout_loss(nested.model, held, tok.pad_token_id)
    for k in (1, 2, 4, 8):
        assert losses[k] < losses[0] - 0.05, losses
    slice_adapter(adapter, [2, 8], tmp_path / "slices")
    for k in (2, 8):
        peft_model = PeftModel.from_pretrained(load_base_model(base), str(tmp_path / "slices" / f"r{k}"))
        assert math.isclose(heldout_loss(peft_model, held, tok.pad_token_id), losses[k], rel_tol=1e-5), k


def test_a_huge_max_rank_with_a_short_p_is_refused_at_once() -> None:
    """The length of a stored p is checked before p is recomputed (O(max_rank · |T|))."""
    import time

    from mlora_export.errors import InvalidAdapterError

    data = {"format": "mlora-nested/1", "method": "matryoshka", "max_rank": 100_000_000, "train_ranks": [1, 100_000_000],
            "scaling": "sqrt", "alpha": 1.0, "p": [1.0, 2.0]}
    t0 = time.perf_counter()
    with pytest.raises(InvalidAdapterError, match="stored p must be a list of max_rank = 100000000 numbers"):
        MatryoshkaConfig.from_dict(data)
    assert time.perf_counter() - t0 < 1.0


def test_library_train_and_renest_refuse_an_output_over_their_inputs(tmp_path) -> None:
    """--force can never replace an input, from Python too (not only through the CLI)."""
    from mlora_export.converters.renest import renest_adapter
    from mlora_export.errors import OutputPathError
    from mlora_export.training import TrainSettings, train
    from tests.common import random_nested

    base = tmp_path / "proj" / "base"
    base.mkdir(parents=True)
    data = tmp_path / "proj" / "train.jsonl"
    data.write_text('{"text": "abc"}\n', encoding="utf-8")
    s = TrainSettings(train_ranks=(1, 2), max_steps=1, epochs=None)
    for out in (base, tmp_path / "proj", base / "nested"):
        with pytest.raises(OutputPathError):
            train(base, data, out, s, force=True)
    assert data.read_text(encoding="utf-8") == '{"text": "abc"}\n' and base.is_dir()
    src = tmp_path / "lora"
    random_nested(build_model("llama"), src, arch="llama", method="lora", train_ranks=(8,))
    before = (src / "adapter_model.safetensors").read_bytes()
    with pytest.raises(OutputPathError):
        renest_adapter(src, src, force=True)
    with pytest.raises(OutputPathError):
        renest_adapter(src, tmp_path, force=True)
    assert (src / "adapter_model.safetensors").read_bytes() == before
