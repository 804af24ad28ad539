"""``nested-loss`` on packed rows: every packed sequence gets its own rank (stratified over the train
ranks, a function of seed, step and global position), the packed forward equals the padded one with
the same ranks, and a packed batch whose boundaries the hook cannot see is refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mlora_export.adapter import MatryoshkaConfig
from mlora_export.errors import ConfigError
from mlora_export.method import example_ranks
from mlora_export.training import add_nested_adapter
from mlora_export.training.packing import sequence_ids
from tests.common import build_model, launch_env, randomise_lora_b

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RANKS = (1, 2, 4, 8)
LENGTHS = (5, 3, 7, 4, 6)


def _nested(seed: int = 5):
    model = build_model("llama").train()
    model.config.use_cache = False  # a cache turns transformers' packed-sequence attention mask off
    nested = add_nested_adapter(model, MatryoshkaConfig("nested-loss", 8, RANKS), seed=seed)
    randomise_lora_b(nested)
    return nested


def _sequences(lengths=LENGTHS, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 96, (n,), generator=gen) for n in lengths]


def _packed(seqs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """What TRL's padding-free collator makes: one row, positions restarting at 0, cu_seq_lens, the
    first label of every sequence masked."""
    ids = torch.cat(seqs)[None]
    pos = torch.cat([torch.arange(len(s)) for s in seqs])[None]
    labels = ids.clone()
    labels[pos == 0] = -100
    cu = torch.tensor([0, *torch.tensor([len(s) for s in seqs]).cumsum(0).tolist()], dtype=torch.int32)
    return {"input_ids": ids, "position_ids": pos, "labels": labels, "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
            "max_length_q": max(len(s) for s in seqs), "max_length_k": max(len(s) for s in seqs)}


def _padded(seqs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    n = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), n, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _lora_grads(nested) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in nested.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("boundaries", ["trl", "position_ids"])
def test_packed_forward_and_gradients_equal_the_padded_batch_with_the_same_ranks(boundaries: str) -> None:
    seqs = _sequences()
    nested = _nested()
    packed = _packed(seqs)
    if boundaries == "position_ids":
        packed = {k: packed[k] for k in ("input_ids", "position_ids", "labels")}
    nested.train_diagonal(step=3)
    out = nested.model(**packed)
    out.loss.backward()
    packed_ranks, packed_grads = nested.last_example_ranks, _lora_grads(nested)
    nested.model.zero_grad(set_to_none=True)

    nested.train_diagonal(step=3)
    ref = nested.model(**_padded(seqs))
    ref.loss.backward()
    # one rank per sequence, stratified over T and a function of (seed, step, position) only
    assert packed_ranks == nested.last_example_ranks == example_ranks(RANKS, range(len(seqs)), seed=5, step=3)
    assert len(set(packed_ranks)) == len(RANKS)
    start = 0
    for i, s in enumerate(seqs):
        torch.testing.assert_close(out.logits[0, start : start + len(s)], ref.logits[i, : len(s)], rtol=1e-5, atol=1e-5)
        start += len(s)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-6)
    for name, grad in _lora_grads(nested).items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    # each token carries its sequence's diagonal: s(t) on the first t components
    d = next(m.mlora_diag for n, m in nested.model.named_modules() if n.endswith("lora_A.default"))
    assert d.shape == (len(seqs), 1, 8)  # the padded forward ran last: one diagonal per row


def test_each_token_gets_its_sequences_diagonal_and_rows_are_numbered_in_order() -> None:
    nested = _nested()
    a, b = _sequences((4, 6, 2)), _sequences((5, 4), seed=1)
    row_a, row_b = torch.cat(a), torch.cat(b)
    n = max(len(row_a), len(row_b))
    ids = torch.zeros(2, n, dtype=torch.long)
    pos = torch.zeros(2, n, dtype=torch.long)
    mask = torch.zeros(2, n, dtype=torch.long)
    for i, (row, parts) in enumerate(((row_a, a), (row_b, b))):
        ids[i, : len(row)] = row
        pos[i, : len(row)] = torch.cat([torch.arange(len(s)) for s in parts])
        mask[i, : len(row)] = 1
    nested.train_diagonal(step=7)
    with torch.no_grad():
        nested.model(input_ids=ids, position_ids=pos, attention_mask=mask)
    ranks = nested.last_example_ranks
    assert ranks == example_ranks(RANKS, range(5), seed=5, step=7)
    d = next(m.mlora_diag for n, m in nested.model.named_modules() if n.endswith("lora_A.default"))
    assert d.shape == (2, n, 8)
    table = nested.example_diagonals(ranks)[:, 0]
    seq = [0] * 4 + [1] * 6 + [2] * 2, [3] * 5 + [4] * 4 + [4] * 3  # padding stays with its row's last sequence
    for row in range(2):
        for t in range(n):
            assert torch.equal(d[row, t], table[seq[row][t]]), (row, t)
    # a second micro-batch of the same step continues the numbering; the next step starts again
    with torch.no_grad():
        nested.model(**{k: v for k, v in _packed(_sequences((3, 3))).items() if k != "labels"})
    assert nested.last_example_ranks == example_ranks(RANKS, range(5, 7), seed=5, step=7)
    nested.train_diagonal(step=8)
    with torch.no_grad():
        nested.model(**{k: v for k, v in _packed(_sequences((3, 3))).items() if k != "labels"})
    assert nested.last_example_ranks == example_ranks(RANKS, range(2), seed=5, step=8)


def test_cu_seq_lens_alone_give_the_same_boundaries_as_position_ids() -> None:
    seqs = _sequences()
    packed = _packed(seqs)
    from_cu = sequence_ids({"cu_seq_lens_q": packed["cu_seq_lens_q"]}, 1, packed["input_ids"].shape[1])
    from_pos = sequence_ids({"position_ids": packed["position_ids"]}, 1, packed["input_ids"].shape[1])
    want = torch.cat([torch.full((len(s),), i) for i, s in enumerate(seqs)])[None]
    assert torch.equal(from_cu, want) and torch.equal(from_pos, want)
    # over two rows, a sequence never continues into the next row
    assert sequence_ids({"cu_seq_lens_q": torch.tensor([0, 3, 8])}, 2, 4).tolist() == [[0, 0, 0, 1], [2, 2, 2, 2]]
    assert sequence_ids({}, 2, 4) is None  # an ordinary padded batch: one sequence per row
    for bad in ([0, 3, 9], [1, 3, 4], [0, 3, 3, 4], [0]):
        with pytest.raises(ConfigError, match="cu_seq_lens"):
            sequence_ids({"cu_seq_lens_q": torch.tensor(bad)}, 1, 4)
    with pytest.raises(ConfigError, match="position_ids of shape"):
        sequence_ids({"position_ids": torch.arange(5)[None]}, 1, 4)


def test_a_packed_run_without_boundaries_is_refused() -> None:
    from types import SimpleNamespace

    from mlora_export.training.callbacks import check_packing

    nested = _nested()
    seqs = _sequences()
    check_packing(nested, SimpleNamespace(packing=True, packing_strategy="bfd", padding_free=False))
    assert nested.expect_packed
    nested.train_diagonal(0)
    with pytest.raises(ConfigError, match="no position_ids or cu_seq_lens"):
        nested.model(input_ids=torch.cat(seqs)[None])
    with torch.no_grad():  # with its boundaries the same row trains
        nested.model(**{k: v for k, v in _packed(seqs).items() if k != "labels"})
    assert len(nested.last_example_ranks) == len(seqs)
    with pytest.raises(ConfigError, match="wrapped"):
        check_packing(nested, SimpleNamespace(packing=True, packing_strategy="wrapped", padding_free=False))
    check_packing(nested, SimpleNamespace(packing=True, packing_strategy="wrapped", padding_free=True))  # positions from seq_lengths
    check_packing(nested, SimpleNamespace())  # plain TrainingArguments: no packing
    assert not nested.expect_packed
    # other methods train one diagonal per step: packing changes nothing for them
    other = add_nested_adapter(build_model("llama"), MatryoshkaConfig("dylora", 8, RANKS))
    check_packing(other, SimpleNamespace(packing=True, packing_strategy="wrapped", padding_free=False))


def test_sft_trainer_packing_gives_every_packed_sequence_its_rank(tmp_path: Path) -> None:
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from mlora_export.demo.tiny import build_tiny_model
    from mlora_export.training import NestedRankCallback

    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tmp_path / "base"
    build_tiny_model(base, seed=0, hidden_size=32, intermediate_size=48)

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    nested = add_nested_adapter(model, MatryoshkaConfig("nested-loss", 8, RANKS), seed=2)
    words = ["cab", "fed", "hgi", "lkj", "onm", "rqp", "uts", "xwv", "bca", "edf", "gih", "jlk"]
    data = Dataset.from_list([{"text": f"sort {w} = {''.join(sorted(w))}" + "!" * (i % 5)} for i, w in enumerate(words)])
    seen: list[dict] = []
    state = {"step": -1}

    class Step(TrainerCallback):
        def on_step_begin(self, args, st, control, **kw):
            state["step"] = st.global_step

    def record(module, args, kwargs) -> None:  # runs after the nested adapter's own pre-hook
        if module.training:
            d = next(m.mlora_diag for n, m in nested.model.named_modules() if n.endswith("lora_A.default"))
            seen.append({"step": state["step"], "ranks": list(nested.last_example_ranks), "pos": kwargs["position_ids"][0].tolist(),
                         "d": d.clone(), "shape": list(kwargs["input_ids"].shape)})

    nested.model.get_base_model().register_forward_pre_hook(record, with_kwargs=True)
    args = SFTConfig(
        output_dir=str(tmp_path / "run"), packing=True, max_length=64, per_device_train_batch_size=1, max_steps=3,
        learning_rate=1e-2, bf16=False, gradient_checkpointing=False, report_to=[], save_strategy="no", use_cpu=True,
        disable_tqdm=True, logging_steps=1, seed=2, dataloader_pin_memory=False,
    )
    trainer = SFTTrainer(model=nested.model, args=args, train_dataset=data, processing_class=tokenizer,
                         callbacks=[NestedRankCallback(nested), Step()])
    trainer.train()
    assert [s["step"] for s in seen] == [0, 1, 2]
    table = {t: nested.example_diagonals([t])[0, 0] for t in RANKS}
    several = 0
    for s in seen:
        starts = [i for i, p in enumerate(s["pos"]) if p == 0]
        lengths = [b - a for a, b in zip(starts, [*starts[1:], len(s["pos"])])]
        assert s["shape"][0] == 1 and s["ranks"] == example_ranks(RANKS, range(len(starts)), seed=2, step=s["step"])
        several += len(set(s["ranks"])) > 1
        token_ranks = [t for t, n in zip(s["ranks"], lengths) for _ in range(n)]
        assert all(torch.equal(s["d"][0, i], table[t]) for i, t in enumerate(token_ranks))
    assert several == len(seen)  # every packed row trained several ranks, not one


@pytest.mark.slow
def test_two_processes_number_packed_sequences_as_one_process(tmp_path: Path) -> None:
    """torchrun, 2 processes (gloo): each packs a different number of sequences per micro-batch;
    together they assign the ranks one process gives the global batch."""
    out = tmp_path / "ranks.json"
    script = Path(__file__).parent / "launch" / "packed_ranks.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), str(out)]
    proc = subprocess.run(cmd, env={**launch_env(), "PYTHONPATH": str(Path(__file__).parent.parent)}, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(out.read_text())
    # micro-batch 0: process 0 packs 3 sequences, process 1 packs 2; micro-batch 1: 1 and 4
    want = example_ranks(RANKS, range(10), seed=5, step=4)
    assert got == {"0": [want[0:3], want[5:6]], "1": [want[3:5], want[6:10]]}
