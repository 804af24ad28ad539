"""Training past one process: ``torchrun --nproc_per_node 2`` (CPU, gloo) running the unchanged
``mlora-export train`` gives the same nested adapter as one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # end-to-end: see tests/conftest.py

@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from mlora_export.demo.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("ddp")
    build_tiny_model(root / "base", seed=0, hidden_size=32, intermediate_size=48)
    rows = [{"prompt": f"sort {w} =", "completion": " " + "".join(sorted(w))}
            for w in ("cab", "fed", "hgi", "lkj", "onm", "rqp", "uts", "xwv", "bca", "edf", "gih", "jlk", "mon", "pqr", "tsu", "wxv")] * 8
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return {"root": root, "base": root / "base", "data": root / "train.jsonl"}


def _train_args(s: dict[str, Path], out: Path, batch: int, method: str) -> list[str]:
    # dylora: the sampled rank must agree across processes; nested-loss: each example's rank must be
    # that of its position in the global batch, whichever process runs it; or the two runs diverge
    return [
        "train", "--base-model", str(s["base"]), "--data", str(s["data"]), "--ranks", "1,2,4,8", "--method", method,
        "--output", str(out), "--max-steps", "6", "--batch-size", str(batch), "--grad-accum", "2", "--lr", "0.02",
        "--seed", "3", "--json",
    ]


@pytest.mark.parametrize("method", ["dylora", "nested-loss"])
def test_two_process_ddp_equals_one_process(setup: dict[str, Path], method: str) -> None:
    root = setup["root"] / method
    root.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "MLORA_DEBUG": "1"}
    env.pop("LOCAL_RANK", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "mlora_export",
           *_train_args(setup, root / "ddp", batch=4, method=method)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    info = json.loads(proc.stdout[proc.stdout.index("{"):])  # printed once, by the main process
    assert proc.stdout.count('"world_size"') == 1 and info["world_size"] == 2 and info["steps"] == 6
    assert not [p.name for p in root.iterdir() if p.name.startswith(".ddp.")]  # no temp folder left behind

    single = subprocess.run([sys.executable, "-m", "mlora_export", *_train_args(setup, root / "one", batch=8, method=method)],
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
