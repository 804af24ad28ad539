#!/usr/bin/env python
"""Reproduce the paper's claim in miniature: one MatryoshkaLoRA run vs a grid of LoRA runs vs DyLoRA.

1. **Pre-train** a small Llama-style causal LM (character tokenizer, :mod:`mlora_export.tiny`) from
   scratch on a synthetic language of three string operations on the 52 ASCII letters, each marked by
   its operator: copy ``abc=abc``, reverse ``abc<cba`` and shift ``abc+bcd``. The base is checked on
   held-out strings of each operation (exact match), so it demonstrably learned something.
2. **Fine-tune** on a *different* task: a fixed random substitution cipher (a derangement ``π`` of
   the 52 letters) written with the copy operator, ``abc=π(a)π(b)π(c)``. The base scores 0 on it
   (it copies), and the adapter must re-map 52 letter identities, which takes rank.
3. Train, with the **same** steps, learning rate, batch size, scaling, seed and data (the same
   sequence of batches), in a plain PyTorch loop through :func:`mlora_export.training.add_nested_adapter`:
   a grid of plain LoRA adapters, one run per rank in ``GRID``; one DyLoRA run at ``r = max(GRID)``
   with train ranks ``GRID``; one MatryoshkaLoRA run, same setting.
4. **Evaluate** every rank with :func:`mlora_export.evaluation.evaluate` (exact-match, greedy
   decoding, held-out strings never seen in training), for several seeds; write ``report.md``
   (per-rank accuracy, AURAC v1/v2, training wall-clock, mean ± standard deviation over seeds),
   ``summary.json`` and ``rank_curve.png``.

Nothing is tuned per method: one setting for all (``Settings``). Run ``--smoke`` for a 1-minute check.

    python examples/reproduce/reproduce.py --output ./repro --threads 1   # the full run (~4-6 min on 2 shared CPU cores)
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger("reproduce")

LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"  # the synthetic language's symbols
OPS = {"=": "copy", "<": "reverse", "+": "shift"}
METHOD_LABELS = {"lora": "LoRA grid (one run per rank)", "dylora": "DyLoRA (one run)", "matryoshka": "MatryoshkaLoRA (one run)"}


@dataclass(frozen=True)
class Settings:
    """Every knob of the experiment; one setting for all methods."""

    grid: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    seeds: tuple[int, ...] = (0, 1, 2)
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
    eval_examples: int = 300
    steps: int = 300
    batch_size: int = 32
    lr: float = 2e-3
    scaling: str = "sqrt"
    alpha: float = 2.0
    #: the attention and MLP output projections of every layer (see README "Choices, stated once")
    target_modules: tuple[str, ...] = ("o_proj", "down_proj")
    min_len: int = 4
    max_len: int = 8
    eval_batch_size: int = 100
    threads: int = 2

    @classmethod
    def smoke(cls) -> "Settings":
        return cls(
            grid=(1, 2, 4), seeds=(0,), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            pretrain_steps=25, pretrain_batch=16, train_examples=100, eval_examples=16, steps=8, batch_size=8,
            min_len=3, max_len=5, threads=1,
        )


# -- synthetic language and task ---------------------------------------------------------------
def _op(op: str, s: str) -> str:
    if op == "=":
        return s
    if op == "<":
        return s[::-1]
    return "".join(LETTERS[(LETTERS.index(c) + 1) % len(LETTERS)] for c in s)


def cipher(seed: int = 1234) -> dict[str, str]:
    """A fixed derangement of the letters (no letter maps to itself), the fine-tuning task."""
    rnd = random.Random(seed)
    while True:
        perm = list(LETTERS)
        rnd.shuffle(perm)
        if all(a != b for a, b in zip(LETTERS, perm)):
            return dict(zip(LETTERS, perm))


def random_word(rnd: random.Random, cfg: Settings) -> str:
    return "".join(rnd.choice(LETTERS) for _ in range(rnd.randint(cfg.min_len, cfg.max_len)))


def task_split(cfg: Settings, seed: int = 99) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Disjoint train / held-out ``{"prompt", "completion"}`` records of the cipher task (fixed for all seeds)."""
    table = cipher()
    rnd = random.Random(seed)
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < cfg.train_examples + cfg.eval_examples:
        w = random_word(rnd, cfg)
        if w not in seen:
            seen.add(w)
            words.append(w)
    recs = [{"prompt": f"{w}=", "completion": "".join(table[c] for c in w)} for w in words]
    return recs[: cfg.train_examples], recs[cfg.train_examples :]


def write_jsonl(path: Path, records: list[dict[str, str]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


# -- pre-training --------------------------------------------------------------------------------
def pretrain(cfg: Settings, out: Path) -> dict[str, Any]:
    """Pre-train the base on copy / reverse / shift strings; save it with its tokenizer; report held-out exact match."""
    import torch
    from transformers import LlamaForCausalLM

    from mlora_export.data import CompletionCollator, Example, tokenize_examples
    from mlora_export.tiny import build_char_tokenizer, tiny_llama_config

    tok = build_char_tokenizer()
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
            op = rnd.choice(list(OPS))
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
    """Held-out exact match of the pre-trained base on each pre-training operation and on the cipher task."""
    from mlora_export.evaluation import greedy_completions, load_base_model, load_eval_data, load_tokenizer

    tok = load_tokenizer(base)
    model = load_base_model(base, dtype="float32", device="cpu")
    rnd = random.Random(4242)
    out = {}
    for op, name in OPS.items():
        recs = [{"prompt": f"{w}{op}", "completion": _op(op, w)} for w in (random_word(rnd, cfg) for _ in range(cfg.eval_examples))]
        path = work / f"base-{name}.jsonl"
        write_jsonl(path, recs)
        data = load_eval_data(path, tok)
        preds = greedy_completions(model, tok, data, batch_size=cfg.eval_batch_size)
        out[name] = sum(p.strip() == r["completion"] for p, r in zip(preds, recs)) / len(recs)
    return out


# -- fine-tuning -------------------------------------------------------------------------------
def finetune(cfg: Settings, base: Path, train: list[dict[str, str]], method: str, r: int, seed: int, out: Path) -> float:
    """Train one adapter (``method`` at max rank ``r``) and save it; return the training wall-clock in seconds.

    Identical for every method: the same model, steps, lr, batch sequence (a function of ``seed``),
    scaling and alpha. ``matryoshka``/``dylora`` train ranks are the grid ranks up to ``r``.
    """
    import torch

    from mlora_export.adapter import MatryoshkaConfig
    from mlora_export.data import CompletionCollator, Example, tokenize_examples
    from mlora_export.evaluation import load_base_model, load_tokenizer
    from mlora_export.training import add_nested_adapter

    tok = load_tokenizer(base)
    model = load_base_model(base, dtype="float32", device="cpu")
    items = tokenize_examples([Example(prompt=x["prompt"], completion=x["completion"]) for x in train], tok, 64)
    collate = CompletionCollator(tok.pad_token_id)
    ranks = (r,) if method == "lora" else tuple(k for k in cfg.grid if k <= r)
    config = MatryoshkaConfig(method, r, ranks, cfg.scaling, cfg.alpha, extra={"base_model": str(base)})
    handle = add_nested_adapter(model, config, target_modules=list(cfg.target_modules), seed=seed)
    params = [p for p in handle.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    order = random.Random(seed)
    handle.model.train()
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        batch = collate([items[order.randrange(len(items))] for _ in range(cfg.batch_size)])
        handle.train_diagonal(step)
        loss = handle.model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t0
    logger.info("%s r=%d seed=%d: %.1f s, last loss %.4f", method, r, seed, seconds, float(loss.detach()))
    handle.model.eval()
    handle.save(out, force=True, extra={"train_seconds": seconds, "seed": seed, "steps": cfg.steps})
    return seconds


def training_forward_scores(cfg: Settings, output: Path) -> dict[str, Any]:
    """Diagnostic, not a product rank: exact match of each seed's MatryoshkaLoRA run with the *training*
    diagonal kept on the first ``k`` components (``d_i = p_i`` for ``i ≤ k``, 0 above) instead of the
    inference rule ``d_i = s(k)`` of DESIGN.md §1. ``k = r`` is exactly the forward pass it was trained with."""
    from mlora_export.evaluation import load_base_model, load_eval_data, load_tokenizer, score_model
    from mlora_export.training import load_nested_adapter

    base = output / "base"
    tok = load_tokenizer(base)
    data = load_eval_data(output / "heldout.jsonl", tok)
    per_seed = {}
    for seed in cfg.seeds:
        handle = load_nested_adapter(load_base_model(base, dtype="float32", device="cpu"), output / "runs" / f"seed{seed}" / "matryoshka")
        p = handle.config.p or []
        r = handle.config.max_rank
        scores = {}
        for k in cfg.grid:
            handle.set_diagonal([p[i] if i < k else 0.0 for i in range(r)])
            scores[k] = score_model(handle.model, tok, data, metric="exact-match", batch_size=cfg.eval_batch_size).score
        per_seed[seed] = scores
    return {"ranks": {k: _ms([per_seed[s][k] for s in cfg.seeds]) for k in cfg.grid}, "per_seed": per_seed}


def finish(cfg: Settings, output: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """Add the diagnostic, then write ``summary.json``, ``report.md`` and ``rank_curve.png``."""
    summary["diagnostic_matryoshka_training_diagonal"] = training_forward_scores(cfg, output)
    (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (output / "report.md").write_text(report_markdown(summary), encoding="utf-8")
    plot_summary(summary, output / "rank_curve.png")
    return summary


# -- the experiment ------------------------------------------------------------------------------
def run(cfg: Settings, output: Path, *, force: bool = False) -> dict[str, Any]:
    """Run everything into ``output``; return the summary (also written as ``summary.json``)."""
    import torch

    from mlora_export.evaluation import evaluate, write_results

    if output.exists():
        if not force:
            raise SystemExit(f"error: output {str(output)!r} exists; pass --force to replace it")
        shutil.rmtree(output)
    output.mkdir(parents=True)
    torch.set_num_threads(cfg.threads)
    t_all = time.perf_counter()
    base = output / "base"
    pre = pretrain(cfg, base)
    skills = base_skills(cfg, base, output)
    logger.info("base: pre-trained in %.0f s; held-out exact match %s", pre["seconds"], skills)
    train, held_out = task_split(cfg)
    write_jsonl(output / "train.jsonl", train)
    write_jsonl(output / "heldout.jsonl", held_out)
    r_max = max(cfg.grid)
    per_seed = []
    for seed in cfg.seeds:
        runs = output / "runs" / f"seed{seed}"
        times: dict[str, Any] = {"lora": {}}
        for k in cfg.grid:
            times["lora"][k] = finetune(cfg, base, train, "lora", k, seed, runs / "grid" / f"r{k}")
        for method in ("dylora", "matryoshka"):
            times[method] = finetune(cfg, base, train, method, r_max, seed, runs / method)
        res = evaluate(
            [runs / "grid", runs / "dylora", runs / "matryoshka"], base, output / "heldout.jsonl", list(cfg.grid),
            metric="exact-match", batch_size=cfg.eval_batch_size, with_base=True, device="cpu", dtype="float32",
        )
        write_results(res, runs / "eval", force=True)
        curves = {}
        for c, method in zip(res.curves, ("lora", "dylora", "matryoshka")):
            curves[method] = {"ranks": {p.rank: p.score for p in c.points}, "aurac": c.aurac}
        per_seed.append({"seed": seed, "train_seconds": times, "curves": curves, "base": res.base.score if res.base else None})
        logger.info("seed %d: %s", seed, {m: {k: round(v, 3) for k, v in c["ranks"].items()} for m, c in curves.items()})
    summary = summarise(cfg, per_seed, pre, skills, time.perf_counter() - t_all)
    return finish(cfg, output, summary)


def _ms(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def summarise(cfg: Settings, per_seed: list[dict[str, Any]], pre: dict[str, Any], skills: dict[str, float], total: float) -> dict[str, Any]:
    methods: dict[str, Any] = {}
    for m in ("lora", "dylora", "matryoshka"):
        ranks = {k: _ms([s["curves"][m]["ranks"][k] for s in per_seed]) for k in cfg.grid}
        au = {v: _ms([s["curves"][m]["aurac"][v] for s in per_seed]) for v in ("v1", "v2")}
        if m == "lora":
            secs = _ms([sum(s["train_seconds"]["lora"].values()) for s in per_seed])
        else:
            secs = _ms([s["train_seconds"][m] for s in per_seed])
        methods[m] = {"label": METHOD_LABELS[m], "ranks": ranks, "aurac": au, "train_seconds": secs}
    return {
        "settings": dataclasses.asdict(cfg),
        "base": {"pretrain": pre, "heldout_exact_match": skills, "cipher_exact_match": _ms([s["base"] for s in per_seed])},
        "methods": methods,
        "per_seed": per_seed,
        "total_seconds": total,
    }


def report_markdown(summary: dict[str, Any]) -> str:
    cfg = summary["settings"]
    ms = summary["methods"]
    order = ("lora", "dylora", "matryoshka")
    n = len(cfg["seeds"])

    def cell(d: dict[str, float], pct: bool = True) -> str:
        f = 100.0 if pct else 1.0
        return f"{d['mean'] * f:.1f} ± {d['std'] * f:.1f}" if n > 1 else f"{d['mean'] * f:.1f}"

    lines = [
        f"Exact-match accuracy (%) on {cfg['eval_examples']} held-out examples, mean ± standard deviation over "
        f"{n} seed(s) {list(cfg['seeds'])}:",
        "",
        "| rank | " + " | ".join(ms[m]["label"] for m in order) + " |",
        "|---:|" + "---:|" * len(order),
    ]
    for k in cfg["grid"]:
        key = k if k in ms["lora"]["ranks"] else str(k)
        lines.append(f"| {k} | " + " | ".join(cell(ms[m]["ranks"][key]) for m in order) + " |")
    for v in ("v1", "v2"):
        lines.append(f"| **AURAC {v}** | " + " | ".join(f"**{cell(ms[m]['aurac'][v])}**" for m in order) + " |")
    lines.append("| training wall-clock (s) | " + " | ".join(cell(ms[m]["train_seconds"], pct=False) for m in order) + " |")
    base = summary["base"]
    skills = ", ".join(f"{k} {v * 100:.1f}%" for k, v in base["heldout_exact_match"].items())
    grid_t = ms["lora"]["train_seconds"]["mean"]
    lines += [
        "",
        f"The LoRA grid's wall-clock is the sum of its {len(cfg['grid'])} runs; "
        f"grid / MatryoshkaLoRA = {grid_t / ms['matryoshka']['train_seconds']['mean']:.2f}×, "
        f"grid / DyLoRA = {grid_t / ms['dylora']['train_seconds']['mean']:.2f}×.",
        f"Base model (pre-trained {cfg['pretrain_steps']} steps in {base['pretrain']['seconds']:.0f} s, "
        f"{base['pretrain']['params']:,} parameters): held-out exact match {skills}; on the cipher task "
        f"{base['cipher_exact_match']['mean'] * 100:.1f}%.",
        f"Fine-tuning: {cfg['steps']} steps, batch {cfg['batch_size']}, lr {cfg['lr']}, AdamW, scaling {cfg['scaling']}, "
        f"alpha {cfg['alpha']}, targets {', '.join(cfg['target_modules'])} in every layer, the same for every method. Total run time {summary['total_seconds'] / 60:.1f} min.",
        "",
    ]
    diag = summary.get("diagnostic_matryoshka_training_diagonal")
    if diag:
        lines += [
            "Diagnostic (not a product rank): the MatryoshkaLoRA runs evaluated with the training diagonal kept on the "
            "first k components (d_i = p_i for i <= k) instead of the inference rule s(k) of DESIGN.md §1; k = "
            f"{max(cfg['grid'])} is the exact forward pass the run was trained with:",
            "",
            "| rank | " + " | ".join(str(k) for k in cfg["grid"]) + " |",
            "|---|" + "---:|" * len(cfg["grid"]),
            "| exact match (%) | " + " | ".join(cell(diag["ranks"][k] if k in diag["ranks"] else diag["ranks"][str(k)]) for k in cfg["grid"]) + " |",
            "",
        ]
    return "\n".join(lines)


def plot_summary(summary: dict[str, Any], path: Path) -> None:
    """Mean exact match vs rank (log2 axis) per method, with min–max bands over seeds."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, NullLocator

    cfg = summary["settings"]
    fig = Figure(figsize=(7.0, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ks = list(cfg["grid"])
    for m in ("lora", "dylora", "matryoshka"):
        d = summary["methods"][m]
        pts = [d["ranks"][k] if k in d["ranks"] else d["ranks"][str(k)] for k in ks]
        mean = [p["mean"] * 100 for p in pts]
        ax.plot(ks, mean, marker="o", label=f"{d['label']} (AURAC v2 {d['aurac']['v2']['mean'] * 100:.1f})")
        if len(cfg["seeds"]) > 1:
            ax.fill_between(ks, [p["min"] * 100 for p in pts], [p["max"] * 100 for p in pts], alpha=0.15)
    diag = summary.get("diagnostic_matryoshka_training_diagonal")
    if diag:
        pts = [diag["ranks"][k] if k in diag["ranks"] else diag["ranks"][str(k)] for k in ks]
        ax.plot(ks, [p["mean"] * 100 for p in pts], color="gray", linestyle="--", marker=".",
                label="diagnostic: MatryoshkaLoRA with its training diagonal p (not a product rank)")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(ks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([str(k) for k in ks])
    ax.set_xlabel("rank (log2 scale)")
    ax.set_ylabel("exact-match accuracy (%)")
    ax.set_title(f"cipher task, held-out exact match (mean of {len(cfg['seeds'])} seed(s), band = min–max)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", type=Path, required=True, help="folder to create (base model, adapters, report.md, rank_curve.png)")
    ap.add_argument("--smoke", action="store_true", help="a ~1-minute setting that exercises every step")
    ap.add_argument("--seeds", type=str, default=None, help="comma-separated seeds (default 0,1,2)")
    ap.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default 300)")
    ap.add_argument("--pretrain-steps", type=int, default=None, help="pre-training steps (default 400)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default 2)")
    ap.add_argument("--force", action="store_true", help="replace an existing output folder")
    ap.add_argument("--diagnose-only", action="store_true",
                    help="recompute the diagnostic and report of an existing --output (after a run without it)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("mlora_export").setLevel(logging.WARNING)
    cfg = Settings.smoke() if args.smoke else Settings()
    over: dict[str, Any] = {}
    if args.seeds:
        over["seeds"] = tuple(int(s) for s in args.seeds.split(","))
    if args.steps:
        over["steps"] = args.steps
    if args.pretrain_steps:
        over["pretrain_steps"] = args.pretrain_steps
    if args.threads:
        over["threads"] = args.threads
    cfg = dataclasses.replace(cfg, **over)
    if args.diagnose_only:
        old = json.loads((args.output / "summary.json").read_text(encoding="utf-8"))
        cfg = Settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in old["settings"].items()})
        summary = finish(cfg, args.output, old)
    else:
        summary = run(cfg, args.output, force=args.force)
    sys.stdout.write(report_markdown(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
