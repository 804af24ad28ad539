"""``mlora-export train`` and ``mlora-export demo`` through the CLI: a good run, and every bad input
(exit code 2, one clear message, nothing written)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlora_export.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mlora_export.demo.tiny import build_tiny_model

    path = tmp_path_factory.mktemp("cli") / "base"
    build_tiny_model(path, seed=0, hidden_size=32, intermediate_size=48)
    return path


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    p = tmp_path / "train.jsonl"
    rows = [{"prompt": f"sort {w} =", "completion": " " + "".join(sorted(w))} for w in ("cab", "fed", "hgi", "lkj", "onm", "rqp", "uts", "xwv")]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return p


def _run(args: list[str]):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def _args(base: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--base-model", str(base), "--data", str(data), "--ranks", "1,2,4", "--output", str(out), "--max-steps", "3", "--batch-size", "4", *extra]


def _nothing_written(parent: Path, out: Path) -> None:
    assert not out.exists()
    assert not [p.name for p in parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no temp siblings left


def test_train_cli_writes_a_nested_adapter(base: Path, data: Path, tmp_path: Path) -> None:
    from transformers.utils import logging as hf_logging

    from mlora_export.adapter import NestedAdapter

    out = tmp_path / "nested"
    bars_before = hf_logging.is_progress_bar_enabled()
    res = _run(_args(base, data, out, "--method", "dylora", "--scaling", "rank", "--alpha", "2", "--target-modules", "q_proj,v_proj", "--json"))
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert hf_logging.is_progress_bar_enabled() == bars_before  # transformers' bars hidden during the run only
    assert info["steps"] == 3 and info["method"] == "dylora" and info["train_ranks"] == [1, 2, 4] and info["world_size"] == 1
    adapter = NestedAdapter.load(out)
    assert adapter.config.method == "dylora" and adapter.config.scaling == "rank" and adapter.config.alpha == 2.0
    assert {n.rsplit(".", 1)[-1] for n in adapter.modules} == {"q_proj", "v_proj"}
    # --force replaces; without it, exit 2 and the old adapter stays
    before = (out / "adapter_model.safetensors").read_bytes()
    res = _run(_args(base, data, out))
    assert res.exit_code == 2 and "already exists" in res.stderr and "--force" in res.stderr
    assert (out / "adapter_model.safetensors").read_bytes() == before
    res = _run(_args(base, data, out, "--force", "--method", "lora"))
    assert res.exit_code == 0, res.output
    assert "wrote" in res.stdout and NestedAdapter.load(out).config.method == "lora"
    # the default method is nested-loss; --rank-weights is recorded, normalised; --threads sets torch's
    # thread count for the run only
    import torch

    before = torch.get_num_threads()
    seen: list[int] = []
    from mlora_export.training import pipeline as finetune

    real = finetune.train

    def spy(*a, **k):
        seen.append(torch.get_num_threads())
        return real(*a, **k)

    finetune.train = spy
    try:
        res = _run(_args(base, data, out, "--force", "--rank-weights", "1,1,2", "--threads", "3", "--json"))
    finally:
        finetune.train = real
    assert seen == [3] and torch.get_num_threads() == before
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["method"] == "nested-loss"
    cfg = NestedAdapter.load(out).config
    assert cfg.method == "nested-loss" and cfg.rank_weights == pytest.approx((0.25, 0.25, 0.5))


def test_train_cli_recipe_flags_train_and_are_recorded(base: Path, data: Path, tmp_path: Path) -> None:
    """Every recipe flag at once, with gradient accumulation: the run trains and the adapter records the recipe."""
    from mlora_export.adapter import NestedAdapter

    out = tmp_path / "recipe"
    res = _run(_args(base, data, out, "--lora-plus-ratio", "16", "--rank-curriculum", "0.5", "--per-rank-loss", "--a-init", "paper",
                     "--loss-aware-ranks", "0.3", "--grad-accum", "2", "--batch-size", "2", "--json"))
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["steps"] == 3 and all(math.isfinite(loss) for _, loss in info["losses"] or [(0, info["final_loss"])])
    training = NestedAdapter.load(out).config.extra["training"]
    assert training["recipe"] == {"lora_plus_ratio": 16.0, "rank_curriculum": 0.5, "per_rank_loss": True, "a_init": "paper", "loss_aware_ranks": 0.3}
    assert "recipe" not in NestedAdapter.load(_train_default(base, data, tmp_path)).config.extra["training"]


def _train_default(base: Path, data: Path, tmp_path: Path) -> Path:
    out = tmp_path / "default"
    res = _run(_args(base, data, out))
    assert res.exit_code == 0, res.output
    return out


def _bad_json(tmp: Path) -> Path:
    p = tmp / "bad.jsonl"
    p.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n', encoding="utf-8")
    return p


def _missing_key(tmp: Path) -> Path:
    p = tmp / "keys.jsonl"
    p.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n', encoding="utf-8")
    return p


def _bin_only(tmp: Path) -> Path:
    d = tmp / "binbase"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "llama"}', encoding="utf-8")
    (d / "pytorch_model.bin").write_bytes(b"\x80\x02not a real pickle")
    return d


@pytest.mark.parametrize(
    "case, expect",
    [
        ("missing-data", "does not exist"),
        ("bad-json", "line 2: not valid JSON"),
        ("missing-key", "line 2: has prompt but no 'completion'"),
        ("missing-base", "base model folder"),
        ("bin-only-base", "only pickle weights (pytorch_model.bin)"),
        ("max-rank-not-trained", "max rank 8 is not among the train ranks"),
        ("rank-zero", "rank 0 in '0,4' must be at least 1"),
        ("unknown-method", "'sft' is not one of"),
        ("unknown-scaling", "'log' is not one of"),
        ("bad-steps", "max steps must be a positive integer"),
        ("bad-batch", "batch size must be a positive integer, got 0"),
        ("bad-lr", "learning rate must be a positive number, got -0.1"),
        ("empty-data", "has no examples"),
        ("too-short", "no example keeps a completion token within max length 4"),
        ("target-nothing", "match no Linear or Conv1D layer"),
        ("target-embedding", "not nn.Linear or Conv1D: model.embed_tokens (Embedding)"),
        ("weights-count", "2 rank weights for 3 train ranks"),
        ("weights-text", "'1,x,1' is not a comma-separated list of numbers"),
        ("weights-negative", "rank weight -1.0 is not a finite non-negative number"),
        ("weights-other-method", "rank weights apply to method 'nested-loss' only"),
        ("svd-method", "'svd' is not one of"),
        ("threads-zero", "0 is not in the range x>=1"),
        ("lora-plus-zero", "Invalid value for '--lora-plus-ratio': 0.0 is not in the range x>0"),
        ("curriculum-range", "Invalid value for '--rank-curriculum': 1.5 is not in the range 0<=x<=1"),
        ("loss-aware-range", "Invalid value for '--loss-aware-ranks': 2.0 is not in the range 0<=x<=1"),
        ("per-rank-other-method", "per_rank_loss apply to method 'nested-loss' only (per-example ranks), not 'lora' (see --per-rank-loss)"),
        ("unknown-a-init", "'xavier' is not one of"),
    ],
)
def test_train_cli_bad_input_exit_2_nothing_written(case: str, expect: str, base: Path, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    b, d, extra = base, data, []
    if case == "missing-data":
        d = tmp_path / "nope.jsonl"
    elif case == "bad-json":
        d = _bad_json(tmp_path)
    elif case == "missing-key":
        d = _missing_key(tmp_path)
    elif case == "missing-base":
        b = tmp_path / "no-model"
    elif case == "bin-only-base":
        b = _bin_only(tmp_path)
    elif case == "empty-data":
        d = tmp_path / "empty.jsonl"
        d.write_text("\n\n", encoding="utf-8")
    args = _args(b, d, out)
    if case == "max-rank-not-trained":
        args += ["--max-rank", "8"]
    elif case == "rank-zero":
        args[args.index("--ranks") + 1] = "0,4"
    elif case == "unknown-method":
        args += ["--method", "sft"]
    elif case == "unknown-scaling":
        args += ["--scaling", "log"]
    elif case == "bad-steps":
        args[args.index("--max-steps") + 1] = "0"
    elif case == "bad-batch":
        args[args.index("--batch-size") + 1] = "0"
    elif case == "bad-lr":
        args += ["--lr", "-0.1"]
    elif case == "too-short":
        args += ["--max-length", "4"]
    elif case == "target-nothing":
        args += ["--target-modules", "nothing"]
    elif case == "target-embedding":
        args += ["--target-modules", "embed_tokens,q_proj"]
    elif case == "weights-count":
        args += ["--rank-weights", "1,2"]
    elif case == "weights-text":
        args += ["--rank-weights", "1,x,1"]
    elif case == "weights-negative":
        args += ["--rank-weights", "1,-1,1"]
    elif case == "weights-other-method":
        args += ["--rank-weights", "1,1,1", "--method", "dylora"]
    elif case == "svd-method":
        args += ["--method", "svd"]
    elif case == "threads-zero":
        args += ["--threads", "0"]
    elif case == "lora-plus-zero":
        args += ["--lora-plus-ratio", "0"]
    elif case == "curriculum-range":
        args += ["--rank-curriculum", "1.5"]
    elif case == "loss-aware-range":
        args += ["--loss-aware-ranks", "2"]
    elif case == "per-rank-other-method":
        args += ["--per-rank-loss", "--method", "lora"]
    elif case == "unknown-a-init":
        args += ["--a-init", "xavier"]
    res = _run(args + extra)
    assert res.exit_code == 2, res.output
    assert expect in res.stderr, res.stderr
    assert "Traceback" not in res.output
    if not case.startswith(("rank-zero", "unknown", "weights-text", "svd", "threads")):  # click usage errors print usage + one error line
        assert res.stderr.count("\n") == 1 and res.stderr.startswith("error:"), res.stderr  # one line, no bars
    assert res.stdout == ""
    _nothing_written(tmp_path, out)


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    res = _run(["demo", str(out), "--quick"])
    assert res.exit_code == 0, res.output
    text = res.stdout
    assert "[train]" in text and "[renest]" in text and "[slice]" in text and "[evaluate]" in text and "held-out loss" in text
    assert "nested-loss adapter, max rank 16" in text  # the default method
    assert "ranks beat the base on held-out loss" in text and "exact match" in text and "re-nested plain LoRA (SVD)" in text
    for sub in ("base/model.safetensors", "base/tokenizer.json", "nested/matryoshka_config.json", "slices/r2/adapter_config.json",
                "slices/r8/adapter_model.safetensors", "lora/adapter_model.safetensors", "renested/matryoshka_config.json"):
        assert (out / sub).is_file(), sub
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".demo.")]
    # what the outputs record names the folder the user got, never the temporary one it was written in
    leaks = [str(f.relative_to(out)) for f in out.rglob("*.json") if f"{os.sep}.demo." in f.read_text(encoding="utf-8")]
    assert not leaks, leaks
    slice_cfg = json.loads((out / "slices" / "r2" / "matryoshka_config.json").read_text())
    assert slice_cfg["source"]["path"] == str((out / "nested").absolute())
    # every stage ran, and what the outputs point at exists after the final rename
    for name in ("merge", "onnx", "gguf", "genai", "bundle"):
        assert f"[{name}]" in text
    assert (out / "gguf" / "r8.gguf").is_file() and (out / "bundle" / "r8" / "adapter.gguf").is_file()
    assert json.loads((out / "base" / "tokenizer.json").read_text())["model"]["type"] == "BPE"  # a format llama.cpp and GenAI read
    assert "greedy tokens equal transformers + the PEFT slice at every rank" in text  # onnxruntime-genai is in the test extra
    recorded = json.loads((out / "nested" / "matryoshka_config.json").read_text())["base_model"]
    assert Path(recorded) == (out / "base").resolve()
    assert json.loads((out / "slices/r8/adapter_config.json").read_text())["base_model_name_or_path"] == recorded
    # again without --force: exit 2, nothing touched
    res = _run(["demo", str(out), "--quick"])
    assert res.exit_code == 2 and "already exists" in res.stderr


@pytest.mark.slow
def test_demo_json_rows_show_every_rank_and_slices_match(tmp_path: Path) -> None:
    from mlora_export.demo import STAGES, run_demo

    stages = [s for s in STAGES if s.name in ("base", "train", "slice", "evaluate")]
    result = run_demo(tmp_path / "d", quick=True, stages=stages)
    ranks = result.to_dict()["stages"][-1]["data"]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1, 2, 4, 8, 16]
    assert all(r["loss"] < ranks[0]["loss"] for r in ranks[1:])
    assert all(0.0 <= r["exact_match"] <= 1.0 and r["renested_loss"] is None for r in ranks)
    for r in ranks:
        if r["slice_loss"] is not None:  # plain PEFT on the slice == the nested adapter at that rank
            assert r["slice_loss"] == pytest.approx(r["loss"], rel=1e-5)


def _row(k: int, loss: float, em: float, svd_em: float | None = None) -> dict:
    return {"rank": k, "loss": loss, "exact_match": em, "renested_exact_match": svd_em}


def test_demo_verdict_is_computed_from_the_table() -> None:
    """The closing lines follow the numbers: a rank that does not beat the base is named, never hidden."""
    from mlora_export.demo import demo_verdict

    good = [_row(0, 5.0, 0.0, 0.0), _row(1, 3.0, 0.2, 0.1), _row(2, 2.0, 0.5, 0.4), _row(4, 1.0, 0.9, 0.8)]
    lines = demo_verdict(good, "nested-loss")
    assert lines[0].startswith("nested-loss: 3/3 ranks beat the base on held-out loss, 3/3 on exact match (base 0.0%; best rank 4: 90.0%")
    assert lines[1] == "every trained rank beats the base on both measures (which is not the same as good enough: evaluate on your task before deploying)"
    assert lines[2].startswith("re-nested plain LoRA (SVD): AURAC v2 ")
    bad = [_row(0, 5.0, 0.1), _row(1, 6.0, 0.0), _row(2, 4.0, 0.1), _row(4, 1.0, 0.9)]
    lines = demo_verdict(bad, "matryoshka")
    assert "1/3 ranks beat the base on held-out loss" not in lines[0] and "2/3 ranks beat the base on held-out loss, 1/3 on exact match" in lines[0]
    assert lines[1] == "warning: rank(s) 1, 2 do not beat the base here; evaluate before deploying them"
    assert len(lines) == 2  # no re-nested numbers, no line about them


def test_demo_model_choice_and_an_unknown_model(tmp_path: Path) -> None:
    """``--model`` offers every demo model; an unknown one is refused (exit 2 from the CLI, ConfigError from
    the library) before anything is written."""
    from mlora_export.demo import DEMO_MODELS, run_demo
    from mlora_export.errors import ConfigError

    res = _run(["demo", "--help"])
    assert all(name in res.stdout for name in DEMO_MODELS)
    out = tmp_path / "d"
    res = _run(["demo", str(out), "--model", "nope"])
    assert res.exit_code == 2 and "nope" in res.stderr
    with pytest.raises(ConfigError, match="unknown demo model 'nope'") as e:
        run_demo(out, model="nope")
    assert e.value.option == "model"
    _nothing_written(tmp_path, out)


def test_demo_base_stage_and_a_stage_a_model_skips(tmp_path: Path) -> None:
    """The builtin base stage copies the package's pre-trained base and says what it knows; a stage the demo
    model skips is reported in its place with the reason, and does nothing."""
    import dataclasses

    from mlora_export.demo import DEMO_MODELS, STAGES, pretrained_base_dir, run_demo

    model = dataclasses.replace(DEMO_MODELS["builtin"], name="no-train", skip=(("train", "not on this model"),))
    stages = [s for s in STAGES if s.name in ("base", "train")]
    result = run_demo(tmp_path / "d", model=model, stages=stages)
    (_, base), (_, train) = result.reports
    assert "558,720 parameters" in base.lines[0] and "rare ~" in base.lines[1] and base.data["base_exact_match"]["rare ~"] > 0.3
    assert (tmp_path / "d" / "base" / "model.safetensors").read_bytes() == (pretrained_base_dir() / "model.safetensors").read_bytes()
    assert train.lines == ["skipped on no-train: not on this model"] and train.data == {"skipped": True, "reason": "not on this model"}
    assert not (tmp_path / "d" / "nested").exists()


def test_the_real_model_task_ships_as_conversations() -> None:
    """``--model smollm2``'s task: conversations (user question, assistant answer) with held-out countries
    never trained on; evaluation renders them with the chat template and generates after its generation
    prompt, the reference being the assistant's answer."""
    from mlora_export.data import load_jsonl
    from mlora_export.demo import DEMO_MODELS, builtin_dataset_path
    from mlora_export.demo.tiny import build_byte_tokenizer
    from mlora_export.evaluation import load_eval_data

    task = DEMO_MODELS["smollm2"].task
    train, held = (load_jsonl(builtin_dataset_path(split, task)) for split in ("train", "eval"))
    assert len(train) == 180 and len(held) == 66 and all(e.is_conversational for e in train + held)
    assert all([m["role"] for m in e.messages] == ["user", "assistant"] for e in train + held)
    assert not {e.messages[0]["content"] for e in train} & {e.messages[0]["content"] for e in held}
    tok = build_byte_tokenizer()
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    data = load_eval_data(builtin_dataset_path("eval", task), tok)
    ex, first = data.examples[0], held[0].messages
    assert tok.decode(ex.prompt_ids) == f"<|user|>{first[0]['content']}</s><|assistant|>" and ex.completion == first[1]["content"]


def test_trivial_train_errors_come_before_torch_is_imported(base: Path, tmp_path: Path) -> None:
    """A missing or malformed data file is reported without importing torch (seconds saved; was 4 s idle, 14 s loaded)."""
    import subprocess
    import sys

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": \n', encoding="utf-8")
    for data, expect in ((tmp_path / "nope.jsonl", "does not exist"), (bad, "line 1: not valid JSON")):
        script = (
            "import sys\nfrom mlora_export.cli.main import main\n"
            f"try:\n    main(['train', '--base-model', {str(base)!r}, '--data', {str(data)!r}, '--ranks', '1,2', '--output', {str(tmp_path / 'o')!r}])\n"
            "except SystemExit as e:\n    print('exit', e.code, 'torch' in sys.modules)\n"
        )
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        assert proc.stdout.strip() == "exit 2 False", (proc.stdout, proc.stderr)
        assert expect in proc.stderr


def test_train_warns_of_a_rank_above_the_width_and_of_few_steps(base: Path, data: Path, tmp_path: Path) -> None:
    """A rank above min(in, out) of the targets, and a handful of steps from the default one epoch, are
    accepted with a warning that gives the numbers (the run itself succeeds)."""
    res = _run(["train", "--base-model", str(base), "--data", str(data), "--ranks", "1,200", "--output", str(tmp_path / "o"),
                "--batch-size", "4"])
    assert res.exit_code == 0, res.output
    assert "warning: max rank 200 is above min(in_features, out_features) of 14 of 14 target modules" in res.stderr
    assert "consider a max rank of at most 32" in res.stderr
    assert "warning: only 2 optimisation steps (1 epoch(s) of 8 examples at a global batch of 4)" in res.stderr
    # an explicit --max-steps is the user's choice: no warning about steps
    res = _run(_args(base, data, tmp_path / "o2"))
    assert res.exit_code == 0 and "optimisation steps" not in res.stderr, res.output
