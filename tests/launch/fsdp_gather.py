"""Gather a nested adapter's LoRA factors from a model sharded by torch's own FSDP1
(``FullyShardedDataParallel``, decoder layers wrapped) and FSDP2 (``fully_shard``), on CPU with gloo,
and compare them with the factors before sharding. Run by tests/test_sharded.py under ``torchrun``.

FSDP1 is tested here without accelerate, whose FSDP1 plugin refuses a CPU-only host.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist


def main() -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from mlora_export.adapter import MatryoshkaConfig
    from mlora_export.training import add_nested_adapter
    from mlora_export.training.distributed import engine_of
    from tests.common import build_model, randomise_lora_b

    dist.init_process_group("gloo")
    nested = add_nested_adapter(build_model("llama"), MatryoshkaConfig("nested-loss", 8, (1, 2, 4, 8)), seed=3)
    randomise_lora_b(nested)
    want = nested.factors()
    one = copy.deepcopy(nested.model)
    two = copy.deepcopy(nested.model)

    FSDP(one, auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}), device_id=torch.device("cpu"), use_orig_params=True)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in two.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(two, mesh=mesh)

    for name, model, engine in (("fsdp1", one, "fsdp1"), ("fsdp2", two, "fsdp2")):
        if engine_of(model) != engine:
            raise SystemExit(f"{name}: engine_of says {engine_of(model)}")
        local = {n: tuple(p.to_local().shape if hasattr(p, "to_local") else p.shape) for n, p in model.named_parameters() if "lora_A" in n}
        if all(s == (8, 32) for s in local.values()):
            raise SystemExit(f"{name}: the LoRA factors are not sharded: {local}")
        handle = copy.copy(nested)
        handle.model = model
        got = handle.factors(main_only=True)
        if dist.get_rank() != 0:
            if got:
                raise SystemExit(f"{name}: a non-main process kept factors")
            continue
        if got.keys() != want.keys():
            raise SystemExit(f"{name}: modules {sorted(got)[:3]} != {sorted(want)[:3]}")
        for key, (a, b) in want.items():
            torch.testing.assert_close(got[key][0], a, rtol=0, atol=0)
            torch.testing.assert_close(got[key][1], b, rtol=0, atol=0)
        print(f"{name}: {len(got)} modules gathered whole")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
