"""Step cost of `mlora-export train`'s path (a stock ``transformers.Trainer`` + ``NestedRankCallback``)
vs a plain PyTorch loop, on the same model, adapter and batches.

Both train the default method (``nested-loss``) on a Llama-shaped model built from a config (random
weights), with all-linear LoRA at one rank, AdamW, a constant learning rate and gradient clipping
at 1.0 (what ``TrainSettings`` uses). A step of the plain loop is: collate the batch,
``train_diagonal(step)``, forward, backward, clip, AdamW step, zero_grad. A step of the Trainer is
whatever happens between two of its ``on_step_end`` callbacks (data loading, collation, the
callback, forward, backward, clipping, optimiser and scheduler step, its bookkeeping). The two run
in alternating blocks (loop, Trainer, Trainer, loop, …) in one process, so machine load hits both
alike; the first step of every block is dropped.

Goal (issue 10): Trainer step ≤ 1.10 × the plain loop's step.

    python benchmarks/bench_trainer_step.py --threads 1          # ~35 M params: ~4 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time

import torch

PRESET = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8, vocab_size=8000)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--block", type=int, default=6, help="steps per block (the first of each is dropped)")
    ap.add_argument("--blocks", type=int, default=4, help="blocks per path")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from mlora_export.adapter import MatryoshkaConfig
    from mlora_export.data import CompletionCollator
    from mlora_export.training import NestedRankCallback, add_nested_adapter

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(max_position_embeddings=2048, tie_word_embeddings=False, **PRESET)).train()
    r = args.rank
    ranks = tuple(2**i for i in range(r.bit_length()) if 2**i <= r)
    nested = add_nested_adapter(model, MatryoshkaConfig("nested-loss", r, ranks, "sqrt"), target_modules="all-linear", seed=0)
    gen = torch.Generator().manual_seed(0)
    n_rows = args.batch * args.block * args.blocks * 2
    rows = [{"input_ids": x.tolist(), "attention_mask": [1] * args.seq, "labels": x.tolist()}
            for x in torch.randint(3, PRESET["vocab_size"], (n_rows, args.seq), generator=gen)]
    collate = CompletionCollator(0)
    params = [p for p in nested.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def loop_block(start: int) -> list[float]:
        out = []
        for i in range(args.block):
            t0 = time.perf_counter()
            batch = collate(rows[(start + i) * args.batch : (start + i + 1) * args.batch])
            nested.train_diagonal(start + i)
            nested.model(**batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            out.append(time.perf_counter() - t0)
        return out[1:]

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.stamps: list[float] = []

        def on_step_end(self, a, state, control, **kw):
            self.stamps.append(time.perf_counter())

    def trainer_block() -> list[float]:
        clock = Clock()
        with tempfile.TemporaryDirectory() as out:
            targs = TrainingArguments(
                output_dir=out, per_device_train_batch_size=args.batch, max_steps=args.block + 1, learning_rate=1e-4,
                lr_scheduler_type="constant", max_grad_norm=1.0, report_to=[], save_strategy="no", disable_tqdm=True,
                remove_unused_columns=False, use_cpu=True, logging_steps=10, dataloader_drop_last=False,
            )
            tr = Trainer(model=nested.model, args=targs, train_dataset=rows, data_collator=collate, callbacks=[NestedRankCallback(nested), clock])
            tr.remove_callback(PrinterCallback)
            tr.remove_callback(ProgressCallback)
            tr.train()
        return [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]  # block steps after the first

    loop_block(0)  # warm-up
    trainer_block()
    times: dict[str, list[float]] = {"loop": [], "trainer": []}
    for i in range(args.blocks):
        for name in (("loop", "trainer") if i % 2 == 0 else ("trainer", "loop")):
            times[name] += loop_block(i * args.block) if name == "loop" else trainer_block()
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "params": sum(p.numel() for p in nested.model.parameters()),
        "rank": r, "batch": [args.batch, args.seq], "threads": torch.get_num_threads(), "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(), "median_s": med, "ratio_of_medians": med["trainer"] / med["loop"],
        "steps_measured": {k: len(v) for k, v in times.items()}, "times_s": times,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"model: Llama-shaped {result['params'] / 1e6:.1f} M params, all-linear nested-loss rank {r}, batch {args.batch}x{args.seq}, "
              f"{torch.get_num_threads()} threads, {len(times['loop'])}+{len(times['trainer'])} steps in alternating blocks")
        print(f"  plain loop step   median {med['loop'] * 1e3:8.1f} ms")
        print(f"  Trainer step      median {med['trainer'] * 1e3:8.1f} ms")
        print(f"  ratio of medians  {result['ratio_of_medians']:.3f}   (goal <= 1.10)")


if __name__ == "__main__":
    main()
