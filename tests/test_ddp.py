"""Training past one process: ``torchrun --nproc_per_node 2`` (CPU, gloo) running the unchanged
``mlora-export train`` gives the same nested adapter as one process with the same global batch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.common import launch_env, sort_train_args, write_sort_task

pytestmark = pytest.mark.slow  # end-to-end: see tests/conftest.py

@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_sort_task(tmp_path_factory.mktemp("ddp"))


#: the recipe options at once: per-rank loss and loss-aware sampling need the step's per-rank
#: token counts and losses summed over the processes, the curriculum the run's steps, LoRA+ its groups
RECIPE = ["--per-rank-loss", "--loss-aware-ranks", "0.5", "--rank-curriculum", "0.5", "--lora-plus-ratio", "4", "--a-init", "paper"]


@pytest.mark.parametrize("case", ["dylora", "nested-loss", "nested-loss-recipe"])
def test_two_process_ddp_equals_one_process(setup: dict[str, Path], case: str) -> None:
    method = case.removesuffix("-recipe")
    extra = RECIPE if case.endswith("-recipe") else []
    root = setup["root"] / case
    root.mkdir()
    env = launch_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "mlora_export",
           *sort_train_args(setup, root / "ddp", batch=4, method=method), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    info = json.loads(proc.stdout[proc.stdout.index("{"):])  # printed once, by the main process
    assert proc.stdout.count('"world_size"') == 1 and info["world_size"] == 2 and info["steps"] == 6
    assert not [p.name for p in root.iterdir() if p.name.startswith(".ddp.")]  # no temp folder left behind

    single = subprocess.run([sys.executable, "-m", "mlora_export", *sort_train_args(setup, root / "one", batch=8, method=method), *extra],
                            env=env, capture_output=True, text=True, timeout=240)
    assert single.returncode == 0, single.stderr[-4000:]
    assert json.loads(single.stdout)["world_size"] == 1

    a = load_file(str(root / "ddp" / "adapter_model.safetensors"))
    b = load_file(str(root / "one" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    # the runs really trained (lora_B starts at zero)
    assert max(float(v.abs().max()) for k, v in a.items() if "lora_B" in k) > 1e-3
    assert json.loads((root / "ddp" / "matryoshka_config.json").read_text())["method"] == method


def test_two_process_run_resumed_from_a_checkpoint_equals_the_uninterrupted_run(setup: dict[str, Path]) -> None:
    """DDP checkpoints (one random state per process, safetensors and JSON only): resuming from
    checkpoint-3 under torchrun writes the adapter of the run that went on, bit for bit."""
    import shutil

    root = setup["root"] / "resume"
    root.mkdir()
    env = launch_env()
    extra = ["--save-steps", "3", "--lora-dropout", "0.1"]
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "mlora_export"]
    proc = subprocess.run([*run, *sort_train_args(setup, root / "whole", batch=4, method="nested-loss"), *extra],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ckpt = root / "whole-run" / "checkpoint-3"
    assert sorted(p.name for p in ckpt.glob("rng_state_*")) == ["rng_state_0.json", "rng_state_0.safetensors", "rng_state_1.json", "rng_state_1.safetensors"]
    assert not [p.name for p in ckpt.iterdir() if p.suffix in (".pt", ".pth", ".bin")]
    # a run stopped after step 4 left exactly this checkpoint-3 behind
    shutil.copytree(ckpt, root / "stopped-run" / "checkpoint-3")
    proc = subprocess.run([*run, *sort_train_args(setup, root / "stopped", batch=4, method="nested-loss"), *extra,
                           "--resume", str(root / "stopped-run" / "checkpoint-3")], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    a = load_file(str(root / "whole" / "adapter_model.safetensors"))
    b = load_file(str(root / "stopped" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
