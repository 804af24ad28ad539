"""Two processes (torchrun, gloo) run packed micro-batches with different numbers of sequences
through a ``nested-loss`` model and write the ranks each was given (tests/test_packing.py).

Usage: packed_ranks.py OUTPUT_JSON
"""

from __future__ import annotations

import sys


def main(output: str) -> None:
    import json

    import torch
    import torch.distributed as dist

    from mlora_export.adapter import MatryoshkaConfig
    from mlora_export.training import add_nested_adapter
    from tests.common import build_model

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = build_model("llama").train()
    model.config.use_cache = False
    nested = add_nested_adapter(model, MatryoshkaConfig("nested-loss", 8, (1, 2, 4, 8)), seed=5)
    counts = {0: (3, 1), 1: (2, 4)}[rank]  # sequences per micro-batch on this process
    nested.train_diagonal(step=4)
    got = []
    for count in counts:
        lengths = [3 + i for i in range(count)]
        ids = torch.randint(3, 96, (1, sum(lengths)))
        pos = torch.cat([torch.arange(n) for n in lengths])[None]
        with torch.no_grad():
            nested.model(input_ids=ids, position_ids=pos)
        got.append(nested.last_example_ranks)
    everyone: list = [None, None]
    dist.all_gather_object(everyone, got)
    if rank == 0:
        with open(output, "w", encoding="utf-8") as fh:
            json.dump({str(i): v for i, v in enumerate(everyone)}, fh)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
