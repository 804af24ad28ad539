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

Evaluation is greedy exact match (:func:`mlora_export.evaluation.exact_match`) at every rank, the
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


@dataclass(frozen=True)
class Method:
    """One row of the report: a library method, trained once per rank (``grid``) or once, with a recipe."""

    label: str
    method: str
    grid: bool = False
    steps_factor: int = 1
    #: recipe fields of :class:`mlora_export.training.NestedRecipe`, read from :class:`Settings` (field name → Settings attribute or value)
    recipe: tuple[tuple[str, Any], ...] = ()


#: method key → how it is trained, in report order. ``svd`` is the ``lora`` grid's r = max run, re-nested.
METHODS: dict[str, Method] = {
    "lora": Method("LoRA grid (one run per rank)", "lora", grid=True),
    "lora-plus": Method("LoRA+ grid (one run per rank)", "lora", grid=True, recipe=(("lora_plus_ratio", "lora_plus_ratio"),)),
    "dylora": Method("DyLoRA (one run)", "dylora"),
    "matryoshka": Method("MatryoshkaLoRA, paper (one run)", "matryoshka"),
    "nested-loss": Method("nested-loss (one run)", "nested-loss"),
    "nested-loss-2x": Method("nested-loss, 2x steps (one run)", "nested-loss", steps_factor=2),
    "svd": Method("LoRA r=max, re-nested by SVD (one run)", "lora"),
    "nl-lora-plus": Method("nested-loss + LoRA+", "nested-loss", recipe=(("lora_plus_ratio", "lora_plus_ratio"),)),
    "nl-curriculum": Method("nested-loss + rank curriculum", "nested-loss", recipe=(("rank_curriculum", "rank_curriculum"),)),
    "nl-per-rank-loss": Method("nested-loss + per-rank loss", "nested-loss", recipe=(("per_rank_loss", True),)),
    "nl-paper-init": Method("nested-loss + paper's init of A", "nested-loss", recipe=(("a_init", "paper"),)),
    "nl-loss-aware": Method("nested-loss + loss-aware ranks", "nested-loss", recipe=(("loss_aware_ranks", "loss_aware_ranks"),)),
    # combinations, added after the single directions were measured
    "nl-lora-plus-paper-init": Method("nested-loss + LoRA+ + paper's init", "nested-loss",
                                      recipe=(("lora_plus_ratio", "lora_plus_ratio"), ("a_init", "paper"))),
    "nl-all": Method("nested-loss + all five", "nested-loss", recipe=(
        ("lora_plus_ratio", "lora_plus_ratio"), ("rank_curriculum", "rank_curriculum"), ("per_rank_loss", True), ("a_init", "paper"),
        ("loss_aware_ranks", "loss_aware_ranks"))),
}
METHOD_LABELS = {k: m.label for k, m in METHODS.items()}
#: the methods of reproduction v2 (the baselines); the others are the directions of issue 26
BASELINES = ("lora", "dylora", "matryoshka", "nested-loss", "nested-loss-2x", "svd")
DIRECTIONS = ("nl-lora-plus", "nl-curriculum", "nl-per-rank-loss", "nl-paper-init", "nl-loss-aware", "nl-lora-plus-paper-init", "nl-all")
GRIDS = ("lora", "lora-plus")
REGIME_LABELS = {"cipher": "cipher (large shift; base 0%)", "skill": "half-learned skill (small perturbation)",
                 "half": "half cipher (26 of 52 letters enciphered; a rule check, not a search regime)"}
SKILL_OP = "~"  # the rare fourth operation of the pre-training language (the ``skill`` regime)


def unit_of(method: str) -> str:
    """The job unit that trains ``method`` (``svd`` comes from the ``lora`` grid's largest run)."""
    return "lora" if method == "svd" else method


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
    #: the rows to run and report (``--methods``; a rerun may add some)
    methods: tuple[str, ...] = tuple(METHODS)
    # the directions' settings (issue 26)
    lora_plus_ratio: float = 16.0
    rank_curriculum: float = 0.5
    loss_aware_ranks: float = 0.5
    #: rounds of the step-cost measurement (:func:`step_costs`)
    step_cost_reps: int = 5

    def recipe(self, method: str) -> Any:
        """The :class:`mlora_export.training.NestedRecipe` a method trains with."""
        from mlora_export.training import NestedRecipe

        return NestedRecipe(**{k: (getattr(self, v) if isinstance(v, str) and hasattr(self, v) else v) for k, v in METHODS[method].recipe})

    @classmethod
    def smoke(cls) -> "Settings":
        return cls(
            grid=(1, 2, 4), seeds=(0,), lrs=(2e-3, 8e-3), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            pretrain_steps=25, pretrain_batch=16, train_examples=100, val_examples=16, test_examples=16, steps=8,
            batch_size=8, min_len=3, max_len=5, workers=1, step_cost_reps=2,
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


def half_cipher(seed: int = 4321) -> dict[str, str]:
    """A derangement of 26 of the 52 letters, the identity on the others: the ``half`` regime (the base,
    which copies under ``=``, already gets half of the letters right)."""
    rnd = random.Random(seed)
    chosen = list(LETTERS)
    rnd.shuffle(chosen)
    chosen = chosen[:26]
    while True:
        perm = list(chosen)
        rnd.shuffle(perm)
        if all(a != b for a, b in zip(chosen, perm)):
            return {c: c for c in LETTERS} | dict(zip(chosen, perm))


def task_op(regime: str) -> str:
    """The operator a regime's records are written with."""
    if regime in ("cipher", "half"):
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
    table = cipher() if regime == "cipher" else half_cipher() if regime == "half" else None
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


def base_heldout_loss(cfg: Settings, base: Path, work: Path) -> dict[str, float]:
    """The base's held-out loss on each regime's validation split (mean cross-entropy per completion
    token): how far the task is from what the base already does, measured before any training."""
    from mlora_export.base import load_base_model, load_tokenizer
    from mlora_export.data import Example, tokenize_examples
    from mlora_export.training import heldout_loss

    tok = load_tokenizer(base)
    model = load_base_model(base, dtype="float32", device="cpu")
    out = {}
    for regime in cfg.regimes:
        recs = [json.loads(line) for line in (work / regime / "val.jsonl").read_text(encoding="utf-8").splitlines()]
        feats = tokenize_examples([Example(prompt=r["prompt"], completion=r["completion"]) for r in recs], tok, 64)
        out[regime] = heldout_loss(model, feats, tok.pad_token_id, batch_size=cfg.eval_batch_size)
    return out


# -- one job: every method at one (regime, seed, lr) ---------------------------------------------
def _schedule(cfg: Settings, steps: int):  # noqa: ANN202 - a LambdaLR factor
    warm = max(1, round(cfg.warmup_fraction * steps))

    def factor(s: int) -> float:
        return (s + 1) / warm if s < warm else max(0.0, (steps - s) / max(1, steps - warm))

    return factor


def _train(cfg: Settings, base: Path, items: list[Any], collate: Any, method: str, r: int, seed: int, lr: float, steps: int,
           recipe: Any = None) -> tuple[Any, float]:
    """Train one adapter in a plain loop; return the live handle and the training wall-clock.

    ``method`` is the library's (``lora``, ``dylora``, ``matryoshka``, ``nested-loss``); ``recipe`` a
    :class:`mlora_export.training.NestedRecipe`: the loop only calls the handle's own functions
    (optimizer groups, step, loss), exactly those ``mlora-export train`` uses through its Trainer.
    """
    import torch

    from mlora_export.adapter import MatryoshkaConfig
    from mlora_export.base import load_base_model
    from mlora_export.training import add_nested_adapter

    model = load_base_model(base, dtype="float32", device="cpu")
    ranks = (r,) if method == "lora" else tuple(k for k in cfg.grid if k <= r)
    config = MatryoshkaConfig(method, r, ranks, cfg.scaling, cfg.alpha, extra={"base_model": str(base)})
    handle = add_nested_adapter(model, config, target_modules=list(cfg.target_modules), seed=seed, recipe=recipe)
    params = [p for p in handle.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(handle.param_groups(lr), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg, steps))
    order = random.Random(seed)  # the same batches for every method and lr of a seed
    handle.model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        batch = collate([items[order.randrange(len(items))] for _ in range(cfg.batch_size)])
        handle.train_diagonal(step, total_steps=steps)
        loss = handle.forward_loss(batch)
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


def _job_path(output: Path, regime: str, seed: int, lr: float, unit: str) -> Path:
    return output / "jobs" / f"{regime}-seed{seed}-lr{lr:g}" / f"{unit}.json"


def run_unit(cfg: Settings, output: Path, regime: str, seed: int, lr: float, unit: str) -> dict[str, Any]:
    """Train and score one method (``unit``; the ``lora`` grid also gives ``svd``) at one (regime, seed, lr).

    Returns ``{method: run}``, also written to ``jobs/<regime>-seed<seed>-lr<lr>/<unit>.json`` (reused when there).
    """
    import torch

    from mlora_export.base import load_base_model
    from mlora_export.converters.renest import renest_adapter
    from mlora_export.evaluation import exact_match, load_eval_data
    from mlora_export.training import load_nested_adapter

    path = _job_path(output, regime, seed, lr, unit)
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))["runs"]
    torch.set_num_threads(1)
    base = output / "base"
    data_dir = output / regime
    tok, items, collate = _training_data(output, regime)
    splits = {s: load_eval_data(data_dir / f"{s}.jsonl", tok) for s in ("val", "test")}

    def score(model: Any) -> dict[str, float]:  # greedy exact match, as score_model's (without its teacher-forced pass)
        return {s: exact_match(model, tok, d, batch_size=cfg.eval_batch_size) for s, d in splits.items()}

    def curve(handle: Any, ranks: tuple[int, ...]) -> dict[str, dict[int, float]]:
        out: dict[str, dict[int, float]] = {"val": {}, "test": {}}
        for k in ranks:
            handle.set_rank(k)
            for s, v in score(handle.model).items():
                out[s][k] = v
        return out

    r_max = max(cfg.grid)
    spec = METHODS[unit]
    recipe = cfg.recipe(unit)
    runs: dict[str, Any] = {}
    if spec.grid:
        runs[unit] = {}
        for k in cfg.grid:
            handle, secs = _train(cfg, base, items, collate, spec.method, k, seed, lr, cfg.steps, recipe)
            runs[unit][k] = {"seconds": secs, "steps": cfg.steps, **curve(handle, (k,))}
            if unit == "lora" and k == r_max:  # the svd baseline: this very run, re-nested
                work = output / "scratch" / f"{regime}-{seed}-{lr:g}"
                handle.save(work / "lora", force=True)
                t0 = time.perf_counter()
                renest_adapter(work / "lora", work / "svd", force=True)
                renest_s = time.perf_counter() - t0
                svd = load_nested_adapter(load_base_model(base, dtype="float32", device="cpu"), work / "svd")
                runs["svd"] = {"seconds": secs, "renest_seconds": renest_s, "steps": cfg.steps, **curve(svd, cfg.grid)}
                shutil.rmtree(work, ignore_errors=True)
    else:
        steps = spec.steps_factor * cfg.steps
        handle, secs = _train(cfg, base, items, collate, spec.method, r_max, seed, lr, steps, recipe)
        runs[unit] = {"seconds": secs, "steps": steps, **curve(handle, cfg.grid)}
        if spec.method == "matryoshka":  # diagnostic, not a product rank: the forward it was trained with
            handle.set_diagonal(handle.config.p)
            runs[unit]["training_diagonal"] = score(handle.model)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"regime": regime, "seed": seed, "lr": lr, "unit": unit, "runs": runs}, indent=1), encoding="utf-8")
    tmp.replace(path)
    shown = {m: [round(v * 100) for v in run["test"].values()] for m, run in runs.items() if not METHODS[m].grid}
    logger.info("%s seed %d lr %g %s: %s", regime, seed, lr, unit, shown or {k: round(v["test"][k] * 100) for k, v in runs[unit].items()})
    return runs


def run_job(cfg: Settings, output: Path, regime: str, seed: int, lr: float) -> dict[str, Any]:
    """Every selected method at one (regime, seed, lr): ``{"regime", "seed", "lr", "runs": {method: run}}``."""
    runs: dict[str, Any] = {}
    for unit in dict.fromkeys(unit_of(m) for m in cfg.methods):
        runs.update(run_unit(cfg, output, regime, seed, lr, unit))
    return {"regime": regime, "seed": seed, "lr": lr, "runs": {m: runs[m] for m in cfg.methods}}


def time_methods(cfg: Settings, output: Path, regime: str = "cipher", seed: int = 0, lr: float = 1.6e-2) -> dict[str, Any]:
    """Wall-clock of one training run of every selected method, one after the other in this process, on an
    otherwise idle machine: the compute comparison of the report (the search's own timings ran two
    jobs side by side and are noisier). Written to ``timing.json``, with :func:`step_costs`."""
    import os

    import torch

    from mlora_export.converters.renest import renest_adapter

    torch.set_num_threads(1)
    base = output / "base"
    _, items, collate = _training_data(output, regime)
    r_max = max(cfg.grid)
    runs: dict[str, float] = {}
    load = os.getloadavg()[0]
    renest = None
    for m in (m for m in cfg.methods if METHODS[m].grid):
        for k in cfg.grid:
            handle, runs[f"{m} r={k}"] = _train(cfg, base, items, collate, "lora", k, seed, lr, cfg.steps, cfg.recipe(m))
        if m == "lora":
            work = output / "scratch" / "timing"
            handle.save(work / "lora", force=True)
            t0 = time.perf_counter()
            renest_adapter(work / "lora", work / "svd", force=True)
            renest = time.perf_counter() - t0
            shutil.rmtree(work, ignore_errors=True)
    for m in (m for m in cfg.methods if not METHODS[m].grid and m != "svd"):
        spec = METHODS[m]
        runs[m] = _train(cfg, base, items, collate, spec.method, r_max, seed, lr, spec.steps_factor * cfg.steps, cfg.recipe(m))[1]
    grids = {m: sum(runs[f"{m} r={k}"] for k in cfg.grid) for m in cfg.methods if METHODS[m].grid}
    out = {"regime": regime, "seed": seed, "lr": lr, "threads": 1, "load_before": load, "load_after": os.getloadavg()[0],
           "seconds": runs, "grid_seconds": grids}
    if renest is not None:
        out["renest_seconds"] = renest
        out["svd_seconds"] = runs[f"lora r={r_max}"] + renest
    out["step_cost"] = step_costs(cfg, output, regime=regime, seed=seed, lr=lr)
    (output / "timing.json").write_text(json.dumps(out, indent=1), encoding="utf-8")
    return out


def step_costs(cfg: Settings, output: Path, regime: str = "cipher", seed: int = 0, lr: float = 1.6e-2, steps: int | None = None,
               reps: int | None = None) -> dict[str, Any]:
    """Seconds per training step of each selected one-run method against plain ``nested-loss`` (and of the
    LoRA+ grid's r = max run against the LoRA grid's): ``reps`` rounds of ``steps`` steps each, the
    methods in a rotated order every round; the cost ratio is the median over rounds of the per-round
    ratio (a round's runs are seconds apart, so the machine's load changes little within one)."""
    import torch

    torch.set_num_threads(1)
    steps = steps or max(10, cfg.steps // 3)
    reps = reps or cfg.step_cost_reps
    base = output / "base"
    _, items, collate = _training_data(output, regime)
    r_max = max(cfg.grid)
    names = ["nested-loss"] + [m for m in cfg.methods if METHODS[m].method == "nested-loss" and METHODS[m].steps_factor == 1 and m != "nested-loss"]
    pairs = {"lora-plus": "lora"} if "lora-plus" in cfg.methods else {}
    runs = names + [f"{m} r={r_max}" for pair in pairs.items() for m in pair]
    per_step: dict[str, list[float]] = {n: [] for n in runs}
    for rep in range(reps):
        for n in runs[rep % len(runs):] + runs[:rep % len(runs)]:
            if " r=" in n:
                m = n.split(" ")[0]
                secs = _train(cfg, base, items, collate, "lora", r_max, seed, lr, steps, cfg.recipe(m))[1]
            else:
                secs = _train(cfg, base, items, collate, METHODS[n].method, r_max, seed, lr, steps, cfg.recipe(n))[1]
            per_step[n].append(secs / steps)
    ref = dict.fromkeys(names, "nested-loss")
    ref.update({f"{a} r={r_max}": f"{b} r={r_max}" for a, b in pairs.items()})
    ratio = {n: [per_step[n][i] / per_step[ref[n]][i] for i in range(reps)] for n in runs if n in ref and ref[n] != n}
    return {"steps": steps, "reps": reps, "seconds_per_step": per_step, "reference": ref,
            "ratio": {n: statistics.median(v) for n, v in ratio.items()}, "ratio_min_max": {n: [min(v), max(v)] for n, v in ratio.items()}}


# -- selection on validation, report on test -----------------------------------------------------
def _ms(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def _k(d: dict[Any, Any], k: int) -> Any:
    return d[k] if k in d else d[str(k)]


def summarise(cfg: Settings, jobs: list[dict[str, Any]]) -> dict[str, Any]:
    """Choose each method's lr on validation (grids: per rank), report test at the choice; compute costs."""
    from mlora_export.method import aurac

    by: dict[tuple[str, int, float], dict[str, Any]] = {(j["regime"], j["seed"], j["lr"]): j["runs"] for j in jobs}
    grid = list(cfg.grid)
    regimes: dict[str, Any] = {}
    for regime in cfg.regimes:
        methods: dict[str, Any] = {}
        for m in cfg.methods:
            if METHODS[m].grid:  # each rank's lr by its mean validation exact match
                def val_rank(lr: float, k: int, m: str = m, regime: str = regime) -> float:
                    return statistics.fmean(_k(_k(by[(regime, s, lr)][m], k)["val"], k) for s in cfg.seeds)

                lr_of = {k: max(cfg.lrs, key=lambda lr, k=k: val_rank(lr, k)) for k in grid}
                per_seed = {s: [_k(_k(by[(regime, s, lr_of[k])][m], k)["test"], k) for k in grid] for s in cfg.seeds}
                val_search = {f"{lr:g}": {k: val_rank(lr, k) for k in grid} for lr in cfg.lrs}
                val_best = {s: [_k(_k(by[(regime, s, lr_of[k])][m], k)["val"], k) for k in grid] for s in cfg.seeds}
                methods[m] = _entry(cfg, per_seed, aurac, lr={k: lr_of[k] for k in grid}, val_search=val_search,
                                    seconds=_ms([sum(_k(by[(regime, s, lr_of[k])][m], k)["seconds"] for k in grid) for s in cfg.seeds]),
                                    steps=sum(_k(by[(regime, cfg.seeds[0], lr_of[k])][m], k)["steps"] for k in grid))
                methods[m]["val_aurac"] = statistics.fmean(aurac(grid, v)["v2"] for v in val_best.values())
                continue

            def val_aurac(lr: float, m: str = m) -> float:
                return statistics.fmean(aurac(grid, [_k(by[(regime, s, lr)][m]["val"], k) for k in grid])["v2"] for s in cfg.seeds)  # noqa: B023 - called in this iteration

            best = max(cfg.lrs, key=val_aurac)
            per_seed = {s: [_k(by[(regime, s, best)][m]["test"], k) for k in grid] for s in cfg.seeds}
            entry = _entry(cfg, per_seed, aurac, lr=best, val_search={f"{lr:g}": val_aurac(lr) for lr in cfg.lrs},
                           seconds=_ms([by[(regime, s, best)][m]["seconds"] for s in cfg.seeds]),
                           steps=by[(regime, cfg.seeds[0], best)][m]["steps"])
            entry["val_aurac"] = val_aurac(best)
            entry["val_aurac_per_seed"] = {s: aurac(grid, [_k(by[(regime, s, best)][m]["val"], k) for k in grid])["v2"] for s in cfg.seeds}
            if m == "svd":
                entry["renest_seconds"] = _ms([by[(regime, s, best)][m]["renest_seconds"] for s in cfg.seeds])
            if m == "matryoshka":
                entry["training_diagonal_test"] = _ms([by[(regime, s, best)][m]["training_diagonal"]["test"] for s in cfg.seeds])
            methods[m] = entry
        search_seconds = {m: sum(_run_seconds(by[(regime, s, lr)], m) for s in cfg.seeds for lr in cfg.lrs) / len(cfg.seeds)
                          for m in cfg.methods}
        regimes[regime] = {"methods": methods, "search_seconds_per_seed": search_seconds}
    return {"settings": dataclasses.asdict(cfg), "regimes": regimes}


def _run_seconds(runs: dict[str, Any], m: str) -> float:
    if METHODS[m].grid:
        return sum(r["seconds"] for r in runs[m].values())
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


def _paired(ms: dict[str, Any], a: str, b: str, key: str = "aurac_per_seed") -> tuple[float, float]:
    """Mean and sd over seeds of the per-seed AURAC v2 difference ``a - b`` in points (the seeds pair the runs;
    ``key``: test, or ``val_aurac_per_seed`` for validation at each method's chosen lr)."""
    sa, sb = ms[a][key], ms[b][key]
    diffs = [(sa[s] - sb[s]) * 100 for s in sa]
    return statistics.fmean(diffs), statistics.stdev(diffs) if len(diffs) > 1 else 0.0


def _v2(ms: dict[str, Any], m: str) -> str:
    return f"{ms[m]['aurac']['v2']['mean'] * 100:.1f}"


def verdict(summary: dict[str, Any]) -> list[str]:
    """Plain sentences computed from the numbers (no fixed conclusion)."""
    lines = []
    grid_n = len(summary["settings"]["grid"])
    timing = summary.get("timing")
    for regime, res in summary["regimes"].items():
        ms = res["methods"]
        best = max(ms, key=lambda m: ms[m]["aurac"]["v2"]["mean"])
        parts = [f"- **{REGIME_LABELS[regime]}**: best test AURAC v2: {METHOD_LABELS[best]} ({_v2(ms, best)})."]
        singles = [m for m in ms if not METHODS[m].grid and METHODS[m].steps_factor == 1]
        if singles:
            one_run = max(singles, key=lambda m: ms[m]["aurac"]["v2"]["mean"])
            parts.append(f"Best single run at one run's steps: {METHOD_LABELS[one_run]} ({_v2(ms, one_run)}).")
        for g in (g for g in GRIDS if g in ms):
            for m in (m for m in ("nested-loss", "nested-loss-2x") if m in ms):
                d, sd = _paired(ms, m, g)
                if timing and g in timing.get("grid_seconds", {}) and m in timing["seconds"]:
                    wall = f"{timing['grid_seconds'][g] / timing['seconds'][m]:.1f}× less training wall-clock, timed in turn"
                else:
                    wall = f"{ms[g]['train_seconds']['mean'] / ms[m]['train_seconds']['mean']:.1f}× less training wall-clock in the search"
                parts.append(
                    f"{METHOD_LABELS[m]} vs the {METHOD_LABELS[g]} of {grid_n} runs: {_v2(ms, m)} vs {_v2(ms, g)} "
                    f"(per-seed difference {d:+.1f} ± {sd:.1f} points) for {ms[g]['example_passes'] / ms[m]['example_passes']:.1f}× fewer "
                    f"example passes ({wall})."
                )
        if "nested-loss" in ms:
            for m in (m for m in DIRECTIONS if m in ms):
                d, sd = _paired(ms, m, "nested-loss")
                dv = (ms[m]["val_aurac"] - ms["nested-loss"]["val_aurac"]) * 100
                parts.append(f"{METHOD_LABELS[m]}: {_v2(ms, m)} ({d:+.1f} ± {sd:.1f} points vs nested-loss on test, {dv:+.1f} on validation).")
        if "matryoshka" in ms:
            parts.append(f"The paper's one-pass matryoshka: {_v2(ms, 'matryoshka')} under the inference rule, although its training forward "
                         f"(diagonal p at full rank) scores {ms['matryoshka']['training_diagonal_test']['mean'] * 100:.1f}% test exact match.")
        if "svd" in ms:
            parts.append(f"SVD re-nesting of one LoRA r={max(summary['settings']['grid'])} run: {_v2(ms, 'svd')}.")
        lines.append(" ".join(parts))
    for row in direction_verdicts(summary):
        lines.append(f"- **{METHOD_LABELS[row['method']]}**: {row['verdict']}")
    return lines


def direction_verdicts(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per direction of issue 26 present in every regime: validation and test AURAC v2 against
    ``nested-loss`` per regime, the step cost, and the verdict of the adoption rule (better validation
    AURAC v2 in every regime, and a step at most 1.05× ``nested-loss``'s)."""
    regimes = summary["regimes"]
    cost = (summary.get("timing") or {}).get("step_cost", {}).get("ratio", {})
    rows = []
    for m in DIRECTIONS:
        if not all(m in r["methods"] and "nested-loss" in r["methods"] for r in regimes.values()):
            continue
        per = {}
        for regime, r in regimes.items():
            ms = r["methods"]
            d, sd = _paired(ms, m, "nested-loss")
            vd, vsd = _paired(ms, m, "nested-loss", key="val_aurac_per_seed")
            per[regime] = {"val_delta": (ms[m]["val_aurac"] - ms["nested-loss"]["val_aurac"]) * 100, "val_delta_sd": vsd,
                           "test_delta": d, "test_delta_sd": sd}
        # a clear win: better mean validation AURAC v2, by more than the sd of the per-seed differences, in every regime
        wins = all(v["val_delta"] > 0 and v["val_delta"] > v["val_delta_sd"] for v in per.values())
        ratio = cost.get(m)
        cheap = ratio is not None and ratio <= 1.05
        won = [g for g, v in per.items() if v["val_delta"] > 0]
        deltas = ", ".join(f"{per[g]['val_delta']:+.1f} ± {per[g]['val_delta_sd']:.1f} ({g})" for g in per)
        if wins and cheap:
            text = f"validation AURAC v2 {deltas} points vs nested-loss, a clear win in every regime, at {ratio:.2f}× its step cost: a candidate default."
        elif wins:
            text = (f"validation AURAC v2 {deltas} points vs nested-loss, a clear win in every regime, but " +
                    (f"its step costs {ratio:.2f}× (over 1.05×)." if ratio is not None else "its step cost was not measured."))
        else:
            text = (f"not adopted: validation AURAC v2 {deltas} points vs nested-loss (mean ± sd of the per-seed differences; " +
                    (f"better on average only in {', '.join(won)})." if won and len(won) < len(per) else
                     "better on average everywhere, but not by more than the seeds' spread everywhere)." if won else "better in no regime)."))
        rows.append({"method": m, "regimes": per, "step_cost": ratio, "adopt": wins and cheap, "verdict": text})
    return rows


def gap_table(summary: dict[str, Any]) -> list[str]:
    """The table of issue 26: every direction next to nested-loss and the grids, test AURAC v2 (mean ± sd)
    per regime, the chosen lrs, the step cost against nested-loss and the verdict (:func:`direction_verdicts`)."""
    regimes = list(summary["regimes"])
    rows = [m for m in ("lora", "lora-plus", "nested-loss", "nested-loss-2x", *DIRECTIONS) if all(m in summary["regimes"][r]["methods"] for r in regimes)]
    if "nested-loss" not in rows or not any(m in DIRECTIONS for m in rows):  # the table reads against nested-loss
        return []
    verdicts = {v["method"]: v for v in summary.get("directions", direction_verdicts(summary))}
    cost = (summary.get("timing") or {}).get("step_cost", {}).get("ratio", {})
    r_max = max(summary["settings"]["grid"])

    def lr(m: str, regime: str) -> str:
        v = summary["regimes"][regime]["methods"][m]["lr"]
        return "per rank" if isinstance(v, dict) else f"{v:g}"

    head = ["method"] + [f"{r}: test AURAC v2" for r in regimes] + [f"{r}: Δ validation vs nested-loss" for r in regimes] + \
        ["chosen lr (" + " / ".join(regimes) + ")", "step cost vs nested-loss", "verdict"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 2) + "---|"]
    for m in rows:
        cells = [METHOD_LABELS[m]]
        for r in regimes:
            a = summary["regimes"][r]["methods"][m]["aurac"]["v2"]
            cells.append(f"{a['mean'] * 100:.1f} ± {a['std'] * 100:.1f}")
        for r in regimes:
            ms = summary["regimes"][r]["methods"]
            if m == "nested-loss":
                cells.append(f"({ms[m]['val_aurac'] * 100:.1f})")
            elif m in verdicts:
                cells.append(f"{verdicts[m]['regimes'][r]['val_delta']:+.1f} ± {verdicts[m]['regimes'][r]['val_delta_sd']:.1f}")
            else:
                cells.append(f"{(ms[m]['val_aurac'] - ms['nested-loss']['val_aurac']) * 100:+.1f}")
        cells.append(" / ".join(lr(m, r) for r in regimes))
        c = cost.get(m) if m in DIRECTIONS else (cost.get(f"lora-plus r={r_max}") if m == "lora-plus" else None)
        cells.append(f"{c:.3f}×" + (" (vs LoRA r=max)" if m == "lora-plus" else "") if c is not None else ("1× (reference)" if m == "nested-loss" else ""))
        if m in verdicts:
            v = verdicts[m]
            clear = all(x["val_delta"] > 0 and x["val_delta"] > x["val_delta_sd"] for x in v["regimes"].values())
            cells.append("**adopt**" if v["adopt"] else ("clear validation win everywhere; too costly" if clear else "not adopted"))
        else:
            cells.append("baseline")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _rank_table(cfg: dict[str, Any], ms: dict[str, Any], order: list[str], cell: Any) -> list[str]:
    grid = cfg["grid"]
    lines = ["| rank | " + " | ".join(METHOD_LABELS[m] for m in order) + " |", "|---:|" + "---:|" * len(order)]
    for k in grid:
        lines.append(f"| {k} | " + " | ".join(cell(_k(ms[m]["ranks"], k)) for m in order) + " |")
    for v in ("v1", "v2"):
        lines.append(f"| **AURAC {v}** | " + " | ".join(f"**{cell(ms[m]['aurac'][v])}**" for m in order) + " |")
    lines.append("| validation AURAC v2 at the chosen lr (grids: per-rank choices) | " + " | ".join(f"{ms[m]['val_aurac'] * 100:.1f}" for m in order) + " |")
    lines.append("| chosen lr | " + " | ".join(
        ("per rank: " + ", ".join(f"{_k(ms[m]['lr'], k):g}" for k in grid)) if METHODS[m].grid else f"{ms[m]['lr']:g}" for m in order) + " |")
    lines.append("| optimisation steps (×batch " + str(cfg["batch_size"]) + ") | " + " | ".join(str(ms[m]["steps"]) for m in order) + " |")
    lines.append("| training wall-clock at the chosen lr, in the search (s; noisy) | " + " | ".join(cell(ms[m]["train_seconds"], 1.0) for m in order) + " |")
    return lines


def report_markdown(summary: dict[str, Any]) -> str:
    cfg = summary["settings"]
    n = len(cfg["seeds"])
    grid = cfg["grid"]

    def cell(d: dict[str, float], f: float = 100.0) -> str:
        return f"{d['mean'] * f:.1f} ± {d['std'] * f:.1f}" if n > 1 else f"{d['mean'] * f:.1f}"

    lines = [f"Test-split exact match (%), {cfg['test_examples']} examples, mean ± sd over seeds {list(cfg['seeds'])}; "
             f"each method's lr chosen on the {cfg['val_examples']}-example validation split from {list(cfg['lrs'])}.", ""]
    for regime, res in summary["regimes"].items():
        ms = res["methods"]
        present = [m for m in METHODS if m in ms]
        base_rows = [m for m in present if m in BASELINES or m in GRIDS]
        dir_rows = [m for m in ("lora", "lora-plus", "nested-loss") if m in ms] + [m for m in present if m in DIRECTIONS]
        lines += [f"### {REGIME_LABELS[regime]}", ""]
        for title, order in (("Baselines", base_rows), ("Directions of issue 26 (against nested-loss and the grids)", dir_rows)):
            if order and (title == "Baselines" or any(m in DIRECTIONS for m in order)):
                lines += [f"**{title}**", "", *_rank_table(cfg, ms, order, cell), ""]
        others = [m for m in present if not METHODS[m].grid]
        grids = [m for m in present if METHODS[m].grid]
        lines += ["Validation AURAC v2 (%) per lr (mean over seeds; the grids: validation exact match per rank " + "/".join(map(str, grid)) + "):", "",
                  "| lr | " + " | ".join(METHOD_LABELS[m] for m in others + grids) + " |", "|---:|" + "---:|" * len(others + grids)]
        for lr in cfg["lrs"]:
            key = f"{lr:g}"
            row = [f"{ms[m]['val_search'][key] * 100:.1f}" for m in others]
            row += ["/".join(f"{_k(ms[g]['val_search'][key], k) * 100:.0f}" for k in grid) for g in grids]
            lines.append(f"| {key} | " + " | ".join(row) + " |")
        lines += ["", "Whole lr search, training wall-clock per seed (s): " +
                  ", ".join(f"{m} {res['search_seconds_per_seed'][m]:.0f}" for m in present) + ".", ""]
    timing = summary.get("timing") or {}
    if "seconds" in timing:
        t = timing["seconds"]
        rows = [(f"{METHOD_LABELS[g]} ({len(grid)} runs)", sec) for g, sec in timing["grid_seconds"].items()]
        rows += [(METHOD_LABELS[m], t[m]) for m in METHODS if m in t]
        if "svd_seconds" in timing:
            rows.append((METHOD_LABELS["svd"], timing["svd_seconds"]))
        ref = timing["grid_seconds"].get("lora")
        lines += [f"Training wall-clock of one run of each method, one after the other in one process with one thread "
                  f"(regime {timing['regime']}, seed {timing['seed']}, lr {timing['lr']:g}; load average {timing['load_before']:.2f} "
                  f"before, {timing['load_after']:.2f} after):", "",
                  "| run | seconds | LoRA grid / this |", "|---|---:|---:|"]
        lines += [f"| {name} | {sec:.1f} | {ref / sec:.2f}× |" if ref else f"| {name} | {sec:.1f} | |" for name, sec in rows]
        if "lora" in timing["grid_seconds"]:
            lines += ["", "Per grid run: " + ", ".join(f"r={k} {t[f'lora r={k}']:.1f} s" for k in grid) +
                      (f"; re-nesting the r={max(grid)} run by SVD: {timing['renest_seconds'] * 1000:.0f} ms." if "renest_seconds" in timing else ".")]
    sc = timing.get("step_cost")
    if sc:
        lines += [f"Cost of a training step against its reference ({sc['reps']} rounds of {sc['steps']} steps, methods in rotated order; "
                  "median and range of the per-round ratio):", "", "| run | reference | s/step (median) | ratio | range |", "|---|---|---:|---:|---|"]
        for name, r in sc["ratio"].items():
            lo, hi = sc["ratio_min_max"][name]
            lines.append(f"| {name} | {sc['reference'][name]} | {statistics.median(sc['seconds_per_step'][name]) * 1000:.1f} ms | {r:.3f}× | {lo:.3f}–{hi:.3f} |")
        lines.append("")
    gap = gap_table(summary)
    if gap:
        lines += ["**What closes the gap and what does not** (validation AURAC v2 chooses; a direction is adopted only "
                  "if it beats nested-loss on validation in every regime by more than the sd of the per-seed differences, at a step "
                  "cost of at most 1.05×; a grid's validation AURAC v2 is that of its per-rank choices, optimistic by that selection):",
                  "", *gap, ""]
    lines += ["**Verdict (computed from the tables):**", "", *verdict(summary), ""]
    if summary.get("pending"):
        lines += ["**Pending** (rows left out: not all their jobs are finished; job files there / expected): " +
                  ", ".join(f"{METHOD_LABELS[m]} {p['jobs']}/{p['of']}" for m, p in summary["pending"].items()) + ".", ""]
    base = summary.get("base")
    if base:
        skills = ", ".join(f"{k} {v * 100:.1f}%" for k, v in base["exact_match"].items())
        lines.append(f"Base model ({base['pretrain']['params']:,} parameters, pre-trained {cfg['pretrain_steps']} steps in "
                     f"{base['pretrain']['seconds']:.0f} s): exact match {skills}.")
        if base.get("heldout_loss"):
            lines.append("Base model's held-out loss on each regime's validation split (mean token cross-entropy, nats): " +
                         ", ".join(f"{k} {v:.3f}" for k, v in base["heldout_loss"].items()) + ".")
        if "total_seconds" in summary:
            lines.append(f"Total run time {summary['total_seconds'] / 60:.1f} min.")
    return "\n".join(lines) + "\n"


def plot_summary(summary: dict[str, Any], path: Path) -> None:
    """Mean test exact match vs rank (log2 axis) per method and regime, with min–max bands over seeds:
    one row of panels for the baselines and, when there are any, one for the directions of issue 26
    (with nested-loss and the grids for reference)."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from mlora_export.evaluation.plot import rank_axis

    cfg = summary["settings"]
    regimes = list(summary["regimes"])
    present = [m for m in METHODS if all(m in summary["regimes"][r]["methods"] for r in regimes)]
    panels = [("baselines", [m for m in present if m in BASELINES or m in GRIDS])]
    if any(m in DIRECTIONS for m in present):
        panels.append(("directions of issue 26", [m for m in present if m in ("lora", "lora-plus", "nested-loss") or m in DIRECTIONS]))
    panels = [(t, ms) for t, ms in panels if ms]
    fig = Figure(figsize=(6.5 * len(regimes), 4.8 * len(panels)), dpi=100)
    FigureCanvasAgg(fig)
    ks = list(cfg["grid"])
    colour = {m: colormaps["tab20"](j % 20) for j, m in enumerate(METHODS)}
    for row, (title, methods) in enumerate(panels):
        for i, regime in enumerate(regimes):
            ax = fig.add_subplot(len(panels), len(regimes), row * len(regimes) + i + 1)
            ms = summary["regimes"][regime]["methods"]
            for m in methods:
                pts = [_k(ms[m]["ranks"], k) for k in ks]
                style = "--" if m in DIRECTIONS or m == "lora-plus" else "-"
                ax.plot(ks, [p["mean"] * 100 for p in pts], marker="o", linestyle=style, color=colour[m],
                        label=f"{METHOD_LABELS[m]} ({ms[m]['aurac']['v2']['mean'] * 100:.1f})")
                if len(cfg["seeds"]) > 1:
                    ax.fill_between(ks, [p["min"] * 100 for p in pts], [p["max"] * 100 for p in pts], color=colour[m], alpha=0.10)
            base = summary.get("base", {}).get("exact_match", {}).get(f"{regime} (test)")
            if base is not None:
                ax.axhline(base * 100, color="gray", linestyle=":", label=f"base model ({base * 100:.1f}%)")
            rank_axis(ax, ks)
            ax.set_ylabel("test exact match (%)")
            ax.set_title(f"{REGIME_LABELS[regime]}: {title}; legend: AURAC v2", fontsize=9)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=6.5, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, format="png")


# -- the experiment ------------------------------------------------------------------------------
def _quiet() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("mlora_export").setLevel(logging.ERROR)


def _unit_job(args: tuple[Settings, Path, str, int, float, str]) -> dict[str, Any]:
    _quiet()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    return run_unit(*args)


#: Settings a rerun into the same output may change (they only add or select jobs).
_EXTENSIBLE = ("seeds", "lrs", "regimes", "workers", "methods", "step_cost_reps")


def finished_jobs(cfg: Settings, output: Path) -> tuple[list[tuple[str, int, float, str]], dict[str, int]]:
    """``(finished, missing)``: the (regime, seed, lr, unit) jobs of ``cfg`` whose file is in
    ``output/jobs``, and the number of missing job files per unit."""
    finished, missing = [], {}
    for unit in dict.fromkeys(unit_of(m) for m in cfg.methods):
        for regime in cfg.regimes:
            for seed in cfg.seeds:
                for lr in cfg.lrs:
                    if _job_path(output, regime, seed, lr, unit).is_file():
                        finished.append((regime, seed, lr, unit))
                    else:
                        missing[unit] = missing.get(unit, 0) + 1
    return finished, missing


def report_only(cfg: Settings, output: Path) -> dict[str, Any]:
    """Summarise and report the methods of ``cfg`` whose jobs are all in ``output``, training nothing.

    The methods with a missing job are left out and named in the report (``pending``: the number of
    their job files there and expected); nothing else is written than ``summary.json``,
    ``report.md`` and ``rank_curve.png`` (an earlier ``timing.json`` is reported).

    Raises:
        SystemExit: ``output`` holds no pre-trained base or jobs run with other settings, or no method is complete.
    """
    settings_file = output / "settings.json"
    if not (output / "pretrain.json").is_file() or not settings_file.is_file():
        raise SystemExit(f"error: {output} holds no finished pre-training (pretrain.json, settings.json): nothing to report")
    fixed = {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(cfg))).items() if k not in _EXTENSIBLE}
    old = {k: v for k, v in json.loads(settings_file.read_text(encoding="utf-8")).items() if k not in _EXTENSIBLE}
    if old != fixed:
        raise SystemExit(f"error: {output} holds jobs run with other settings ({', '.join(sorted(k for k in fixed if old.get(k) != fixed[k]))})")
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"error: unknown method(s) {', '.join(unknown)}: expected some of {', '.join(METHODS)}")
    _, missing = finished_jobs(cfg, output)
    expected = len(cfg.regimes) * len(cfg.seeds) * len(cfg.lrs)
    complete = tuple(m for m in cfg.methods if unit_of(m) not in missing)
    if not complete:
        raise SystemExit(f"error: no method has all its {expected} jobs in {output / 'jobs'}: nothing to report")
    pending = {m: expected - missing[unit_of(m)] for m in cfg.methods if unit_of(m) in missing}
    cfg = dataclasses.replace(cfg, methods=complete)
    jobs = []
    for regime in cfg.regimes:
        for seed in cfg.seeds:
            for lr in cfg.lrs:
                runs: dict[str, Any] = {}
                for unit in dict.fromkeys(unit_of(m) for m in complete):
                    runs.update(json.loads(_job_path(output, regime, seed, lr, unit).read_text(encoding="utf-8"))["runs"])
                jobs.append({"regime": regime, "seed": seed, "lr": lr, "runs": {m: runs[m] for m in complete}})
    summary = summarise(cfg, jobs)
    if (output / "timing.json").exists():
        summary["timing"] = json.loads((output / "timing.json").read_text(encoding="utf-8"))
    skills_file = output / "base_skills.json"
    skills = json.loads(skills_file.read_text(encoding="utf-8")) if skills_file.exists() else {"exact_match": {}}
    skills = {k: {name: v for name, v in d.items() if name in OPS.values() or name.split(" ")[0] in cfg.regimes} for k, d in skills.items()}
    summary["base"] = {"pretrain": json.loads((output / "pretrain.json").read_text(encoding="utf-8")), **skills}
    summary["directions"] = direction_verdicts(summary)
    summary["pending"] = {m: {"jobs": done, "of": expected} for m, done in pending.items()}
    (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (output / "report.md").write_text(report_markdown(summary), encoding="utf-8")
    plot_summary(summary, output / "rank_curve.png")
    return summary


def run(cfg: Settings, output: Path, *, force: bool = False, timing: bool = False, step_cost: bool = False) -> dict[str, Any]:
    """Run everything into ``output`` (reusing finished jobs there unless ``force``); return the summary.

    ``timing`` also (re)measures :func:`time_methods` (with the step costs), ``step_cost`` only
    :func:`step_costs`; an earlier ``timing.json`` is reported either way. :func:`report_only`
    reports the finished jobs without training.

    Jobs run method by method (every seed and lr of a method, then the next; the one-run methods of
    every regime before the grids), so an interrupted run leaves whole rows; a rerun resumes from the
    job files.
    """
    import torch

    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"error: unknown method(s) {', '.join(unknown)}: expected some of {', '.join(METHODS)}")
    if output.exists() and force:
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)
    # A job file is keyed by (regime, seed, lr, method): a rerun may add seeds, lrs, regimes or methods, not change the rest.
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
    skills_file = output / "base_skills.json"
    skills = json.loads(skills_file.read_text(encoding="utf-8")) if skills_file.exists() else {}
    if not all(f"{r} (test)" in skills.get("exact_match", {}) for r in cfg.regimes):
        skills = {"exact_match": {**skills.get("exact_match", {}), **base_skills(cfg, base, output)},
                  "heldout_loss": {**skills.get("heldout_loss", {}), **base_heldout_loss(cfg, base, output)}}
        skills_file.write_text(json.dumps(skills, indent=1), encoding="utf-8")
    skills = {k: {name: v for name, v in d.items() if name in OPS.values() or name.split(" ")[0] in cfg.regimes} for k, d in skills.items()}
    logger.info("base: %s", {k: round(v, 3) for k, v in skills["exact_match"].items()})
    units = list(dict.fromkeys(unit_of(m) for m in cfg.methods))
    # one-run methods first (every regime), then the grids (six runs each): the directions' rows come early
    todo = [(cfg, output, regime, seed, lr, unit) for grids in (False, True) for regime in cfg.regimes
            for unit in units if METHODS[unit].grid == grids for seed in cfg.seeds for lr in cfg.lrs]
    if cfg.workers > 1:
        import multiprocessing

        with ProcessPoolExecutor(max_workers=cfg.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            done = list(pool.map(_unit_job, todo))
    else:
        done = [run_unit(*t) for t in todo]
    merged: dict[tuple[str, int, float], dict[str, Any]] = {}
    for t, runs in zip(todo, done):
        merged.setdefault((t[2], t[3], t[4]), {}).update(runs)
    jobs = [{"regime": r, "seed": s, "lr": lr, "runs": {m: runs[m] for m in cfg.methods}} for (r, s, lr), runs in merged.items()]
    summary = summarise(cfg, jobs)
    if timing:
        time_methods(cfg, output, regime=cfg.regimes[0])
    elif step_cost:
        old = json.loads((output / "timing.json").read_text(encoding="utf-8")) if (output / "timing.json").exists() else {}
        old["step_cost"] = step_costs(cfg, output, regime=cfg.regimes[0])
        (output / "timing.json").write_text(json.dumps(old, indent=1), encoding="utf-8")
    if (output / "timing.json").exists():
        summary["timing"] = json.loads((output / "timing.json").read_text(encoding="utf-8"))
    summary["base"] = {"pretrain": pre, **skills}
    summary["directions"] = direction_verdicts(summary)
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
    ap.add_argument("--timing", action="store_true", help="also time one run of every method in turn, and the step costs (run it on an idle machine)")
    ap.add_argument("--step-cost", action="store_true", help="also measure each direction's cost per training step against nested-loss")
    ap.add_argument("--report-only", action="store_true",
                    help="train nothing: report the methods whose jobs are all in --output, and name the others as pending")
    ap.add_argument("--methods", type=str, default=None,
                    help="comma-separated methods to run and report (default all): " + ", ".join(METHODS))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    _quiet()
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
    if args.methods:
        over["methods"] = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    if args.report_only:
        if args.force or args.timing or args.step_cost:
            ap.error("--report-only trains and times nothing: it takes no --force, --timing or --step-cost")
        summary = report_only(dataclasses.replace(cfg, **over), args.output)
    else:
        summary = run(dataclasses.replace(cfg, **over), args.output, force=args.force, timing=args.timing, step_cost=args.step_cost)
    sys.stdout.write(report_markdown(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
