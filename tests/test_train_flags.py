"""The ``mlora-export train`` flags of a TRL/Axolotl user: gradient checkpointing, bf16, held-out
evaluation, report_to, checkpoints and resuming (bit for bit), warmup ratio, LoRA dropout, 4-bit
QLoRA. Each works, and each bad value is one line, exit 2, nothing written."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from mlora_export.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WORDS = ("cab", "fed", "hgi", "lkj", "onm", "rqp", "uts", "xwv")


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from mlora_export.demo.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("flags")
    build_tiny_model(root / "base", seed=0, hidden_size=32, intermediate_size=48)
    rows = [{"prompt": f"sort {w} =", "completion": " " + "".join(sorted(w))} for w in WORDS]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]), encoding="utf-8")
    return {"root": root, "base": root / "base", "data": root / "train.jsonl", "eval": root / "eval.jsonl"}


def _run(args: list[str]):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _train(task: dict[str, Path], out: Path, *extra: object, steps: int = 4):
    return _run(["train", "--base-model", task["base"], "--data", task["data"], "--ranks", "1,2,4", "--output", out,
                 "--max-steps", steps, "--batch-size", "4", "--lr", "0.02", "--json", *extra])


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def _max_diff(a: Path, b: Path) -> float:
    x, y = _weights(a), _weights(b)
    assert x.keys() == y.keys()
    return max(float((x[k] - y[k]).abs().max()) for k in x)


def _refused(res, *fragments: str) -> None:
    assert res.exit_code == 2, res.output
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def _nothing_written(parent: Path, *names: str) -> None:
    left = [p.name for p in parent.iterdir() if any(p.name == n or p.name.startswith(f".{n}.") or p.name == f"{n}-run" for n in names)]
    assert not left, left


@pytest.fixture(scope="module")
def plain(task: dict[str, Path]) -> Path:
    """4 steps with no extra flag: the reference the flags are compared with."""
    out = task["root"] / "plain"
    res = _train(task, out)
    assert res.exit_code == 0, res.output
    return out


def test_gradient_checkpointing_recomputes_layers_and_trains_the_same_adapter(task, plain, tmp_path, monkeypatch) -> None:
    from transformers.models.llama import modeling_llama

    calls = {"n": 0}
    forward = modeling_llama.LlamaMLP.forward  # inside a decoder layer (whose own forward transformers wraps)

    def counted(self, *args, **kwargs):
        calls["n"] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", counted)
    res = _train(task, tmp_path / "ckpt", "--gradient-checkpointing")
    with_ckpt, calls["n"] = calls["n"], 0
    res2 = _train(task, tmp_path / "nockpt")
    assert res.exit_code == 0 and res2.exit_code == 0, res.output + res2.output
    # 2 layers, 4 steps: each layer's MLP runs once per step, and again in the backward pass when checkpointed
    assert calls["n"] == 2 * 4 and with_ckpt == 2 * 4 * 2
    assert _max_diff(tmp_path / "ckpt", plain) < 1e-6


def test_bf16_autocasts_on_cpu_and_keeps_a_float32_adapter(task, plain, tmp_path) -> None:
    res = _train(task, tmp_path / "bf16", "--bf16")
    assert res.exit_code == 0, res.output
    w = _weights(tmp_path / "bf16")
    assert {v.dtype for v in w.values()} == {torch.float32}
    diff = _max_diff(tmp_path / "bf16", plain)
    assert 0 < diff < 0.05  # bfloat16 arithmetic: close to the float32 run, not equal to it
    _refused(_train(task, tmp_path / "f16", "--bf16", "--dtype", "float16"), "bf16", "float16", "--dtype")
    _nothing_written(tmp_path, "f16")


def test_eval_data_is_scored_at_the_eval_ranks_every_eval_steps(task, tmp_path) -> None:
    from mlora_export.base import load_base_model, load_tokenizer
    from mlora_export.data import load_dataset
    from mlora_export.training import heldout_loss, load_nested_adapter

    out = tmp_path / "ev"
    res = _train(task, out, "--eval-data", task["eval"], "--eval-steps", "2", "--eval-ranks", "1,4")
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert [(s, k) for s, k, _ in info["eval_losses"]] == [(2, 1), (2, 4), (4, 1), (4, 4)]
    # the last evaluation is the saved adapter's held-out loss at that rank
    tok = load_tokenizer(task["base"])
    feats = load_dataset(task["eval"], tok, 512)
    nested = load_nested_adapter(load_base_model(task["base"]), out)
    for _, k, loss in info["eval_losses"][2:]:
        nested.set_rank(k)
        assert loss == pytest.approx(heldout_loss(nested.model, feats, tok.pad_token_id), rel=1e-5)
    # default: at the end only, at the smallest, a middle and the largest train rank
    res = _train(task, tmp_path / "ev2", "--eval-data", task["eval"])
    assert [(s, k) for s, k, _ in json.loads(res.stdout)["eval_losses"]] == [(4, 1), (4, 2), (4, 4)]


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--eval-steps", "2"], ["evaluation data", "--eval-data"]),
        (["--eval-data", "EVAL", "--eval-steps", "0"], ["eval steps must be a positive integer", "--eval-steps"]),
        (["--eval-data", "EVAL", "--eval-ranks", "1,8"], ["eval ranks must be ranks in [1, 4]", "--eval-ranks"]),
        (["--eval-data", "MISSING"], ["does not exist"]),
        (["--save-steps", "0"], ["save steps must be a positive integer", "--save-steps"]),
        (["--warmup-ratio", "1.0"], ["warmup ratio must be a number in [0, 1)", "--warmup-ratio"]),
        (["--warmup-ratio", "0.2", "--warmup-steps", "1"], ["not both"]),
        (["--lora-dropout", "1.0"], ["dropout must be a number in [0, 1)"]),
        (["--lora-dropout", "-0.1"], ["dropout must be a number in [0, 1)"]),
        (["--eval-split", "test"], ["evaluation split needs evaluation data", "--eval-data"]),
        (["--run-dir", "RUN"], ["this run writes neither", "--run-dir"]),
        (["--report-to", "tensorboard", "--run-dir", "DATA"], ["overlaps the input", "--run-dir"]),
    ],
)
def test_bad_flag_values_exit_2_and_write_nothing(task, tmp_path, extra: list[str], fragments: list[str]) -> None:
    names = {"EVAL": str(task["eval"]), "MISSING": str(tmp_path / "nope.jsonl"), "RUN": str(tmp_path / "run"), "DATA": str(task["root"])}
    extra = [names.get(e, e) for e in extra]
    _refused(_train(task, tmp_path / "bad", *extra), *fragments)
    _nothing_written(tmp_path, "bad")


def test_report_to(task, tmp_path) -> None:
    for reporter, package in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
        installed = importlib.util.find_spec(package) is not None or (package == "tensorboard" and importlib.util.find_spec("tensorboardX"))
        if installed:
            continue
        _refused(_train(task, tmp_path / reporter, "--report-to", reporter), f"needs the {package} package", f"pip install {package}", "--report-to")
        _nothing_written(tmp_path, reporter)
    res = _train(task, tmp_path / "x", "--report-to", "mlflow")
    assert res.exit_code == 2 and "Invalid value for '--report-to'" in res.stderr
    if importlib.util.find_spec("tensorboard") is not None:  # the real TensorBoard writer, when installed
        res = _train(task, tmp_path / "tb", "--report-to", "tensorboard")
        assert res.exit_code == 0, res.output
        assert list((tmp_path / "tb-run").rglob("events.out.tfevents.*"))


def test_warmup_ratio_is_a_share_of_the_steps(task, plain, tmp_path) -> None:
    assert _train(task, tmp_path / "ratio", "--warmup-ratio", "0.5").exit_code == 0
    assert _train(task, tmp_path / "steps", "--warmup-steps", "2").exit_code == 0
    assert _max_diff(tmp_path / "ratio", tmp_path / "steps") == 0.0  # half of 4 steps is 2 steps
    assert _max_diff(tmp_path / "ratio", plain) > 1e-3


def test_lora_dropout_changes_training_reproducibly(task, plain, tmp_path) -> None:
    for name in ("d1", "d2"):
        assert _train(task, tmp_path / name, "--lora-dropout", "0.3").exit_code == 0
    assert _max_diff(tmp_path / "d1", tmp_path / "d2") == 0.0  # the seed fixes the dropout masks
    assert _max_diff(tmp_path / "d1", plain) > 1e-3


# -- checkpoints and resuming -------------------------------------------------------------------
def _settings(**kw):
    from mlora_export.training import TrainSettings

    return TrainSettings(train_ranks=(1, 2, 4), max_steps=6, batch_size=4, lr=0.02, save_steps=3, dropout=0.1, warmup_ratio=0.3, **kw)


def test_a_stopped_and_resumed_run_equals_an_uninterrupted_run_bit_for_bit(task, tmp_path) -> None:
    """6 steps, a checkpoint every 3, LoRA dropout (so the random state matters) and warmup: the run
    stops during step 5; resumed from checkpoint-3 it writes the adapter of the run that never stopped."""
    from mlora_export.training import RunOptions, train

    whole = tmp_path / "whole"
    res = _run(["train", "--base-model", task["base"], "--data", task["data"], "--ranks", "1,2,4", "--output", whole, "--max-steps", "6",
                "--batch-size", "4", "--lr", "0.02", "--save-steps", "3", "--lora-dropout", "0.1", "--warmup-ratio", "0.3",
                "--eval-data", task["eval"], "--eval-steps", "2", "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert [Path(c).name for c in info["checkpoints"]] == ["checkpoint-3", "checkpoint-6"]
    ckpt = tmp_path / "whole-run" / "checkpoint-3"
    assert not [p.name for p in ckpt.iterdir() if p.suffix in (".pt", ".pth", ".bin")]  # no pickle anywhere

    def stop(done: int, total: int) -> None:
        if done == 4:
            raise KeyboardInterrupt  # the run dies after step 4, whose checkpoint was never written

    stopped = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        train(task["base"], task["data"], stopped, _settings(), progress=stop)
    assert not stopped.exists() and [p.name for p in (tmp_path / "stopped-run").iterdir()] == ["checkpoint-3"]
    res = _run(["train", "--base-model", task["base"], "--data", task["data"], "--ranks", "1,2,4", "--output", stopped, "--max-steps", "6",
                "--batch-size", "4", "--lr", "0.02", "--save-steps", "3", "--lora-dropout", "0.1", "--warmup-ratio", "0.3",
                "--eval-data", task["eval"], "--eval-steps", "2", "--resume", tmp_path / "stopped-run" / "checkpoint-3", "--json"])
    assert res.exit_code == 0, res.output
    resumed = json.loads(res.stdout)
    a, b = _weights(whole), _weights(stopped)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["steps"] == 6 and resumed["resumed_from"].endswith("checkpoint-3")
    assert resumed["eval_losses"] == [e for e in info["eval_losses"] if e[0] > 3]
    # a resumption that skipped the random state would not be equal: the check above has teeth
    from mlora_export.training.trainer import nested_trainer_class

    trainer_cls = nested_trainer_class()
    original = trainer_cls._load_rng_state
    trainer_cls._load_rng_state = lambda self, c: None
    try:
        train(task["base"], task["data"], tmp_path / "norng", _settings(),
              RunOptions(resume=tmp_path / "stopped-run" / "checkpoint-3", run_dir=tmp_path / "norng-run"))
    finally:
        trainer_cls._load_rng_state = original
    assert _max_diff(tmp_path / "norng", whole) > 1e-5


def test_bad_resumptions_are_refused(task, tmp_path) -> None:
    from mlora_export.training import train

    def stop(done: int, total: int) -> None:
        if done == 4:  # step 3's checkpoint is written after its progress report
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(task["base"], task["data"], tmp_path / "r", _settings(), progress=stop)
    ckpt = tmp_path / "r-run" / "checkpoint-3"
    base_args = ["train", "--base-model", task["base"], "--data", task["data"], "--ranks", "1,2,4", "--max-steps", "6",
                 "--batch-size", "4", "--save-steps", "3", "--lora-dropout", "0.1", "--warmup-ratio", "0.3"]
    out = tmp_path / "out"
    # other settings, other data, not a checkpoint, an incomplete one, a missing folder
    _refused(_run([*base_args, "--lr", "0.05", "--output", out, "--resume", ckpt]), "lr 0.02", "this run has 0.05", "--resume")
    other = tmp_path / "other.jsonl"
    other.write_text(task["data"].read_text().replace("cab", "bac"), encoding="utf-8")
    _refused(_run([*base_args, "--lr", "0.02", "--data", other, "--output", out, "--resume", ckpt]), "data", "--resume")
    _refused(_run([*base_args, "--lr", "0.02", "--output", out, "--resume", task["base"]]), "not a checkpoint of mlora-export train")
    _refused(_run([*base_args, "--lr", "0.02", "--output", out, "--resume", tmp_path / "nope"]), "is not a folder")
    (ckpt / "mlora_checkpoint.json").rename(ckpt / "marker.json")
    _refused(_run([*base_args, "--lr", "0.02", "--output", out, "--resume", ckpt]), "incomplete checkpoint")
    (ckpt / "marker.json").rename(ckpt / "mlora_checkpoint.json")
    with pytest.MonkeyPatch.context() as mp:  # a launch of 2 processes (refused before any process group is set up)
        mp.setenv("WORLD_SIZE", "2")
        _refused(_run([*base_args, "--lr", "0.02", "--output", out, "--resume", ckpt]), "written by 1 process(es), this run has 2")
    _nothing_written(tmp_path, "out")
    # a run folder holding another run's checkpoints is not overwritten without --force
    res = _run([*base_args, "--lr", "0.02", "--output", tmp_path / "r2", "--run-dir", tmp_path / "r-run"])
    _refused(res, "already holds checkpoints", "--force")
    assert (ckpt / "mlora_checkpoint.json").exists()
    res = _run([*base_args, "--lr", "0.02", "--output", tmp_path / "r2", "--run-dir", tmp_path / "r-run", "--force"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "r-run").iterdir()) == ["checkpoint-3", "checkpoint-6"]
    _refused(_run([*base_args, "--lr", "0.02", "--output", tmp_path / "r3", "--run-dir", tmp_path / "r3"]), "run folder", "inside it")


# -- 4-bit QLoRA -----------------------------------------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed here")
def test_load_in_4bit_without_bitsandbytes_exits_2(task, tmp_path) -> None:
    _refused(_train(task, tmp_path / "q", "--load-in-4bit"), "needs bitsandbytes", "pip install bitsandbytes", "--load-in-4bit")
    _nothing_written(tmp_path, "q")


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_load_in_4bit_trains_a_qlora_adapter_that_loads_on_the_plain_base(task, tmp_path) -> None:
    from transformers.integrations.bitsandbytes import validate_bnb_backend_availability

    if not validate_bnb_backend_availability():
        _refused(_train(task, tmp_path / "q", "--load-in-4bit"), "load_in_4bit", "none of which this machine has")
        return
    res = _train(task, tmp_path / "q", "--load-in-4bit")
    assert res.exit_code == 0, res.output
    from peft import PeftModel

    from mlora_export.base import load_base_model

    w = _weights(tmp_path / "q")
    assert {v.dtype for v in w.values()} == {torch.float32}
    assert max(float(v.abs().max()) for k, v in w.items() if "lora_B" in k) > 1e-4  # it trained
    model = PeftModel.from_pretrained(load_base_model(task["base"]), str(tmp_path / "q"))  # a plain LoRA on the unquantised base
    assert model(input_ids=torch.tensor([[1, 5, 6, 7]])).logits.isfinite().all()
