#!/usr/bin/env python
"""Regenerate the demo's pre-trained base and task: ``mlora_export/demo/pretrained/`` and ``demo/data/skill-*.jsonl``.

The demo fine-tunes a *pre-trained* model on a task it half knows, as one fine-tunes an LLM. Both
come from the reproduction's ``skill`` regime (``examples/reproduce/reproduce.py``, its code
imported here, not copied): a Llama-style causal LM (3 layers, hidden 128) pre-trained for 400
steps on a synthetic letter-string language (copy ``abc=abc``, reverse ``abc<cba``, shift
``abc+bcd``, and in 8% of the strings a rare fourth operation ``abc~g(a)g(b)g(c)``), and the task
of that rare operation, which the base solves about two times in three. The one change: the
tokenizer is the byte-level BPE of :func:`mlora_export.demo.tiny.build_byte_tokenizer` (one token
per character, as the reproduction's character tokenizer, but in the ``tokenizer.json`` form that
llama.cpp and ONNX Runtime GenAI read).

Deterministic (seeded, one thread): the same torch build writes the same bytes. Takes about a
minute on one core. From the repository root::

    python scripts/make_demo_base.py            # rewrite the shipped files
    python scripts/make_demo_base.py --check    # regenerate into a temporary folder and compare with the shipped files
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "reproduce"))
sys.path.insert(0, str(ROOT))

import reproduce as R  # noqa: E402  (the reproduction's synthetic language, pre-training and task)

PACKAGE = ROOT / "mlora_export" / "demo"
BASE_DIR = "pretrained"
#: the reproduction's splits of the skill regime: train 4000, val 300, test 300 (shipped as ``eval``)
SPLIT_FILES = {"train": "skill-train.jsonl", "val": "skill-val.jsonl", "test": "skill-eval.jsonl"}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def base_skills(cfg: R.Settings, base: Path, eval_path: Path, work: Path) -> dict[str, float]:
    """Held-out greedy exact match of the base on each operation of its pre-training language (300 fresh
    strings each, as the reproduction measures them) and on the demo's held-out split."""
    import random

    from mlora_export.base import load_base_model, load_tokenizer
    from mlora_export.evaluation import load_eval_data, score_model

    tok = load_tokenizer(base)
    model = load_base_model(base, dtype="float32", device="cpu")
    rnd = random.Random(4242)
    out: dict[str, float] = {}
    for op, name in {**R.OPS, R.SKILL_OP: "rare ~"}.items():
        recs = [{"prompt": f"{w}{op}", "completion": R._op(op, w)} for w in (R.random_word(rnd, cfg) for _ in range(cfg.test_examples))]
        path = work / f"base-{name}.jsonl"
        R.write_jsonl(path, recs)
        out[name] = score_model(model, tok, load_eval_data(path, tok), metric="exact-match", batch_size=cfg.eval_batch_size).score
    out["demo held-out split"] = score_model(model, tok, load_eval_data(eval_path, tok), metric="exact-match",
                                             batch_size=cfg.eval_batch_size).score
    return out


def build(dest: Path, work: Path) -> dict[str, Any]:
    """Pre-train the base into ``dest / pretrained`` and write the task into ``dest / data``; return the record."""
    import torch
    import transformers

    from mlora_export.demo.tiny import build_byte_tokenizer

    torch.set_num_threads(1)
    cfg = R.Settings()
    base = dest / BASE_DIR
    pre = R.pretrain(cfg, base, tokenizer=build_byte_tokenizer())
    data = dest / "data"
    data.mkdir(parents=True, exist_ok=True)
    splits = R.task_splits(cfg, "skill")
    for split, name in SPLIT_FILES.items():
        R.write_jsonl(data / name, splits[split])
    skills = base_skills(cfg, base, data / SPLIT_FILES["test"], work)
    record = {
        "what": "a Llama-style causal LM pre-trained on a synthetic letter-string language by scripts/make_demo_base.py "
                "(the base of examples/reproduce/reproduce.py, regime 'skill', with a byte-level tokenizer)",
        "params": pre["params"],
        "pretraining": {
            "steps": cfg.pretrain_steps, "batch_size": cfg.pretrain_batch, "lr": cfg.pretrain_lr,
            "rare_operation_share": cfg.skill_fraction, "final_loss": round(pre["final_loss"], 4),
            "language": "strings of 4-8 of the 52 ASCII letters, an operator and its result: copy 'abc=abc', reverse "
                        "'abc<cba', shift 'abc+bcd', and (8%) the rare '~': each letter through a fixed derangement",
        },
        "shape": {k: getattr(cfg, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")},
        "base_exact_match": {k: round(v, 4) for k, v in skills.items()},
        "task": {"operation": "~", "train": len(splits["train"]), "val": len(splits["val"]), "eval": len(splits["test"]),
                 "files": list(SPLIT_FILES.values())},
        "made_with": {"torch": torch.__version__, "transformers": transformers.__version__},
        "model_sha256": sha256(base / "model.safetensors"),
    }
    (base / "pretraining.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return record


def shipped_files(dest: Path) -> list[Path]:
    """The files this script writes, relative to ``dest``."""
    return sorted(p.relative_to(dest) for p in (*(dest / BASE_DIR).iterdir(), *(dest / "data" / n for n in SPLIT_FILES.values())))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="regenerate into a temporary folder and compare with the shipped files")
    args = ap.parse_args(argv)
    import logging

    import transformers

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("mlora_export").setLevel(logging.ERROR)
    transformers.utils.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory(prefix="demo-base-") as tmp:
        dest, work = Path(tmp) / "out", Path(tmp) / "work"
        work.mkdir()
        record = build(dest, work)
        print(json.dumps(record, indent=1))
        files = shipped_files(dest)
        if args.check:
            differ = [str(f) for f in files if not (PACKAGE / f).is_file() or sha256(PACKAGE / f) != sha256(dest / f)]
            extra = sorted(str(p.relative_to(PACKAGE)) for p in (PACKAGE / BASE_DIR).iterdir()
                           if p.relative_to(PACKAGE) not in files) if (PACKAGE / BASE_DIR).is_dir() else []
            if differ or extra:
                print(f"differ from the shipped files: {differ}; shipped but not made: {extra}", file=sys.stderr)
                return 1
            print(f"the {len(files)} shipped files are what this script makes")
            return 0
        shutil.rmtree(PACKAGE / BASE_DIR, ignore_errors=True)
        for f in files:
            (PACKAGE / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(dest / f, PACKAGE / f)
        print(f"wrote {len(files)} files under {PACKAGE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
