#!/usr/bin/env python
"""Reproduction v2: one nested run vs a grid of LoRA runs, with one fair learning-rate search for every method.

1. **Pre-train** a small Llama-style causal LM (character tokenizer, :mod:`mlora_export.demo.tiny`) from
   scratch on a synthetic language of three string operations on the 52 ASCII letters, each marked by
   its operator: copy ``abc=abc``, reverse ``abc<cba`` and shift ``abc+bcd``.
2. **Two fine-tuning regimes**, both written with the copy operator ``w=f(w)``:

   - ``cipher`` (a large shift): ``f`` is a fixed derangement of all 52 letters. The base scores 0%.
   - ``skill`` (a small perturbation, closer to a GSM8K-style fine-tune): the pre-training language
     has a fourth, rare operation ``w~g(w)`` (``g`` another fixed derangement, in ``skill_fraction``
     of the pre-training strings), so the base half-knows it before fine-tuning, and the adapter
     refines a skill that is already there.

3. **Methods**, each trained in a plain PyTorch loop over :func:`mlora_export.training.add_nested_adapter`
   with the same steps, batch size, batch sequence (a function of the seed), warm-up and linear
   decay, scaling, alpha and targets:

   - ``lora``: the grid, one plain LoRA run per rank in ``grid``;
   - ``dylora``, ``matryoshka`` (the paper's one-pass diagonal), ``nested-loss``: one run at
     ``r = max(grid)`` with train ranks ``grid``;
   - ``nested-loss-2x``: the same at twice the steps;
   - ``svd``: the grid's rank-``max(grid)`` run re-nested by SVD (:func:`mlora_export.renest_adapter`),
     "train one LoRA, serve any rank"; it costs one grid run.

4. **One search for all**: every method is trained at every learning rate of ``lrs`` for every seed.
   Each method's learning rate is the one with the best mean *validation* AURAC v2 over the seeds
   (the grid: each rank's learning rate by its mean validation exact match); the report gives the
   *test* split at those choices, mean ± standard deviation over the seeds.

Evaluation is greedy exact match (:func:`mlora_export.evaluation.score_model`) at every rank, the
rank switched in place (exactly what the rank's PEFT slice computes). Writes ``report.md``,
``summary.json`` and ``rank_curve.png``; every job's raw numbers are kept in ``jobs/`` (a rerun
with the same ``--output`` and without ``--force`` reuses them).

    python examples/reproduce/reproduce.py --output ./repro --workers 2     # the full run (~35 min on an idle 2-core machine)
    python examples/reproduce/reproduce.py --output ./repro-smoke --smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import random
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger("reproduce")

LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"  # the synthetic language's symbols
OPS = {"=": "copy", "<": "reverse", "+": "shift"}
#: method key → label, in report order
METHOD_LABELS = {
    "lora": "LoRA grid (one run per rank)",
    "dylora": "DyLoRA (one run)",
    "matryoshka": "MatryoshkaLoRA, paper (one run)",
    "nested-loss": "nested-loss (one run)",
    "nested-loss-2x": "nested-loss, 2x steps (one run)",
    "svd": "LoRA r=max, re-nested by SVD (one run)",
}
NESTED = ("dylora", "matryoshka", "nested-loss", "nested-loss-2x")
REGIME_LABELS = {"cipher": "cipher (large shift; base 0%)", "skill": "half-learned skill (small perturbation)"}
SKILL_OP = "~"  # the rare fourth operation of the pre-training language (the ``skill`` regime)


@dataclass(frozen=True)
class Settings:
    """Every knob of the experiment; one setting for all methods."""

    grid: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    seeds: tuple[int, ...] = (0, 1, 2)
    lrs: tuple[float, ...] = (2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2)
    regimes: tuple[str, ...] = ("cipher", "skill")
    #: share of the pre-training strings that use the rare fourth operation ``~``
    skill_fraction: float = 0.08
    # base model (tiny.TINY_SHAPE overrides) and its pre-training
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    pretrain_steps: int = 400
    pretrain_batch: int = 64
    pretrain_lr: float = 3e-3
    # fine-tuning (identical for every method)
    train_examples: int = 4000
    val_examples: int = 300
    test_examples: int = 300
    steps: int = 300
    batch_size: int = 32
    warmup_fraction: float = 0.1
    scaling: str = "sqrt"
    alpha: float = 2.0
    #: the attention and MLP output projections of every layer (see README "Choices, stated once")
    target_modules: tuple[str, ...] = ("o_proj", "down_proj")
    min_len: int = 4
    max_len: int = 8
    eval_batch_size: int = 100
    workers: int = 2

    @classmethod
    def smoke(cls) -> "Settings":
        return cls(
            grid=(1, 2, 4), seeds=(0,), lrs=(2e-3, 8e-3), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            pretrain_steps=25, pretrain_batch=16, train_examples=100, val_examples=16, test_examples=16, steps=8,
            batch_size=8, min_len=3, max_len=5, workers=1,
        )


# -- synthetic language and tasks ---------------------------------------------------------------
def _op(op: str, s: str) -> str:
    if op == "=":
        return s
    if op == "<":
        return s[::-1]
    if op == SKILL_OP:
        table = cipher(seed=777)
        return "".join(table[c] for c in s)
    return "".join(LETTERS[(LETTERS.index(c) + 1) % len(LETTERS)] for c in s)


def cipher(seed: int = 1234) -> dict[str, str]:
    """A fixed derangement of the letters (no letter maps to itself): the ``cipher`` regime."""
    rnd = random.Random(seed)
    while True:
        perm = list(LETTERS)
        rnd.shuffle(perm)
        if all(a != b for a, b in zip(LETTERS, perm)):
            return dict(zip(LETTERS, perm))


def task_op(regime: str) -> str:
    """The operator a regime's records are written with."""
    if regime == "cipher":
        return "="
    if regime == "skill":
        return SKILL_OP
    raise ValueError(f"unknown regime {regime!r}")


def random_word(rnd: random.Random, cfg: Settings) -> str:
    return "".join(rnd.choice(LETTERS) for _ in range(rnd.randint(cfg.min_len, cfg.max_len)))


def task_splits(cfg: Settings, regime: str, seed: int = 99) -> dict[str, list[dict[str, str]]]:
    """Disjoint train / validation / test ``{"prompt", "completion"}`` records (the same words for every seed and regime)."""
    rnd = random.Random(seed)
    words: list[str] = []
    seen: set[str] = set()
    n = cfg.train_examples + cfg.val_examples + cfg.test_examples
    while len(words) < n:
        w = random_word(rnd, cfg)
        if w not in seen:
            seen.add(w)
            words.append(w)
    op = task_op(regime)
    table = cipher() if regime == "cipher" else None
    recs = [{"prompt": f"{w}{op}", "completion": "".join(table[c] for c in w) if table else _op(op, w)} for w in words]
    a, b = cfg.train_examples, cfg.train_examples + cfg.val_examples
    return {"train": recs[:a], "val": recs[a:b], "test": recs[b:]}


def write_jsonl(path: Path, records: list[dict[str, str]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


# -- pre-training --------------------------------------------------------------------------------
def pretrain(cfg: Settings, out: Path, tokenizer: Any = None) -> dict[str, Any]:
    """Pre-train the base on copy / reverse / shift strings (and the rare ``~``); save it with its tokenizer.

    ``tokenizer``: default the character tokenizer of :mod:`mlora_export.demo.tiny`
    (``scripts/make_demo_base.py`` passes the byte-level one the demo's GGUF and GenAI stages need).
    """
    import torch
    from transformers import LlamaForCausalLM

    from mlora_export.data import CompletionCollator, Example, tokenize_examples
    from mlora_export.demo.tiny import build_char_tokenizer, tiny_llama_config

    tok = tokenizer if tokenizer is not None else build_char_tokenizer()
    mcfg = tiny_llama_config(
        len(tok), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(mcfg)
    collate = CompletionCollator(tok.pad_token_id)
    rnd = random.Random(0)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100) * max(0.05, 1 - s / cfg.pretrain_steps))
    model.train()
    t0 = time.perf_counter()
    losses = []
    for step in range(cfg.pretrain_steps):
        texts = []
        for _ in range(cfg.pretrain_batch):
            op = SKILL_OP if rnd.random() < cfg.skill_fraction else rnd.choice(list(OPS))
            w = random_word(rnd, cfg)
            texts.append(Example(text=f"{w}{op}{_op(op, w)}"))
        batch = collate(tokenize_examples(texts, tok, 64))
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if step % 250 == 0:
            logger.info("pretrain step %d loss %.4f", step, float(loss.detach()))
    seconds = time.perf_counter() - t0
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return {"seconds": seconds, "final_loss": statistics.fmean(losses[-50:]), "params": sum(p.numel() for p in model.parameters())}


def base_skills(cfg: Settings, base: Path, work: Path) -> dict[str, float]:
    """Held-out exact match of the pre-trained base on each pre-training operation and on each regime's test split."""
    from mlora_export.base import load_base_model, load_tokenizer
    from mlora_export.evaluation import load_eval_data, score_model

    tok = load_tokenizer(base)
    model = load_base_model(base, dtype="float32", device="cpu")
    rnd = random.Random(4242)
    out = {}
    for op, name in OPS.items():
        recs = [{"prompt": f"{w}{op}", "completion": _op(op, w)} for w in (random_word(rnd, cfg) for _ in range(cfg.test_examples))]
        path = work / f"base-{name}.jsonl"
        write_jsonl(path, recs)
        out[name] = score_model(model, tok, load_eval_data(path, tok), metric="exact-match", batch_size=cfg.eval_batch_size).score
    for regime in cfg.regimes:
        data = load_eval_data(work / regime / "test.jsonl", tok)
        out[f"{regime} (test)"] = score_model(model, tok, data, metric="exact-match", batch_size=cfg.eval_batch_size).score
    return out


# -- one job: every method at one (regime, seed, lr) ---------------------------------------------
def _schedule(cfg: Settings, steps: int):  # noqa: ANN202 - a LambdaLR factor
    warm = max(1, round(cfg.warmup_fraction * steps))

    def factor(s: int) -> float:
        return (s + 1) / warm if s < warm else max(0.0, (steps - s) / max(1, steps - warm))

    return factor


def _train(cfg: Settings, base: Path, items: list[Any], collate: Any, method: str, r: int, seed: int, lr: float, steps: int) -> tuple[Any, float]:
    """Train one adapter in a plain loop; return the live handle and the training wall-clock."""
    import torch

    from mlora_export.adapter import MatryoshkaConfig
    from mlora_export.base import load_base_model
    from mlora_export.training import add_nested_adapter

    model = load_base_model(base, dtype="float32", device="cpu")
    ranks = (r,) if method == "lora" else tuple(k for k in cfg.grid if k <= r)
    config = MatryoshkaConfig(method, r, ranks, cfg.scaling, cfg.alpha, extra={"base_model": str(base)})
    handle = add_nested_adapter(model, config, target_modules=list(cfg.target_modules), seed=seed)
    params = [p for p in handle.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg, steps))
    order = random.Random(seed)  # the same batches for every method and lr of a seed
    handle.model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        batch = collate([items[order.randrange(len(items))] for _ in range(cfg.batch_size)])
        handle.train_diagonal(step)
        loss = handle.model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t0
    handle.model.eval()
    return handle, seconds


def _training_data(output: Path, regime: str) -> tuple[Any, list[Any], Any]:
    """``(tokenizer, tokenised training records, collator)`` of a regime, as every run of it trains."""
    from mlora_export.base import load_tokenizer
    from mlora_export.data import CompletionCollator, read_records, tokenize_records

    tok = load_tokenizer(output / "base")
    items = tokenize_records(read_records(output / regime / "train.jsonl"), tok, 64)  # the reader and tokeniser of `train`
    return tok, items, CompletionCollator(tok.pad_token_id)


def run_job(cfg: Settings, output: Path, regime: str, seed: int, lr: float) -> dict[str, Any]:
    """Train and score every method at one (regime, seed, lr); the result is also written to ``jobs/``."""
    import torch

    from mlora_export.base import load_base_model
    from mlora_export.converters.renest import renest_adapter
    from mlora_export.evaluation import load_eval_data, score_model
    from mlora_export.training import load_nested_adapter

    path = output / "jobs" / f"{regime}-seed{seed}-lr{lr:g}.json"
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    torch.set_num_threads(1)
    base = output / "base"
    data_dir = output / regime
    tok, items, collate = _training_data(output, regime)
    splits = {s: load_eval_data(data_dir / f"{s}.jsonl", tok) for s in ("val", "test")}

    def score(model: Any) -> dict[str, float]:
        return {s: score_model(model, tok, d, metric="exact-match", batch_size=cfg.eval_batch_size).score for s, d in splits.items()}

    def curve(handle: Any, ranks: tuple[int, ...]) -> dict[str, dict[int, float]]:
        out: dict[str, dict[int, float]] = {"val": {}, "test": {}}
        for k in ranks:
            handle.set_rank(k)
            for s, v in score(handle.model).items():
                out[s][k] = v
        return out

    r_max = max(cfg.grid)
    runs: dict[str, Any] = {"lora": {}}
    for k in cfg.grid:
        handle, secs = _train(cfg, base, items, collate, "lora", k, seed, lr, cfg.steps)
        runs["lora"][k] = {"seconds": secs, "steps": cfg.steps, **curve(handle, (k,))}
        if k == r_max:  # the svd baseline: this very run, re-nested
            work = output / "scratch" / f"{regime}-{seed}-{lr:g}"
            handle.save(work / "lora", force=True)
            t0 = time.perf_counter()
            renest_adapter(work / "lora", work / "svd", force=True)
            renest_s = time.perf_counter() - t0
            svd = load_nested_adapter(load_base_model(base, dtype="float32", device="cpu"), work / "svd")
            runs["svd"] = {"seconds": secs, "renest_seconds": renest_s, "steps": cfg.steps, **curve(svd, cfg.grid)}
            shutil.rmtree(work, ignore_errors=True)
    for name in NESTED:
        method, steps = ("nested-loss", 2 * cfg.steps) if name == "nested-loss-2x" else (name, cfg.steps)
        handle, secs = _train(cfg, base, items, collate, method, r_max, seed, lr, steps)
        runs[name] = {"seconds": secs, "steps": steps, **curve(handle, cfg.grid)}
        if method == "matryoshka":  # diagnostic, not a product rank: the forward it was trained with
            handle.set_diagonal(handle.config.p)
            runs[name]["training_diagonal"] = score(handle.model)
    result = {"regime": regime, "seed": seed, "lr": lr, "runs": runs}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1), encoding="utf-8")
    tmp.replace(path)
    logger.info("%s seed %d lr %g: %s", regime, seed, lr,
                {m: [round(v * 100) for v in run["test"].values()] for m, run in runs.items() if m != "lora"})
    return result


def time_methods(cfg: Settings, output: Path, regime: str = "cipher", seed: int = 0, lr: float = 1.6e-2) -> dict[str, Any]:
    """Wall-clock of one training run of every method, one after the other in this process, on an
    otherwise idle machine: the compute comparison of the report (the search's own timings ran two
    jobs side by side and are noisier). Written to ``timing.json``."""
    import os

    import torch

    from mlora_export.converters.renest import renest_adapter

    torch.set_num_threads(1)
    base = output / "base"
    _, items, collate = _training_data(output, regime)
    r_max = max(cfg.grid)
    runs: dict[str, float] = {}
    load = os.getloadavg()[0]
    for k in cfg.grid:
        handle, runs[f"lora r={k}"] = _train(cfg, base, items, collate, "lora", k, seed, lr, cfg.steps)
    work = output / "scratch" / "timing"
    handle.save(work / "lora", force=True)
    t0 = time.perf_counter()
    renest_adapter(work / "lora", work / "svd", force=True)
    renest = time.perf_counter() - t0
    shutil.rmtree(work, ignore_errors=True)
    for name in NESTED:
        method, steps = ("nested-loss", 2 * cfg.steps) if name == "nested-loss-2x" else (name, cfg.steps)
        runs[name] = _train(cfg, base, items, collate, method, r_max, seed, lr, steps)[1]
    grid = sum(runs[f"lora r={k}"] for k in cfg.grid)
    out = {"regime": regime, "seed": seed, "lr": lr, "threads": 1, "load_before": load, "load_after": os.getloadavg()[0],
           "seconds": runs, "grid_seconds": grid, "renest_seconds": renest,
           "svd_seconds": runs[f"lora r={r_max}"] + renest}
    (output / "timing.json").write_text(json.dumps(out, indent=1), encoding="utf-8")
    return out


# -- selection on validation, report on test -----------------------------------------------------
def _ms(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def _k(d: dict[Any, Any], k: int) -> Any:
    return d[k] if k in d else d[str(k)]


def summarise(cfg: Settings, jobs: list[dict[str, Any]]) -> dict[str, Any]:
    """Choose each method's lr on validation (grid: per rank), report test at the choice; compute costs."""
    from mlora_export.method import aurac

    by: dict[tuple[str, int, float], dict[str, Any]] = {(j["regime"], j["seed"], j["lr"]): j["runs"] for j in jobs}
    grid = list(cfg.grid)
    regimes: dict[str, Any] = {}
    for regime in cfg.regimes:
        methods: dict[str, Any] = {}
        # the grid: each rank's lr by its mean validation exact match
        lr_of = {k: max(cfg.lrs, key=lambda lr: statistics.fmean(_k(_k(by[(regime, s, lr)]["lora"], k)["val"], k) for s in cfg.seeds)) for k in grid}
        per_seed = {s: [_k(_k(by[(regime, s, lr_of[k])]["lora"], k)["test"], k) for k in grid] for s in cfg.seeds}
        val_search = {f"{lr:g}": {k: statistics.fmean(_k(_k(by[(regime, s, lr)]["lora"], k)["val"], k) for s in cfg.seeds) for k in grid} for lr in cfg.lrs}
        methods["lora"] = _entry(cfg, per_seed, aurac, lr={k: lr_of[k] for k in grid}, val_search=val_search,
                                 seconds=_ms([sum(_k(by[(regime, s, lr_of[k])]["lora"], k)["seconds"] for k in grid) for s in cfg.seeds]),
                                 steps=sum(_k(by[(regime, cfg.seeds[0], lr_of[k])]["lora"], k)["steps"] for k in grid))
        for m in ("dylora", "matryoshka", "nested-loss", "nested-loss-2x", "svd"):
            def val_aurac(lr: float, m: str = m) -> float:
                return statistics.fmean(aurac(grid, [_k(by[(regime, s, lr)][m]["val"], k) for k in grid])["v2"] for s in cfg.seeds)

            best = max(cfg.lrs, key=val_aurac)
            per_seed = {s: [_k(by[(regime, s, best)][m]["test"], k) for k in grid] for s in cfg.seeds}
            entry = _entry(cfg, per_seed, aurac, lr=best, val_search={f"{lr:g}": val_aurac(lr) for lr in cfg.lrs},
                           seconds=_ms([by[(regime, s, best)][m]["seconds"] for s in cfg.seeds]),
                           steps=by[(regime, cfg.seeds[0], best)][m]["steps"])
            if m == "svd":
                entry["renest_seconds"] = _ms([by[(regime, s, best)][m]["renest_seconds"] for s in cfg.seeds])
            if m == "matryoshka":
                entry["training_diagonal_test"] = _ms([by[(regime, s, best)][m]["training_diagonal"]["test"] for s in cfg.seeds])
            methods[m] = entry
        search_seconds = {m: sum(_run_seconds(by[(regime, s, lr)], m) for s in cfg.seeds for lr in cfg.lrs) / len(cfg.seeds)
                          for m in METHOD_LABELS}
        regimes[regime] = {"methods": methods, "search_seconds_per_seed": search_seconds}
    return {"settings": dataclasses.asdict(cfg), "regimes": regimes}


def _run_seconds(runs: dict[str, Any], m: str) -> float:
    if m == "lora":
        return sum(r["seconds"] for r in runs["lora"].values())
    return runs[m]["seconds"]


def _entry(cfg: Settings, per_seed: dict[int, list[float]], aurac: Any, *, lr: Any, val_search: Any, seconds: dict[str, float], steps: int) -> dict[str, Any]:
    grid = list(cfg.grid)
    au = {s: aurac(grid, v) for s, v in per_seed.items()}
    return {
        "lr": lr,
        "val_search": val_search,
        "ranks": {k: _ms([per_seed[s][i] for s in cfg.seeds]) for i, k in enumerate(grid)},
        "aurac": {v: _ms([au[s][v] for s in cfg.seeds]) for v in ("v1", "v2")},
        "aurac_per_seed": {s: au[s]["v2"] for s in cfg.seeds},
        "train_seconds": seconds,
        "steps": steps,
        "example_passes": steps * cfg.batch_size,
    }


def _paired(ms: dict[str, Any], a: str, b: str) -> tuple[float, float]:
    """Mean and sd over seeds of the per-seed AURAC v2 difference ``a - b`` in points (the seeds pair the runs)."""
    sa, sb = ms[a]["aurac_per_seed"], ms[b]["aurac_per_seed"]
    diffs = [(sa[s] - sb[s]) * 100 for s in sa]
    return statistics.fmean(diffs), statistics.stdev(diffs) if len(diffs) > 1 else 0.0


def verdict(summary: dict[str, Any]) -> list[str]:
    """Plain sentences computed from the numbers (no fixed conclusion)."""
    lines = []
    for regime, res in summary["regimes"].items():
        ms = res["methods"]
        best = max(ms, key=lambda m: ms[m]["aurac"]["v2"]["mean"])
        one_run = max((m for m in ms if m not in ("lora", "nested-loss-2x")), key=lambda m: ms[m]["aurac"]["v2"]["mean"])
        nl, grid = ms["nested-loss"], ms["lora"]
        parts = [
            f"- **{REGIME_LABELS[regime]}**: best test AURAC v2: {METHOD_LABELS[best]} ({ms[best]['aurac']['v2']['mean'] * 100:.1f}); "
            f"best single run at one run's steps: {METHOD_LABELS[one_run]} ({ms[one_run]['aurac']['v2']['mean'] * 100:.1f})."
        ]
        timing = summary.get("timing")
        for m in ("nested-loss", "nested-loss-2x"):
            d, sd = _paired(ms, m, "lora")
            if timing:  # one run of each, in turn, on an idle machine
                wall = f"{timing['grid_seconds'] / timing['seconds'][m]:.1f}× less training wall-clock, timed in turn"
            else:
                wall = f"{grid['train_seconds']['mean'] / ms[m]['train_seconds']['mean']:.1f}× less training wall-clock in the search"
            parts.append(
                f"{METHOD_LABELS[m]} vs the grid of {len(summary['settings']['grid'])} runs: "
                f"{ms[m]['aurac']['v2']['mean'] * 100:.1f} vs {grid['aurac']['v2']['mean'] * 100:.1f} "
                f"(per-seed difference {d:+.1f} ± {sd:.1f} points) for {grid['example_passes'] / ms[m]['example_passes']:.1f}× fewer "
                f"example passes ({wall})."
            )
        parts.append(
            f"The paper's one-pass matryoshka: {ms['matryoshka']['aurac']['v2']['mean'] * 100:.1f} under the inference rule, although its "
            f"training forward (diagonal p at full rank) scores {ms['matryoshka']['training_diagonal_test']['mean'] * 100:.1f}% test exact match; "
            f"SVD re-nesting of one LoRA r={max(summary['settings']['grid'])} run: {ms['svd']['aurac']['v2']['mean'] * 100:.1f}; "
            f"DyLoRA: {ms['dylora']['aurac']['v2']['mean'] * 100:.1f}; nested-loss: {nl['aurac']['v2']['mean'] * 100:.1f}."
        )
        lines.append(" ".join(parts))
    return lines


def report_markdown(summary: dict[str, Any]) -> str:
    cfg = summary["settings"]
    n = len(cfg["seeds"])
    grid = cfg["grid"]
    order = list(METHOD_LABELS)

    def cell(d: dict[str, float], f: float = 100.0) -> str:
        return f"{d['mean'] * f:.1f} ± {d['std'] * f:.1f}" if n > 1 else f"{d['mean'] * f:.1f}"

    lines = [f"Test-split exact match (%), {cfg['test_examples']} examples, mean ± sd over seeds {list(cfg['seeds'])}; "
             f"each method's lr chosen on the {cfg['val_examples']}-example validation split from {list(cfg['lrs'])}.", ""]
    for regime, res in summary["regimes"].items():
        ms = res["methods"]
        lines += [f"### {REGIME_LABELS[regime]}", "", "| rank | " + " | ".join(METHOD_LABELS[m] for m in order) + " |",
                  "|---:|" + "---:|" * len(order)]
        for k in grid:
            lines.append(f"| {k} | " + " | ".join(cell(_k(ms[m]["ranks"], k)) for m in order) + " |")
        for v in ("v1", "v2"):
            lines.append(f"| **AURAC {v}** | " + " | ".join(f"**{cell(ms[m]['aurac'][v])}**" for m in order) + " |")
        lines.append("| chosen lr | " + " | ".join(
            ("per rank: " + ", ".join(f"{_k(ms[m]['lr'], k):g}" for k in grid)) if m == "lora" else f"{ms[m]['lr']:g}" for m in order) + " |")
        lines.append("| optimisation steps (×batch " + str(cfg["batch_size"]) + ") | " + " | ".join(str(ms[m]["steps"]) for m in order) + " |")
        lines.append("| training wall-clock at the chosen lr, in the search (s; two jobs side by side, noisy) | " + " | ".join(cell(ms[m]["train_seconds"], 1.0) for m in order) + " |")
        lines.append("| whole lr search, wall-clock per seed (s) | " + " | ".join(f"{res['search_seconds_per_seed'][m]:.0f}" for m in order) + " |")
        lines += ["", "Validation AURAC v2 (%) per lr (mean over seeds; the grid: validation exact match per rank):", "",
                  "| lr | " + " | ".join(METHOD_LABELS[m] for m in order if m != "lora") + " | LoRA grid, per rank " + "/".join(map(str, grid)) + " |",
                  "|---:|" + "---:|" * len(order)]
        for lr in cfg["lrs"]:
            key = f"{lr:g}"
            row = [f"{ms[m]['val_search'][key] * 100:.1f}" for m in order if m != "lora"]
            row.append("/".join(f"{_k(ms['lora']['val_search'][key], k) * 100:.0f}" for k in grid))
            lines.append(f"| {key} | " + " | ".join(row) + " |")
        lines.append("")
    timing = summary.get("timing")
    if timing:
        t = timing["seconds"]
        grid_s = timing["grid_seconds"]
        rows = [("LoRA grid (6 runs)", grid_s), *((METHOD_LABELS[m], t[m]) for m in NESTED),
                (METHOD_LABELS["svd"], timing["svd_seconds"])]
        lines += [f"Training wall-clock of one run of each method, one after the other in one process with one thread "
                  f"(regime {timing['regime']}, seed {timing['seed']}, lr {timing['lr']:g}; load average {timing['load_before']:.2f} "
                  f"before, {timing['load_after']:.2f} after, on 2 cores):", "",
                  "| run | seconds | grid / this |", "|---|---:|---:|"]
        lines += [f"| {name} | {sec:.1f} | {grid_s / sec:.2f}× |" for name, sec in rows]
        lines += ["", "Per grid run: " + ", ".join(f"r={k} {t[f'lora r={k}']:.1f} s" for k in grid) +
                  f"; re-nesting the r={max(grid)} run by SVD: {timing['renest_seconds'] * 1000:.0f} ms.", ""]
    lines += ["**Verdict (computed from the tables):**", "", *verdict(summary), ""]
    base = summary.get("base")
    if base:
        skills = ", ".join(f"{k} {v * 100:.1f}%" for k, v in base["exact_match"].items())
        lines.append(f"Base model ({base['pretrain']['params']:,} parameters, pre-trained {cfg['pretrain_steps']} steps in "
                     f"{base['pretrain']['seconds']:.0f} s): exact match {skills}. Total run time {summary.get('total_seconds', 0) / 60:.1f} min.")
    return "\n".join(lines) + "\n"


def plot_summary(summary: dict[str, Any], path: Path) -> None:
    """Mean test exact match vs rank (log2 axis) per method and regime, with min–max bands over seeds."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, NullLocator

    cfg = summary["settings"]
    regimes = list(summary["regimes"])
    fig = Figure(figsize=(6.5 * len(regimes), 4.8), dpi=100)
    FigureCanvasAgg(fig)
    ks = list(cfg["grid"])
    for i, regime in enumerate(regimes):
        ax = fig.add_subplot(1, len(regimes), i + 1)
        ms = summary["regimes"][regime]["methods"]
        for m, label in METHOD_LABELS.items():
            pts = [_k(ms[m]["ranks"], k) for k in ks]
            ax.plot(ks, [p["mean"] * 100 for p in pts], marker="o", label=f"{label} ({ms[m]['aurac']['v2']['mean'] * 100:.1f})")
            if len(cfg["seeds"]) > 1:
                ax.fill_between(ks, [p["min"] * 100 for p in pts], [p["max"] * 100 for p in pts], alpha=0.12)
        base = summary.get("base", {}).get("exact_match", {}).get(f"{regime} (test)")
        if base is not None:
            ax.axhline(base * 100, color="gray", linestyle=":", label=f"base model ({base * 100:.1f}%)")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(ks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([str(k) for k in ks])
        ax.set_xlabel("rank (log2 scale)")
        ax.set_ylabel("test exact match (%)")
        ax.set_title(f"{REGIME_LABELS[regime]}; legend: AURAC v2", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, format="png")


# -- the experiment ------------------------------------------------------------------------------
def _job(args: tuple[Settings, Path, str, int, float]) -> dict[str, Any]:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("mlora_export").setLevel(logging.ERROR)
    return run_job(*args)


#: Settings a rerun into the same output may change (they only add or select jobs).
_EXTENSIBLE = ("seeds", "lrs", "regimes", "workers")


def run(cfg: Settings, output: Path, *, force: bool = False, timing: bool = False) -> dict[str, Any]:
    """Run everything into ``output`` (reusing finished jobs there unless ``force``); return the summary.

    ``timing`` also (re)measures :func:`time_methods`; an earlier ``timing.json`` is reported either way.
    """
    import torch

    if output.exists() and force:
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)
    # A job file is keyed by (regime, seed, lr): a rerun may add seeds, lrs or regimes, not change the rest.
    settings_file = output / "settings.json"
    fixed = {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(cfg))).items() if k not in _EXTENSIBLE}
    if settings_file.exists():
        old = {k: v for k, v in json.loads(settings_file.read_text(encoding="utf-8")).items() if k not in _EXTENSIBLE}
        if old != fixed:
            changed = sorted(k for k in fixed if old.get(k) != fixed[k])
            raise SystemExit(f"error: {output} holds jobs run with other settings ({', '.join(changed)}); pass --force to replace them")
    settings_file.write_text(json.dumps(dataclasses.asdict(cfg), indent=1), encoding="utf-8")
    torch.set_num_threads(1)
    t_all = time.perf_counter()
    base = output / "base"
    pre_file = output / "pretrain.json"
    if not pre_file.exists():
        pre = pretrain(cfg, base)
        pre_file.write_text(json.dumps(pre), encoding="utf-8")
    pre = json.loads(pre_file.read_text(encoding="utf-8"))
    for regime in cfg.regimes:
        (output / regime).mkdir(exist_ok=True)
        for split, recs in task_splits(cfg, regime).items():
            write_jsonl(output / regime / f"{split}.jsonl", recs)
    skills = base_skills(cfg, base, output)
    logger.info("base: %s", {k: round(v, 3) for k, v in skills.items()})
    todo = [(cfg, output, regime, seed, lr) for regime in cfg.regimes for seed in cfg.seeds for lr in cfg.lrs]
    if cfg.workers > 1:
        import multiprocessing

        with ProcessPoolExecutor(max_workers=cfg.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            jobs = list(pool.map(_job, todo))
    else:
        jobs = [run_job(*t) for t in todo]
    summary = summarise(cfg, jobs)
    if timing:
        time_methods(cfg, output, regime=cfg.regimes[0])
    if (output / "timing.json").exists():
        summary["timing"] = json.loads((output / "timing.json").read_text(encoding="utf-8"))
    summary["base"] = {"pretrain": pre, "exact_match": skills}
    summary["total_seconds"] = time.perf_counter() - t_all
    (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (output / "report.md").write_text(report_markdown(summary), encoding="utf-8")
    plot_summary(summary, output / "rank_curve.png")
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", type=Path, required=True, help="folder for the base model, data, jobs/, report.md, rank_curve.png")
    ap.add_argument("--smoke", action="store_true", help="a seconds-long setting that exercises every step")
    ap.add_argument("--seeds", type=str, default=None, help="comma-separated seeds (default 0,1,2)")
    ap.add_argument("--lrs", type=str, default=None, help="comma-separated learning rates (default 2e-3,4e-3,8e-3,1.6e-2,3.2e-2)")
    ap.add_argument("--regimes", type=str, default=None, help="comma-separated regimes (default cipher,skill)")
    ap.add_argument("--steps", type=int, default=None, help="fine-tuning steps of one run (default 300)")
    ap.add_argument("--workers", type=int, default=None, help="processes running jobs side by side, one torch thread each (default 2)")
    ap.add_argument("--force", action="store_true", help="discard an existing --output instead of reusing its finished jobs")
    ap.add_argument("--timing", action="store_true", help="also time one run of every method in turn (run it on an idle machine)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("mlora_export").setLevel(logging.ERROR)
    cfg = Settings.smoke() if args.smoke else Settings()
    over: dict[str, Any] = {}
    if args.seeds:
        over["seeds"] = tuple(int(s) for s in args.seeds.split(","))
    if args.lrs:
        over["lrs"] = tuple(float(s) for s in args.lrs.split(","))
    if args.regimes:
        over["regimes"] = tuple(args.regimes.split(","))
    if args.steps:
        over["steps"] = args.steps
    if args.workers:
        over["workers"] = args.workers
    summary = run(dataclasses.replace(cfg, **over), args.output, force=args.force, timing=args.timing)
    sys.stdout.write(report_markdown(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
