"""Training on sharded engines through ``accelerate launch`` (2 processes, CPU, gloo): FSDP2
``fully_shard`` and DeepSpeed ZeRO-2/ZeRO-3 give the nested adapter that one process with the same
global batch gives, saved whole (the LoRA factors gathered, never shards), and a Trainer checkpoint
written mid-run resumes to the uninterrupted result.

accelerate sets up FSDP only on accelerator devices (on CPU it runs an FSDP config as DDP), so the
runs go through tests/launch/cpu_accelerate.py, which lifts that one gate (and keeps DeepSpeed
from JIT-building its CPU shared-memory op: gloo does its collectives instead). Each run records the engine that held its parameters, so a
silent fallback to DDP fails the test. Tolerance: the 1-process run is float32 with the same
global batch; observed max difference ≈ 3e-7 (reduction order), asserted rtol 1e-4, atol 1e-5.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.common import launch_env, sort_train_args, write_sort_task

LAUNCH = Path(__file__).parent / "launch"

_COMMON = """compute_environment: LOCAL_MACHINE
num_processes: 2
num_machines: 1
machine_rank: 0
mixed_precision: 'no'
main_training_function: main
"""

#: accelerate configs as `accelerate config` writes them (FSDP2: decoder layers wrapped, FULL_SHARD).
CONFIGS = {
    "fsdp2": _COMMON + """distributed_type: FSDP
use_cpu: true
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer
  fsdp_reshard_after_forward: true
  fsdp_state_dict_type: SHARDED_STATE_DICT
  fsdp_cpu_ram_efficient_loading: false
""",
    "zero2": _COMMON + """distributed_type: DEEPSPEED
deepspeed_config:
  zero_stage: 2
  gradient_accumulation_steps: 2
  gradient_clipping: 1.0
  offload_optimizer_device: none
  offload_param_device: none
  zero3_init_flag: false
""",
    "zero3": _COMMON + """distributed_type: DEEPSPEED
deepspeed_config:
  zero_stage: 3
  gradient_accumulation_steps: 2
  gradient_clipping: 1.0
  offload_optimizer_device: none
  offload_param_device: none
  zero3_init_flag: false
  zero3_save_16bit_model: false
""",
}

#: What each config must end up as (read from the parameters: a fallback to DDP fails).
ENGINES = {"fsdp2": "fsdp2", "zero2": "deepspeed", "zero3": "deepspeed-zero3"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    s = write_sort_task(tmp_path_factory.mktemp("sharded"))
    for name, text in CONFIGS.items():
        (s["root"] / f"{name}.yaml").write_text(text, encoding="utf-8")
    return s


def _launch(setup: dict[str, Path], engine: str, *program: str, timeout: int = 480) -> subprocess.CompletedProcess[str]:
    """``accelerate launch --config_file <engine>.yaml tests/launch/cpu_accelerate.py PROGRAM``."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(setup["root"] / f"{engine}.yaml"),
           "--main_process_port", "0", str(LAUNCH / "cpu_accelerate.py"), *program]
    proc = subprocess.run(cmd, env=launch_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return proc


_single: dict[str, Path] = {}


def _one_process(setup: dict[str, Path], method: str) -> Path:
    """The 1-process run with the same global batch (8 × 2 micro-batches), once per method per module."""
    if method not in _single:
        out = setup["root"] / f"one-{method}"
        proc = subprocess.run([sys.executable, "-m", "mlora_export", *sort_train_args(setup, out, batch=8, method=method)],
                              env=launch_env(), capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert json.loads(proc.stdout)["engine"] == "single"
        _single[method] = out
    return _single[method]


def _assert_same_adapter(got: Path, want: Path, *, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    a = load_file(str(got / "adapter_model.safetensors"))
    b = load_file(str(want / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape, key  # whole factors, not a shard
        torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol)
    assert max(float(v.abs().max()) for k, v in a.items() if "lora_B" in k) > 1e-3  # it trained (lora_B starts at 0)


@pytest.mark.parametrize(
    ("engine", "method"),
    [("fsdp2", "nested-loss"), ("fsdp2", "dylora"), ("zero2", "dylora"), ("zero3", "nested-loss")],
)
def test_sharded_run_equals_one_process(setup: dict[str, Path], engine: str, method: str) -> None:
    if engine.startswith("zero"):
        pytest.importorskip("deepspeed")
    root = setup["root"] / f"{engine}-{method}"
    root.mkdir()
    proc = _launch(setup, engine, *sort_train_args(setup, root / "out", batch=4, method=method))
    info = json.loads(proc.stdout[proc.stdout.index("{"):proc.stdout.rindex("}") + 1])  # printed once, by the main process
    assert proc.stdout.count('"world_size"') == 1 and info["world_size"] == 2 and info["steps"] == 6
    assert info["engine"] == ENGINES[engine]
    assert not [p.name for p in root.iterdir() if p.name.startswith(".out.")]  # no temp folder left behind
    _assert_same_adapter(root / "out", _one_process(setup, method))
    cfg = json.loads((root / "out" / "matryoshka_config.json").read_text())
    assert cfg["method"] == method and cfg["training"]["batch_size"] == 16


def test_fsdp2_trainer_checkpoint_resumes_to_the_uninterrupted_run(setup: dict[str, Path]) -> None:
    """Python API + stock Trainer under FSDP2: 6 steps with a (sharded) checkpoint at step 3; a fresh
    2-process run resumed from that checkpoint runs steps 3–5 only and saves the same adapter."""
    root = setup["root"] / "resume"
    script = ["--script", str(LAUNCH / "resume_trainer.py"), str(setup["base"]), str(setup["data"])]
    _launch(setup, "fsdp2", *script, str(root / "ckpt"), str(root / "full"), "nested-loss", timeout=300)
    _launch(setup, "fsdp2", *script, str(root / "ckpt2"), str(root / "resumed"), "nested-loss", str(root / "ckpt" / "checkpoint-3"), timeout=300)
    assert json.loads((root / "full" / "steps.json").read_text()) == [0, 1, 2, 3, 4, 5]
    assert json.loads((root / "resumed" / "steps.json").read_text()) == [3, 4, 5]
    # the same computation in the same order: observed bit-identical
    _assert_same_adapter(root / "resumed", root / "full", rtol=0, atol=1e-6)


def test_gather_from_torch_fsdp1_and_fsdp2() -> None:
    """torch's own FSDP1 and FSDP2 on 2 processes: the LoRA factors are sharded, and ``factors()``
    returns them whole and bit-identical on the main process (nothing on the other)."""
    root = Path(__file__).resolve().parent.parent
    env = {**launch_env(), "PYTHONPATH": os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(LAUNCH / "fsdp_gather.py")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=root)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "fsdp1: 14 modules gathered whole" in proc.stdout and "fsdp2: 14 modules gathered whole" in proc.stdout


def test_engine_and_names_of_a_single_process_model() -> None:
    from mlora_export.adapter import MatryoshkaConfig
    from mlora_export.training import add_nested_adapter
    from mlora_export.training.distributed import engine_of, module_name
    from tests.common import build_model

    nested = add_nested_adapter(build_model("llama"), MatryoshkaConfig("dylora", 4, (1, 2, 4)))
    assert engine_of(nested.model) == "single"
    assert module_name("base_model.model.model.layers.0._fsdp_wrapped_module._checkpoint_wrapped_module.self_attn.q_proj") == \
        "model.layers.0.self_attn.q_proj"
    assert list(nested.factors(main_only=True)) == nested.module_names  # one process is the main one


def test_a_shard_is_refused_not_written(tmp_path: Path) -> None:
    """Factors that are still shards (FSDP flattens and splits them) never reach the disk."""
    from mlora_export.adapter import MatryoshkaConfig
    from mlora_export.errors import ExportError
    from mlora_export.training import add_nested_adapter
    from tests.common import build_model

    nested = add_nested_adapter(build_model("llama"), MatryoshkaConfig("dylora", 4, (1, 2, 4)))
    factors = nested.factors()
    name = next(iter(factors))
    a, b = factors[name]
    factors[name] = (a[:2], b)  # half of A's rows, as a 2-way shard on dim 0 holds
    with pytest.raises(ExportError, match=name) as err:
        nested.save(tmp_path / "out", factors=factors)
    assert "gathered" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_cpu_training_args_follow_the_launch_config(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from mlora_export.training.distributed import cpu_training_args

    for key in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(key, raising=False)
    assert cpu_training_args(True) == {"use_cpu": False}
    assert cpu_training_args(False) == {"use_cpu": True}
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert cpu_training_args(False) == {"use_cpu": False, "ddp_backend": "gloo"}  # accelerate skips DeepSpeed under use_cpu
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with caplog.at_level("WARNING", logger="mlora_export.training.distributed"):
        assert cpu_training_args(False) == {"use_cpu": True}
    assert "plain DDP" in caplog.text
