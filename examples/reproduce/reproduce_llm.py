#!/usr/bin/env python
"""Reproduction v3: one nested run vs a grid of LoRA runs on a real pretrained chat model (SmolLM2-135M-Instruct).

The same question as ``reproduce.py`` (one nested run instead of a rank sweep?), asked of a real
instruction-tuned LLM, on conversational data rendered with its own chat template and scored per
rank through it:

1. **Base**: SmolLM2-135M-Instruct as the package materialises it
   (:func:`mlora_export.base.packaged.materialize`, ``MLORA_CACHE``); ``--smoke`` uses a pico
   Llama with a character tokenizer and a chat template instead (seconds, for CI).
2. **Two regimes**, both from tables that ``pycountry`` ships, split by item (the validation and
   test items are never trained on):

   - ``iso`` (a small perturbation of what the model partly knows): an ISO 3166-1 alpha-3 code
     → the country's name, one worked example in the prompt (conversational prompt/completion);
   - ``spell`` (a large shift): a place name (ISO 3166-2 subdivisions) → the name spelled in
     capitals with hyphens (``Texas`` → ``T-E-X-A-S``), a rule the prompt does not state, so the
     base cannot do it at all (``messages``).

3. **Methods**, every one trained by :func:`mlora_export.training.train` (``transformers.Trainer``)
   from one :class:`~mlora_export.training.TrainSettings` that differs only in the fields of its
   row of :data:`TRAINED` (data-driven: a variant is one more row, or ``--variant``):

   - ``lora``: the grid, one plain LoRA run per rank of ``grid``;
   - ``dylora``, ``matryoshka`` (the paper's one pass), ``nested-loss``: one run at ``max(grid)``;
     ``nested-loss-2x`` the same at twice the steps;
   - ``svd``: the grid's ``r = max(grid)`` run re-nested by :func:`mlora_export.renest_adapter`;
   - ``truncated``: the paper's own baseline, that same run served at rank ``k`` by its first
     ``k`` components with ``s(k)`` (no SVD): :func:`mlora_export.converters.slice.slice_adapter`.

4. **One search for all**: every method at every learning rate of ``lrs`` and every seed; each
   method's lr is chosen by its mean validation AURAC v2 (the grid: per rank, by mean validation
   exact match), ties broken by the lower validation loss; the report gives the test split at
   those choices, mean ± sd over seeds.

Evaluation is :func:`mlora_export.evaluation.evaluate`: the base loaded once per call, every adapter
put on it and switched rank by rank in place, exact match generated after the chat template's
generation prompt and compared with the last assistant turn, and the held-out loss on the
assistant tokens.

Everything is cached in ``--output`` so that a run resumes where it stopped: each training run
(``runs/…/records/*.json`` and its adapter), each (regime, seed, lr) validation job
(``jobs/*.json``), each seed's test evaluation (``tests/*.json``). The report can be written from
what has finished (``--report-only``); seeds whose search is incomplete are left out and the
report says so.

    python examples/reproduce/reproduce_llm.py --output ./repro-llm                  # the full run (hours on 2 cores)
    python examples/reproduce/reproduce_llm.py --output ./repro-llm --report-only    # report what has finished
    python examples/reproduce/reproduce_llm.py --output ./repro-llm-smoke --smoke    # seconds (pico model)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import random
import re
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger("reproduce_llm")


# -- methods: a data-driven table --------------------------------------------------------------
@dataclass(frozen=True)
class MethodSpec:
    """One trained method: the :class:`TrainSettings` fields it sets over the common ones, and its steps multiple."""

    label: str
    overrides: dict[str, Any]
    steps_multiplier: int = 1


#: The grid (one plain LoRA run per rank) and the two baselines made from its top-rank run.
GRID, SVD, TRUNCATED = "lora", "svd", "truncated"
#: One-run methods trained at ``max(grid)`` with train ranks ``grid``. A recipe variant of
#: ``nested-loss`` (another ``TrainSettings`` field) is one more row here, or ``--variant``.
TRAINED: dict[str, MethodSpec] = {
    "dylora": MethodSpec("DyLoRA (one run)", {"method": "dylora"}),
    "matryoshka": MethodSpec("MatryoshkaLoRA, paper (one run)", {"method": "matryoshka"}),
    "nested-loss": MethodSpec("nested-loss (one run)", {"method": "nested-loss"}),
    "nested-loss-2x": MethodSpec("nested-loss, 2x steps (one run)", {"method": "nested-loss"}, 2),
}
BASE_LABELS = {
    GRID: "LoRA grid (one run per rank)",
    SVD: "LoRA r=max, re-nested by SVD (one run)",
    TRUNCATED: "LoRA r=max, truncated with s(k), paper's baseline (one run)",
}


def method_specs(variants: tuple[tuple[str, str], ...] = ()) -> dict[str, MethodSpec]:
    """:data:`TRAINED` plus the ``--variant`` rows (``name``, JSON of TrainSettings fields, optional
    ``steps_multiplier`` and ``label``; ``method`` defaults to ``nested-loss``).

    Raises:
        SystemExit: a variant's JSON is not an object, names a field TrainSettings lacks, or reuses a name.
    """
    from mlora_export.training import TrainSettings

    specs = dict(TRAINED)
    fields = {f.name for f in dataclasses.fields(TrainSettings)}
    for name, text in variants:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise SystemExit(f"error: --variant {name}: not JSON ({e}); give e.g. {name}='{{\"recipe\": {{\"a_init\": \"paper\"}}}}'") from None
        if not isinstance(obj, dict):
            raise SystemExit(f"error: --variant {name}: expected a JSON object of TrainSettings fields, got {type(obj).__name__}")
        if name in specs or name in BASE_LABELS:
            raise SystemExit(f"error: --variant {name}: that name is taken; choose another")
        mult = obj.pop("steps_multiplier", 1)
        label = obj.pop("label", f"{name} (one run)")
        unknown = sorted(set(obj) - fields)
        if unknown:
            raise SystemExit(f"error: --variant {name}: TrainSettings has no field(s) {', '.join(unknown)}; fields: {', '.join(sorted(fields))}")
        if not isinstance(mult, int) or isinstance(mult, bool) or mult < 1:
            raise SystemExit(f"error: --variant {name}: steps_multiplier must be a positive integer, got {mult!r}")
        recipe = obj.get("recipe")
        if recipe is not None:
            from mlora_export.training import NestedRecipe

            known = {f.name for f in dataclasses.fields(NestedRecipe)}
            if not isinstance(recipe, dict) or set(recipe) - known:
                raise SystemExit(f"error: --variant {name}: recipe must be an object of NestedRecipe fields ({', '.join(sorted(known))})")
        specs[name] = MethodSpec(label, {"method": "nested-loss", **obj}, mult)
    return specs


def labels(cfg: "Settings") -> dict[str, str]:
    """Method key → label, in report order, for the methods of ``cfg``."""
    specs = method_specs(cfg.variants)
    out = {GRID: BASE_LABELS[GRID]}
    out.update({m: specs[m].label for m in cfg.methods if m in specs})
    out.update({m: BASE_LABELS[m] for m in (SVD, TRUNCATED) if m in cfg.methods})
    return out


# -- settings ----------------------------------------------------------------------------------
REGIME_LABELS = {
    "iso": "ISO 3166-1 alpha-3 code → country name (small perturbation)",
    "spell": "place name → spelled in capitals with hyphens (large shift)",
}
SYSTEM = {"iso": "Reply with the country name only.", "spell": "Transform the name."}
ISO_DEMO = ("DEU", "Germany")  # the worked example in every iso prompt (never an item)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: The chat template of the pico smoke model (its character tokenizer has none).
PICO_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n"
                 "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")


@dataclass(frozen=True)
class Settings:
    """Every knob of the experiment; one setting for all methods."""

    model: str = "smollm2"  # "smollm2" (the real model) or "pico" (the smoke setting)
    grid: tuple[int, ...] = (1, 2, 4, 8, 16)
    seeds: tuple[int, ...] = (0, 1)
    #: the seeds whose full lr search makes the validation choice (empty: every seed). The other
    #: seeds train only what the choice needs (each method at its chosen lr) and are scored on test:
    #: on the real model a second seed cost a quarter of a second search.
    choice_seeds: tuple[int, ...] = ()
    lrs: tuple[float, ...] = (2e-3, 4e-3, 8e-3)
    regimes: tuple[str, ...] = ("iso", "spell")
    methods: tuple[str, ...] = ("dylora", "matryoshka", "nested-loss", "nested-loss-2x", SVD, TRUNCATED)
    #: extra nested-loss recipes: (name, JSON of TrainSettings fields), see :func:`method_specs`
    variants: tuple[tuple[str, str], ...] = ()
    # fine-tuning (identical for every method)
    steps: int = 40
    batch_size: int = 8
    warmup_fraction: float = 0.1
    scaling: str = "sqrt"
    alpha: float = 2.0
    target_modules: tuple[str, ...] = TARGETS
    max_length: int = 128
    # data: iso uses every usable country (train = the rest after val and test, at most train_examples)
    train_examples: int = 400
    val_examples: int = 40
    test_examples: int = 100
    iso_test_examples: int = 60
    eval_batch_size: int = 40
    workers: int = 1
    threads: int = 1

    @classmethod
    def smoke(cls) -> "Settings":
        return cls(model="pico", grid=(1, 2), seeds=(0,), lrs=(2e-3, 8e-3), steps=2, batch_size=4, train_examples=16,
                   val_examples=6, test_examples=6, iso_test_examples=6, eval_batch_size=8)


#: Settings a rerun into the same output may change (they only add or select jobs).
_EXTENSIBLE = ("seeds", "choice_seeds", "lrs", "regimes", "methods", "variants", "workers", "threads")


# -- data --------------------------------------------------------------------------------------
def iso_items() -> list[tuple[str, str]]:
    """``(alpha-3 code, name)`` of every country whose (common) name is plain words of ASCII letters, the demo excluded."""
    import pycountry

    out = []
    for c in pycountry.countries:
        name = getattr(c, "common_name", None) or c.name
        if c.alpha_3 != ISO_DEMO[0] and re.fullmatch(r"[A-Za-z]+( [A-Za-z]+)*", name):
            out.append((c.alpha_3, name))
    return sorted(out)


def spell_items() -> list[tuple[str, str]]:
    """``(name, spelled)`` of the distinct one-word ASCII subdivision names of 4–8 letters."""
    import pycountry

    seen: dict[str, str] = {}
    for s in pycountry.subdivisions:
        if re.fullmatch(r"[A-Za-z]{4,8}", s.name) and s.name.lower() not in seen:
            seen[s.name.lower()] = s.name
    return sorted((n, "-".join(n.upper())) for n in seen.values())


def record(regime: str, question: str, answer: str) -> dict[str, Any]:
    """One conversational record: ``iso`` as TRL's conversational prompt/completion with a worked
    example in the prompt, ``spell`` as ``messages``; a short system turn in both."""
    system = {"role": "system", "content": SYSTEM[regime]}
    if regime == "iso":
        prompt = [system, {"role": "user", "content": ISO_DEMO[0]}, {"role": "assistant", "content": ISO_DEMO[1]},
                  {"role": "user", "content": question}]
        return {"prompt": prompt, "completion": [{"role": "assistant", "content": answer}]}
    return {"messages": [system, {"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def task_splits(cfg: Settings, regime: str, seed: int = 99) -> dict[str, list[dict[str, Any]]]:
    """Disjoint train / validation / test records of a regime (the same for every seed and method)."""
    if regime not in REGIME_LABELS:
        raise SystemExit(f"error: unknown regime {regime!r}: expected one of {', '.join(REGIME_LABELS)}")
    items = iso_items() if regime == "iso" else spell_items()
    random.Random(seed).shuffle(items)
    n_val = cfg.val_examples
    n_test = cfg.iso_test_examples if regime == "iso" else cfg.test_examples
    val, test, rest = items[:n_val], items[n_val : n_val + n_test], items[n_val + n_test :]
    train = rest[: cfg.train_examples]
    if len(train) < cfg.batch_size:
        raise SystemExit(f"error: regime {regime}: only {len(train)} training items left after {n_val} validation and {n_test} test ones")
    return {s: [record(regime, q, a) for q, a in part] for s, part in (("train", train), ("val", val), ("test", test))}


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


# -- the base model ----------------------------------------------------------------------------
def base_model_dir(cfg: Settings, output: Path) -> Path:
    """The base model folder: SmolLM2-135M-Instruct materialised in ``MLORA_CACHE``, or the pico model of the smoke setting."""
    if cfg.model == "smollm2":
        from mlora_export.base.packaged import materialize

        return materialize("smollm2")
    if cfg.model != "pico":
        raise SystemExit(f"error: unknown model {cfg.model!r}: expected smollm2 or pico")
    path = output / "base-pico"
    if not (path / "chat_template.jinja").exists():
        from mlora_export.demo.tiny import build_tiny_model

        build_tiny_model(path, seed=0, hidden_size=32, intermediate_size=48, force=True)
        (path / "chat_template.jinja").write_text(PICO_TEMPLATE, encoding="utf-8")
    return path


def base_scores(cfg: Settings, output: Path, base: Path) -> dict[str, Any]:
    """Exact match and loss of the base model alone on each regime's validation and test split (cached in ``base.json``)."""
    from mlora_export.base import load_base_model, load_tokenizer
    from mlora_export.evaluation import load_eval_data, score_model

    path = output / "base.json"
    out = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    todo = [r for r in cfg.regimes if r not in out]
    if todo:
        tok = load_tokenizer(base)
        model = load_base_model(base, dtype="float32", device="cpu")
        for regime in todo:
            out[regime] = {}
            for split in ("val", "test"):
                data = load_eval_data(output / "data" / regime / f"{split}.jsonl", tok)
                s = score_model(model, tok, data, metric="exact-match", batch_size=cfg.eval_batch_size)
                out[regime][split] = {"exact_match": s.score, "loss": s.loss, "seconds": s.seconds}
        path.write_text(json.dumps(out, indent=1), encoding="utf-8")
    return out


# -- one job: every run of one (regime, seed, lr), scored on validation ------------------------
def _lr_key(lr: float) -> str:
    return f"{lr:g}"


def job_dir(output: Path, regime: str, seed: int, lr: float) -> Path:
    return output / "runs" / regime / f"seed{seed}" / f"lr{_lr_key(lr)}"


def train_settings(cfg: Settings, seed: int, lr: float, steps: int, **overrides: Any) -> Any:
    """The one :class:`TrainSettings` every run shares, with a method's ``overrides``."""
    from mlora_export.training import TrainSettings

    common: dict[str, Any] = {
        "train_ranks": tuple(cfg.grid), "scaling": cfg.scaling, "alpha": cfg.alpha,
        "target_modules": tuple(cfg.target_modules), "max_steps": steps, "lr": lr, "batch_size": cfg.batch_size,
        "seed": seed, "max_length": cfg.max_length, "warmup_steps": max(1, round(cfg.warmup_fraction * steps)),
        "lr_scheduler": "linear", "max_grad_norm": 1.0, "weight_decay": 0.0, "dtype": "float32",
        "logging_steps": max(1, steps // 8),
    }
    merged = {**common, **overrides}
    if isinstance(merged.get("recipe"), dict):  # a --variant's recipe, e.g. {"a_init": "paper"}
        from mlora_export.training import NestedRecipe

        merged["recipe"] = NestedRecipe(**merged["recipe"])
    return TrainSettings(**merged)


def train_run(cfg: Settings, output: Path, base: Path, regime: str, seed: int, lr: float, name: str,
              overrides: dict[str, Any], steps: int) -> dict[str, Any]:
    """Train one adapter into the job's folder (``name`` may be ``grid/r4``), unless its record exists; return the record."""
    from mlora_export.training import train

    jd = job_dir(output, regime, seed, lr)
    rec_path = jd / "records" / f"{name.replace('/', '-')}.json"
    if rec_path.exists() and (jd / name).exists():
        return json.loads(rec_path.read_text(encoding="utf-8"))
    settings = train_settings(cfg, seed, lr, steps, **overrides)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    res = train(base, output / "data" / regime / "train.jsonl", jd / name, settings, force=True)
    rec = {
        "name": name, "settings": {k: v for k, v in dataclasses.asdict(settings).items() if k != "extra_training_args"},
        "steps": res.steps, "example_passes": res.steps * cfg.batch_size, "train_seconds": res.seconds,
        "wall_seconds": time.perf_counter() - t0, "final_loss": res.final_loss, "losses": res.losses,
        "trainable_params": res.trainable_params, "load_average": [load0, os.getloadavg()[0]],
    }
    rec_path.parent.mkdir(parents=True, exist_ok=True)
    rec_path.write_text(json.dumps(rec, indent=1), encoding="utf-8")
    logger.info("%s seed %d lr %g %s: %d steps in %.0f s, final loss %.3f", regime, seed, lr, name, res.steps, res.seconds, res.final_loss)
    return rec


def curve_dirs(cfg: Settings, jd: Path) -> dict[str, Path]:
    """One-run method → the folder evaluated as its curve (``truncated``: a collection of slices).

    The grid is not among them: its runs are given to the evaluation one by one, which joins
    single-rank adapters into one curve (in the test, each rank's run comes from its own lr)."""
    return {m: jd / m for m in cfg.methods}


def _eval_options(cfg: Settings) -> Any:
    """Exact match after the chat template's generation prompt, float32 on the CPU, the harness's batch."""
    from mlora_export.evaluation import EvalOptions

    return EvalOptions(metric="exact-match", batch_size=cfg.eval_batch_size, dtype="float32", device="cpu")


def _curves_by_method(result: Any, dirs: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """``{method: {"ranks": {k: {"exact_match", "loss"}}, "seconds"}}`` from an :class:`EvalResult`."""
    from mlora_export.evaluation import SINGLE_RANK_LABEL

    by_path = {str(p): m for m, p in dirs.items()}
    out: dict[str, dict[str, Any]] = {}
    for c in result.curves:
        m = by_path.get(c.path)
        if m is None:  # single-rank adapters given one by one: the grid at its per-rank choices
            if c.method != "lora" or c.kind not in (SINGLE_RANK_LABEL, "adapter"):
                raise RuntimeError(f"evaluation returned a curve for {c.path!r} that is neither a method's folder nor the grid")
            m = GRID
        out[m] = {"ranks": {str(p.rank): {"exact_match": p.score, "loss": p.loss} for p in c.points},
                  "seconds": sum(p.seconds for p in c.points)}
    return out


def run_job(cfg: Settings, output: Path, base: Path, regime: str, seed: int, lr: float,
            plan: dict[str, list[Any]] | None = None) -> dict[str, Any]:
    """Train every run of one (regime, seed, lr) that is missing, derive the SVD and truncated
    baselines, score every curve not yet scored on validation; write ``jobs/…json``.

    With a ``plan`` (a seed outside ``choice_seeds``, see :func:`confirmation_plans`): train only
    ``plan["grid"]`` ranks and ``plan["methods"]``, and score nothing on validation."""
    import torch

    from mlora_export.converters.renest import renest_adapter
    from mlora_export.converters.slice import slice_adapter
    from mlora_export.evaluation import evaluate

    torch.set_num_threads(cfg.threads)
    path = output / "jobs" / f"{regime}-seed{seed}-lr{_lr_key(lr)}.json"
    job = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {"regime": regime, "seed": seed, "lr": lr, "records": {}, "val": {}}
    wanted = [GRID, *cfg.methods]
    jd = job_dir(output, regime, seed, lr)
    if plan is None and all(m in job["val"] for m in wanted):
        return job
    if plan is not None and _plan_done(job, plan, jd):
        return job
    t_job = time.perf_counter()
    specs = method_specs(cfg.variants)
    r_max = max(cfg.grid)
    methods = cfg.methods if plan is None else tuple(plan["methods"])
    for k in cfg.grid if plan is None else plan["grid"]:
        job["records"][f"{GRID}-r{k}"] = train_run(cfg, output, base, regime, seed, lr, f"grid/r{k}",
                                                   {"method": "lora", "train_ranks": (k,)}, cfg.steps)
    for m in methods:
        if m in specs:
            s = specs[m]
            job["records"][m] = train_run(cfg, output, base, regime, seed, lr, m, s.overrides, cfg.steps * s.steps_multiplier)
    top = jd / "grid" / f"r{r_max}"
    if SVD in methods and not (jd / SVD).exists():
        t0 = time.perf_counter()
        renest_adapter(top, jd / SVD, workers=1)
        job["renest_seconds"] = time.perf_counter() - t0
    if TRUNCATED in methods and not (jd / TRUNCATED).exists():
        slice_adapter(top, list(cfg.grid), jd / TRUNCATED, workers=1)
    if plan is not None:  # a confirmation seed: its lr was chosen on the search seeds' validation
        job["plan"] = plan
        job.setdefault("wall_seconds", 0.0)
        job["wall_seconds"] += time.perf_counter() - t_job
        _write_json(path, job)
        logger.info("%s seed %d lr %g: trained %s at the chosen lr", regime, seed, lr, plan)
        return job
    dirs = {m: p for m, p in curve_dirs(cfg, jd).items() if m not in job["val"]}
    members = [jd / "grid" / f"r{k}" for k in cfg.grid] if GRID not in job["val"] else []
    t0 = time.perf_counter()
    res = evaluate([*(str(p) for p in dirs.values()), *(str(p) for p in members)], base, output / "data" / regime / "val.jsonl",
                   list(cfg.grid), _eval_options(cfg))
    job["val"].update(_curves_by_method(res, dirs))
    job.setdefault("eval_seconds", 0.0)
    job["eval_seconds"] += time.perf_counter() - t0
    job.setdefault("wall_seconds", 0.0)
    job["wall_seconds"] += time.perf_counter() - t_job
    _write_json(path, job)
    logger.info("%s seed %d lr %g: validation exact match %s", regime, seed, lr,
                {m: [round(v["exact_match"] * 100) for v in c["ranks"].values()] for m, c in job["val"].items()})
    return job


def _write_json(path: Path, obj: Any) -> None:
    """Write through a temporary file, so a job cut short leaves no half-written record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1), encoding="utf-8")
    tmp.replace(path)


def _plan_done(job: dict[str, Any], plan: dict[str, list[Any]], jd: Path) -> bool:
    """Whether every run of a confirmation ``plan`` is trained (and the SVD/truncated folders derived)."""
    names = [f"{GRID}-r{k}" for k in plan["grid"]] + [m for m in plan["methods"] if m not in (SVD, TRUNCATED)]
    return all(n in job["records"] for n in names) and all((jd / m).exists() for m in plan["methods"] if m in (SVD, TRUNCATED))


def confirmation_plans(cfg: Settings, choice: dict[str, Any]) -> dict[float, dict[str, list[Any]]]:
    """What a seed outside ``choice_seeds`` trains, by lr: the grid ranks chosen there, the methods
    chosen there (SVD and truncated need the grid's top rank at their lr)."""
    plans: dict[float, dict[str, list[Any]]] = {}
    for k, lr in choice[GRID]["lr"].items():
        plans.setdefault(lr, {"grid": [], "methods": []})["grid"].append(k)
    for m in cfg.methods:
        plan = plans.setdefault(choice[m]["lr"], {"grid": [], "methods": []})
        plan["methods"].append(m)
        if m in (SVD, TRUNCATED) and max(cfg.grid) not in plan["grid"]:
            plan["grid"].append(max(cfg.grid))
    for plan in plans.values():
        plan["grid"].sort()
    return dict(sorted(plans.items()))


def confirmed_seeds(cfg: Settings, output: Path, jobs: dict[tuple[str, int, float], dict[str, Any]], regime: str,
                    choice: dict[str, Any]) -> list[int]:
    """The seeds outside ``choice_seeds`` whose runs at the chosen lrs are all trained."""
    plans = confirmation_plans(cfg, choice)
    return [s for s in cfg.seeds if s not in _search_seeds(cfg)
            and all((regime, s, lr) in jobs and _plan_done(jobs[(regime, s, lr)], plan, job_dir(output, regime, s, lr))
                    for lr, plan in plans.items())]


def _search_seeds(cfg: Settings) -> tuple[int, ...]:
    return cfg.choice_seeds or cfg.seeds


def _job(args: tuple[Any, ...]) -> dict[str, Any]:
    _quiet()
    return run_job(*args)


def _test(args: tuple[Any, ...]) -> dict[str, Any]:
    _quiet()
    return run_tests(*args)


def _map(cfg: Settings, fn: Any, todo: list[tuple[Any, ...]]) -> list[Any]:
    """``fn`` over ``todo``, in ``cfg.workers`` processes when more than one."""
    if cfg.workers > 1 and len(todo) > 1:
        import multiprocessing

        with ProcessPoolExecutor(max_workers=cfg.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            return list(pool.map(fn, todo))
    return [fn(t) for t in todo]


# -- selection on validation, test at the choice -----------------------------------------------
def _ms(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def complete_seeds(cfg: Settings, jobs: dict[tuple[str, int, float], dict[str, Any]], regime: str) -> list[int]:
    """The search seeds of ``regime`` whose validation search is complete (every lr, every method)."""
    wanted = [GRID, *cfg.methods]
    return [s for s in _search_seeds(cfg) if all((regime, s, lr) in jobs and all(m in jobs[(regime, s, lr)]["val"] for m in wanted) for lr in cfg.lrs)]


def choose(cfg: Settings, jobs: dict[tuple[str, int, float], dict[str, Any]], regime: str, seeds: list[int]) -> dict[str, Any]:
    """Each method's lr by mean validation AURAC v2 over ``seeds`` (the grid: per rank, by mean
    validation exact match), ties broken by the lower mean validation loss (AURAC of the loss).

    Returns ``{method: {"lr": lr or {rank: lr}, "val_search": {lr: value}}}``.
    """
    from mlora_export.method import aurac

    grid = list(cfg.grid)
    out: dict[str, Any] = {}

    def point(s: int, lr: float, m: str, k: int) -> dict[str, float]:
        return jobs[(regime, s, lr)]["val"][m]["ranks"][str(k)]

    def grid_key(lr: float, k: int) -> tuple[float, float]:
        return (statistics.fmean(point(s, lr, GRID, k)["exact_match"] for s in seeds), -statistics.fmean(point(s, lr, GRID, k)["loss"] for s in seeds))

    out[GRID] = {"lr": {k: max(cfg.lrs, key=lambda lr, k=k: grid_key(lr, k)) for k in grid},
                 "val_search": {_lr_key(lr): {k: grid_key(lr, k)[0] for k in grid} for lr in cfg.lrs}}
    for m in cfg.methods:
        def key(lr: float, m: str = m) -> tuple[float, float]:
            em = statistics.fmean(aurac(grid, [point(s, lr, m, k)["exact_match"] for k in grid])["v2"] for s in seeds)
            loss = statistics.fmean(aurac(grid, [point(s, lr, m, k)["loss"] for k in grid])["v2"] for s in seeds)
            return (em, -loss)

        out[m] = {"lr": max(cfg.lrs, key=key), "val_search": {_lr_key(lr): key(lr)[0] for lr in cfg.lrs}}
    return out


def run_tests(cfg: Settings, output: Path, base: Path, regime: str, seed: int, chosen: dict[str, Any]) -> dict[str, Any]:
    """Score every method's adapter at its chosen lr on the test split (one base load for the missing
    ones; cached in ``tests/<regime>-seed<s>.json`` by method and lr), and the matryoshka run's own
    training forward (its diagonal ``p``), a diagnostic."""
    import torch

    from mlora_export.evaluation import evaluate

    torch.set_num_threads(cfg.threads)
    path = output / "tests" / f"{regime}-seed{seed}.json"
    done = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    data = output / "data" / regime / "test.jsonl"
    dirs: dict[str, Path] = {}
    grid_members: list[Path] = []
    grid_key = GRID + "@" + ",".join(f"r{k}:{_lr_key(lr)}" for k, lr in sorted(chosen[GRID]["lr"].items()))
    if grid_key not in done:
        grid_members = [job_dir(output, regime, seed, lr) / "grid" / f"r{k}" for k, lr in sorted(chosen[GRID]["lr"].items())]
    for m in cfg.methods:
        key = f"{m}@{_lr_key(chosen[m]['lr'])}"
        if key not in done:
            dirs[key] = curve_dirs(cfg, job_dir(output, regime, seed, chosen[m]["lr"]))[m]
    if dirs or grid_members:
        t0 = time.perf_counter()
        res = evaluate([*(str(p) for p in dirs.values()), *(str(p) for p in grid_members)], base, data, list(cfg.grid),
                       _eval_options(cfg))
        got = _curves_by_method(res, dirs)
        for key in dirs:
            done[key] = got[key]
        if grid_members:
            done[grid_key] = got[GRID]
        done["eval_seconds"] = done.get("eval_seconds", 0.0) + time.perf_counter() - t0
    if "matryoshka" in cfg.methods:
        key = f"matryoshka-diagonal@{_lr_key(chosen['matryoshka']['lr'])}"
        if key not in done:
            done[key] = _diagonal_score(cfg, base, job_dir(output, regime, seed, chosen["matryoshka"]["lr"]) / "matryoshka", data)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(done, indent=1), encoding="utf-8")
    return done


def _diagonal_score(cfg: Settings, base: Path, adapter: Path, data_path: Path) -> dict[str, float]:
    """Exact match of a matryoshka adapter under its own training forward (``B·diag(p)·A``), not a served rank."""
    from mlora_export.base import load_base_model, load_tokenizer
    from mlora_export.evaluation import load_eval_data, score_model
    from mlora_export.training import load_nested_adapter

    tok = load_tokenizer(base)
    handle = load_nested_adapter(load_base_model(base, dtype="float32", device="cpu"), adapter)
    handle.set_diagonal(handle.config.p)
    s = score_model(handle.model, tok, load_eval_data(data_path, tok), metric="exact-match", batch_size=cfg.eval_batch_size)
    return {"exact_match": s.score, "loss": s.loss}


# -- summary -----------------------------------------------------------------------------------
def summarise(cfg: Settings, jobs: dict[tuple[str, int, float], dict[str, Any]], tests: dict[tuple[str, int], dict[str, Any]],
              choices: dict[str, Any], seeds_of: dict[str, list[int]]) -> dict[str, Any]:
    """Per regime and method: test exact match and loss per rank (mean ± sd over seeds), AURAC, the
    chosen lr, the validation search, and the compute (steps, example passes, training wall-clock)."""
    from mlora_export.method import aurac

    grid = list(cfg.grid)
    specs = method_specs(cfg.variants)
    regimes: dict[str, Any] = {}
    for regime, seeds in seeds_of.items():
        ch = choices[regime]
        searched = [s for s in seeds if s in _search_seeds(cfg)]
        methods: dict[str, Any] = {}
        for m in [GRID, *cfg.methods]:
            if m == GRID:
                key = GRID + "@" + ",".join(f"r{k}:{_lr_key(lr)}" for k, lr in sorted(ch[GRID]["lr"].items()))
                recs = {s: [jobs[(regime, s, ch[GRID]["lr"][k])]["records"][f"{GRID}-r{k}"] for k in grid] for s in seeds}
                steps = sum(r["steps"] for r in recs[seeds[0]])
                secs = [sum(r["train_seconds"] for r in recs[s]) for s in seeds]
                search = [sum(jobs[(regime, s, lr)]["records"][f"{GRID}-r{k}"]["train_seconds"] for k in grid for lr in cfg.lrs)
                          for s in searched]
            else:
                lr = ch[m]["lr"]
                key = f"{m}@{_lr_key(lr)}"
                source = m if m in specs else f"{GRID}-r{max(grid)}"  # svd and truncated: the grid's top-rank run
                steps = jobs[(regime, seeds[0], lr)]["records"][source]["steps"]
                secs = [jobs[(regime, s, lr)]["records"][source]["train_seconds"] for s in seeds]
                search = [sum(jobs[(regime, s, x)]["records"][source]["train_seconds"] for x in cfg.lrs) for s in searched]
            em = {s: [tests[(regime, s)][key]["ranks"][str(k)]["exact_match"] for k in grid] for s in seeds}
            loss = {s: [tests[(regime, s)][key]["ranks"][str(k)]["loss"] for k in grid] for s in seeds}
            au = {s: aurac(grid, em[s]) for s in seeds}
            entry = {
                "lr": ch[m]["lr"], "val_search": ch[m]["val_search"],
                "ranks": {k: _ms([em[s][i] for s in seeds]) for i, k in enumerate(grid)},
                "loss": {k: _ms([loss[s][i] for s in seeds]) for i, k in enumerate(grid)},
                "aurac": {v: _ms([au[s][v] for s in seeds]) for v in ("v1", "v2")},
                "aurac_per_seed": {s: au[s]["v2"] for s in seeds},
                "loss_aurac_v2": _ms([aurac(grid, loss[s])["v2"] for s in seeds]),
                "steps": steps, "example_passes": steps * cfg.batch_size,
                "train_seconds": _ms(secs), "search_train_seconds": _ms(search),
            }
            if m == "matryoshka":
                entry["training_diagonal_test"] = _ms([tests[(regime, s)][f"matryoshka-diagonal@{_lr_key(lr)}"]["exact_match"] for s in seeds])
            methods[m] = entry
        present = [jobs[(regime, s, lr)] for s in seeds for lr in cfg.lrs if (regime, s, lr) in jobs]
        regimes[regime] = {"seeds": seeds, "search_seeds": searched, "confirmation_seeds": [s for s in seeds if s not in searched],
                           "methods": methods,
                           "search_wall_seconds": sum(j.get("wall_seconds", 0.0) for j in present),
                           "eval_seconds": sum(j.get("eval_seconds", 0.0) for j in present)
                           + sum(tests[(regime, s)].get("eval_seconds", 0.0) for s in seeds)}
    return {"settings": dataclasses.asdict(cfg), "labels": labels(cfg), "regimes": regimes}


def _paired(ms: dict[str, Any], a: str, b: str) -> tuple[float, float]:
    """Mean and sd over seeds of the per-seed AURAC v2 difference ``a - b`` in points."""
    sa, sb = ms[a]["aurac_per_seed"], ms[b]["aurac_per_seed"]
    diffs = [(sa[s] - sb[s]) * 100 for s in sa]
    return statistics.fmean(diffs), statistics.stdev(diffs) if len(diffs) > 1 else 0.0


def verdict(summary: dict[str, Any]) -> list[str]:
    """Plain sentences computed from the numbers (no fixed conclusion)."""
    lines = []
    lab = summary["labels"]
    for regime, res in summary["regimes"].items():
        ms = res["methods"]
        v2 = {m: ms[m]["aurac"]["v2"]["mean"] * 100 for m in ms}
        best = max(v2, key=v2.__getitem__)
        singles = [m for m in ms if m != GRID and ms[m]["example_passes"] <= min(ms[x]["example_passes"] for x in ms)]
        one_run = max(singles, key=v2.__getitem__) if singles else None
        base = summary.get("base", {}).get(regime, {}).get("test", {}).get("exact_match")
        parts = [f"- **{REGIME_LABELS[regime]}** (base {base * 100:.1f}%, {len(res['seeds'])} seed(s)): best test AURAC v2: "
                 f"{lab[best]} ({v2[best]:.1f})" + (f"; best single run at one run's steps: {lab[one_run]} ({v2[one_run]:.1f})." if one_run else ".")]
        grid = ms[GRID]
        for m in [x for x in ms if x != GRID and x.startswith("nested-loss")]:
            d, sd = _paired(ms, m, GRID)
            parts.append(f"{lab[m]} vs the grid of {len(summary['settings']['grid'])} runs: {v2[m]:.1f} vs {v2[GRID]:.1f} "
                         f"(per-seed difference {d:+.1f} ± {sd:.1f} points) for {grid['example_passes'] / ms[m]['example_passes']:.1f}× fewer "
                         f"example passes.")
        others = [f"{lab[m]}: {v2[m]:.1f}" for m in ms if m != GRID and not m.startswith("nested-loss")]
        if others:
            parts.append("Others: " + "; ".join(others) + ".")
        if "matryoshka" in ms:
            parts.append(f"The paper's matryoshka run under its own training forward (diagonal p, not a served rank) scores "
                         f"{ms['matryoshka']['training_diagonal_test']['mean'] * 100:.1f}% test exact match.")
        below = [k for k, p in ms["nested-loss"]["ranks"].items() if base is not None and p["mean"] < base] if "nested-loss" in ms else []
        if below:
            parts.append(f"nested-loss is below the base at rank(s) {', '.join(map(str, below))}.")
        lines.append(" ".join(parts))
    return lines


def variant_lines(summary: dict[str, Any]) -> list[str]:
    """One sentence per ``--variant`` row: its validation AURAC v2 at its chosen lr against
    ``nested-loss``'s at its own (what issue 26's adoption rule reads), and the per-seed test
    difference, in every regime; whether it is better on validation in all of them."""
    lab = summary["labels"]
    lines = []
    for m in [n for n, _ in summary["settings"].get("variants", ())]:
        parts, gains = [], {}
        for regime, res in summary["regimes"].items():
            ms = res["methods"]
            if m not in ms or "nested-loss" not in ms:
                continue
            val = {x: ms[x]["val_search"][_lr_key(ms[x]["lr"])] * 100 for x in (m, "nested-loss")}
            gains[regime] = val[m] - val["nested-loss"]
            d, sd = _paired(ms, m, "nested-loss")
            parts.append(f"{regime}: validation {val[m]:.1f} vs {val['nested-loss']:.1f} ({gains[regime]:+.1f}) at lr {ms[m]['lr']:g} vs "
                         f"{ms['nested-loss']['lr']:g}, test {d:+.1f} ± {sd:.1f}")
        if parts:
            won = [r for r, g in gains.items() if g > 0]
            lines.append(f"- {lab[m]}: " + "; ".join(parts) + (". Better than nested-loss on validation in every regime." if len(won) == len(gains)
                         else f". Not better on validation in every regime (better in: {', '.join(won) or 'none'})."))
    return lines


def report_markdown(summary: dict[str, Any]) -> str:
    cfg = summary["settings"]
    grid = cfg["grid"]
    lab = summary["labels"]
    lines: list[str] = []
    for note in summary.get("partial", []):
        lines.append(f"> **PARTIAL RUN**: {note}")
    if summary.get("partial"):
        lines.append("")

    def cell(d: dict[str, float], f: float = 100.0, digits: int = 1) -> str:
        return f"{d['mean'] * f:.{digits}f} ± {d['std'] * f:.{digits}f}" if d.get("n", 1) > 1 else f"{d['mean'] * f:.{digits}f}"

    for regime, res in summary["regimes"].items():
        ms = res["methods"]
        order = [m for m in lab if m in ms]
        base = summary.get("base", {}).get(regime, {})
        b_test = base.get("test", {})
        lines += [f"### {REGIME_LABELS[regime]}", "",
                  f"Test exact match (%), mean ± sd over seeds {res['seeds']}"
                  + (f" (lrs chosen on the validation search of seed(s) {res['search_seeds']}; seed(s) {res['confirmation_seeds']} "
                     f"trained at the chosen lrs only)" if res.get("confirmation_seeds") else "") + "; base model: "
                  f"{b_test.get('exact_match', float('nan')) * 100:.1f}% (held-out loss {b_test.get('loss', float('nan')):.2f}).", "",
                  "| rank | " + " | ".join(lab[m] for m in order) + " |", "|---:|" + "---:|" * len(order)]
        for k in grid:
            lines.append(f"| {k} | " + " | ".join(cell(_k(ms[m]["ranks"], k)) for m in order) + " |")
        for v in ("v1", "v2"):
            lines.append(f"| **AURAC {v}** | " + " | ".join(f"**{cell(ms[m]['aurac'][v])}**" for m in order) + " |")
        lines.append("| held-out loss, AURAC v2 (lower is better) | " + " | ".join(cell(ms[m]["loss_aurac_v2"], 1.0, 2) for m in order) + " |")
        lines.append("| chosen lr | " + " | ".join(
            ("per rank: " + ", ".join(f"{_k(ms[m]['lr'], k):g}" for k in grid)) if m == GRID else f"{ms[m]['lr']:g}" for m in order) + " |")
        lines.append(f"| optimisation steps (×batch {cfg['batch_size']}) | " + " | ".join(str(ms[m]["steps"]) for m in order) + " |")
        lines.append("| training wall-clock at the chosen lr (s; shared machine, noisy) | " + " | ".join(cell(ms[m]["train_seconds"], 1.0, 0) for m in order) + " |")
        lines.append("| training wall-clock of the whole lr search per seed (s) | " + " | ".join(cell(ms[m]["search_train_seconds"], 1.0, 0) for m in order) + " |")
        lines += ["", "Test held-out loss per rank (mean over seeds; the loss of the assistant tokens):", "",
                  "| rank | " + " | ".join(lab[m] for m in order) + " |", "|---:|" + "---:|" * len(order)]
        for k in grid:
            lines.append(f"| {k} | " + " | ".join(f"{_k(ms[m]['loss'], k)['mean']:.3f}" for m in order) + " |")
        lines += ["", f"Validation AURAC v2 (%) per lr (mean over seeds {res.get('search_seeds', res['seeds'])}; the grid: validation exact match per rank "
                  f"{'/'.join(map(str, grid))}); base model on validation: {base.get('val', {}).get('exact_match', float('nan')) * 100:.1f}%:", "",
                  "| lr | " + " | ".join(lab[m] for m in order if m != GRID) + " | " + lab[GRID] + " |", "|---:|" + "---:|" * len(order)]
        for lr in cfg["lrs"]:
            key = _lr_key(lr)
            row = [f"{ms[m]['val_search'][key] * 100:.1f}" for m in order if m != GRID]
            row.append("/".join(f"{_k(ms[GRID]['val_search'][key], k) * 100:.0f}" for k in grid))
            lines.append(f"| {key} | " + " | ".join(row) + " |")
        lines += ["", f"Search wall-clock of this regime (training, derivations and validation scoring of every job): "
                  f"{res['search_wall_seconds'] / 60:.0f} min; of which scoring {res['eval_seconds'] / 60:.0f} min (with the test scoring).", ""]
    lines += ["**Verdict (computed from the tables):**", "", *verdict(summary), ""]
    versus = variant_lines(summary)
    if versus:
        lines += ["**The `--variant` rows against `nested-loss`** (validation AURAC v2 at each one's chosen lr, mean over the "
                  "search seeds: what the choice reads; test: mean ± sd of the per-seed differences, in points):", "", *versus, ""]
    return "\n".join(lines) + "\n"


def _k(d: dict[Any, Any], k: int) -> Any:
    return d[k] if k in d else d[str(k)]


def plot_summary(summary: dict[str, Any], path: Path) -> None:
    """Mean test exact match vs rank (log2 axis) per method and regime, min–max bands over seeds, the
    base dotted: one row of panels for the methods and, when there are ``--variant`` rows, one for
    them (with the grid and ``nested-loss`` for reference)."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from mlora_export.evaluation.plot import rank_axis

    cfg = summary["settings"]
    regimes = list(summary["regimes"])
    if not regimes:
        return
    variants = [n for n, _ in cfg.get("variants", ())]
    labels = summary["labels"]
    panels = [("methods", [m for m in labels if m not in variants])]
    if variants:
        panels.append(("nested-loss variants", [m for m in labels if m in (GRID, "nested-loss", *variants)]))
    colour = {m: colormaps["tab20"](j % 20) for j, m in enumerate(labels)}
    fig = Figure(figsize=(6.5 * len(regimes), 4.8 * len(panels)), dpi=100)
    FigureCanvasAgg(fig)
    ks = list(cfg["grid"])
    for row, (title, methods) in enumerate(panels):
        for i, regime in enumerate(regimes):
            ax = fig.add_subplot(len(panels), len(regimes), row * len(regimes) + i + 1)
            ms = summary["regimes"][regime]["methods"]
            for m in [x for x in methods if x in ms]:
                pts = [_k(ms[m]["ranks"], k) for k in ks]
                ax.plot(ks, [p["mean"] * 100 for p in pts], marker="o", color=colour[m], linestyle="--" if m in variants else "-",
                        label=f"{labels[m]} ({ms[m]['aurac']['v2']['mean'] * 100:.1f})")
                if len(summary["regimes"][regime]["seeds"]) > 1:
                    ax.fill_between(ks, [p["min"] * 100 for p in pts], [p["max"] * 100 for p in pts], color=colour[m], alpha=0.12)
            base = summary.get("base", {}).get(regime, {}).get("test", {}).get("exact_match")
            if base is not None:
                ax.axhline(base * 100, color="gray", linestyle=":", label=f"base model ({base * 100:.1f}%)")
            rank_axis(ax, ks)
            ax.set_ylabel("test exact match (%)")
            ax.set_title(f"{REGIME_LABELS[regime]}\n{title}; legend: AURAC v2", fontsize=9)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, format="png")


# -- the experiment ----------------------------------------------------------------------------
def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def _quiet() -> None:
    import transformers

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("mlora_export").setLevel(logging.ERROR)


def _check_settings(cfg: Settings, output: Path) -> None:
    """A job is keyed by (regime, seed, lr) and its runs by method: a rerun may add those, not change the rest."""
    settings_file = output / "settings.json"
    fixed = {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(cfg))).items() if k not in _EXTENSIBLE}
    if settings_file.exists():
        old = {k: v for k, v in json.loads(settings_file.read_text(encoding="utf-8")).items() if k not in _EXTENSIBLE}
        if old != fixed:
            changed = sorted(k for k in fixed if old.get(k) != fixed[k])
            raise SystemExit(f"error: {output} holds runs made with other settings ({', '.join(changed)}); pass --force to replace them")
    stray = [s for s in cfg.choice_seeds if s not in cfg.seeds]
    if stray:
        raise SystemExit(f"error: --choice-seeds {stray} are not among --seeds {list(cfg.seeds)}: choose among the seeds that run")
    unknown = [m for m in cfg.methods if m not in method_specs(cfg.variants) and m not in (SVD, TRUNCATED)]
    if unknown:
        raise SystemExit(f"error: unknown method(s) {', '.join(unknown)}: expected {', '.join([*TRAINED, SVD, TRUNCATED])} or a --variant name")
    settings_file.write_text(json.dumps(dataclasses.asdict(cfg), indent=1), encoding="utf-8")


def load_jobs(cfg: Settings, output: Path) -> dict[tuple[str, int, float], dict[str, Any]]:
    jobs = {}
    for regime in cfg.regimes:
        for seed in cfg.seeds:
            for lr in cfg.lrs:
                p = output / "jobs" / f"{regime}-seed{seed}-lr{_lr_key(lr)}.json"
                if p.exists():
                    jobs[(regime, seed, lr)] = json.loads(p.read_text(encoding="utf-8"))
    return jobs


def run(cfg: Settings, output: Path, *, force: bool = False, report_only: bool = False) -> dict[str, Any]:
    """Run (or resume) everything into ``output`` and write ``summary.json``, ``report.md``,
    ``rank_curve.png`` from what has finished; return the summary. ``report_only`` trains nothing
    new: it scores the test split where a regime's search is complete, and reports."""
    import torch

    if output.exists() and force:
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)
    _check_settings(cfg, output)
    torch.set_num_threads(cfg.threads)
    t_all = time.perf_counter()
    base = base_model_dir(cfg, output)
    for regime in cfg.regimes:  # written once: a resumed run keeps the data its runs were trained on
        if not all((output / "data" / regime / f"{s}.jsonl").exists() for s in ("train", "val", "test")):
            for split, recs in task_splits(cfg, regime).items():
                write_jsonl(output / "data" / regime / f"{split}.jsonl", recs)
    base_info = base_scores(cfg, output, base)
    logger.info("base exact match: %s", {r: {s: round(v["exact_match"] * 100, 1) for s, v in d.items()} for r, d in base_info.items()})
    # seed-major, then lr: after the first seed a one-seed report is possible, and before that
    # the first lr of every regime (a partial report with --report-only --seeds S --lrs LR)
    search = _search_seeds(cfg)
    todo = [(cfg, output, base, regime, seed, lr) for seed in search for lr in cfg.lrs for regime in cfg.regimes]
    if not report_only:
        _map(cfg, _job, todo)
    jobs = load_jobs(cfg, output)
    seeds_of: dict[str, list[int]] = {}
    choices: dict[str, Any] = {}
    partial: list[str] = []
    for regime in cfg.regimes:
        seeds = complete_seeds(cfg, jobs, regime)
        if len(seeds) < len(search):
            missing = sorted({(s, lr) for s in search for lr in cfg.lrs} - {(s, lr) for s in seeds for lr in cfg.lrs})
            partial.append(f"regime {regime}: the search is complete for seed(s) {seeds or 'none'} of {list(search)}; "
                           f"(seed, lr) jobs unfinished: {missing}; the lr choice and the tables use the complete seeds only.")
        if seeds:
            seeds_of[regime] = seeds
            choices[regime] = choose(cfg, jobs, regime, seeds)
    # the other seeds: each method only at its chosen lr (the search seeds must all be complete)
    confirm = [s for s in cfg.seeds if s not in search]
    searched = [r for r in choices if seeds_of[r] == list(search)]  # regimes whose search is complete
    if confirm and not report_only:
        todo = [(cfg, output, base, regime, s, lr, plan) for s in confirm for regime in searched
                for lr, plan in confirmation_plans(cfg, choices[regime]).items()]
        _map(cfg, _job, todo)
        jobs = load_jobs(cfg, output)
    for regime in choices:
        done = confirmed_seeds(cfg, output, jobs, regime, choices[regime]) if regime in searched else []
        if len(done) < len(confirm):
            partial.append(f"regime {regime}: seed(s) {[s for s in confirm if s not in done]} not yet trained at the chosen lrs; "
                           f"the tables use seed(s) {seeds_of[regime] + done}.")
        seeds_of[regime] = seeds_of[regime] + done
    todo = [(cfg, output, base, regime, s, choices[regime]) for regime, seeds in seeds_of.items() for s in seeds]
    tests = {(t[3], t[4]): r for t, r in zip(todo, _map(cfg, _test, todo))}
    summary = summarise(cfg, jobs, tests, choices, seeds_of)
    summary["base"] = base_info
    summary["data"] = {"pycountry": _version("pycountry"), "examples": {
        r: {s: sum(1 for _ in open(output / "data" / r / f"{s}.jsonl", encoding="utf-8")) for s in ("train", "val", "test")} for r in cfg.regimes}}
    summary["partial"] = partial
    summary["jobs_finished"] = sorted(f"{r}-seed{s}-lr{_lr_key(lr)}" for (r, s, lr) in jobs)
    summary["report_seconds"] = time.perf_counter() - t_all
    (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (output / "report.md").write_text(report_markdown(summary), encoding="utf-8")
    plot_summary(summary, output / "rank_curve.png")
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", type=Path, required=True, help="folder for data, runs/, jobs/, tests/, report.md, rank_curve.png")
    ap.add_argument("--smoke", action="store_true", help="a seconds-long setting on a pico model that exercises every step")
    ap.add_argument("--seeds", type=str, default=None, help="comma-separated seeds (default 0,1)")
    ap.add_argument("--choice-seeds", type=str, default=None,
                    help="comma-separated seeds whose full lr search chooses each method's lr; the other seeds train "
                         "only at the chosen lrs (default: every seed searches)")
    ap.add_argument("--lrs", type=str, default=None, help="comma-separated learning rates (default 2e-3,4e-3,8e-3)")
    ap.add_argument("--regimes", type=str, default=None, help="comma-separated regimes (default iso,spell)")
    ap.add_argument("--methods", type=str, default=None,
                    help="comma-separated one-run methods besides the grid (default dylora,matryoshka,nested-loss,nested-loss-2x,svd,truncated)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                    help="another nested-loss recipe: TrainSettings fields as JSON (plus steps_multiplier, label); repeatable; added to --methods")
    ap.add_argument("--grid", type=str, default=None, help="comma-separated grid ranks (default 1,2,4,8,16)")
    ap.add_argument("--steps", type=int, default=None, help="optimisation steps of one run (default 40)")
    ap.add_argument("--workers", type=int, default=None, help="processes running jobs side by side (default 1)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per process (default 1)")
    ap.add_argument("--force", action="store_true", help="discard an existing --output instead of resuming it")
    ap.add_argument("--report-only", action="store_true", help="train nothing: score the test split of complete searches and report")
    args = ap.parse_args(argv)
    _quiet()
    cfg = Settings.smoke() if args.smoke else Settings()
    over: dict[str, Any] = {}
    if args.seeds:
        over["seeds"] = tuple(int(s) for s in args.seeds.split(","))
    if args.choice_seeds:
        over["choice_seeds"] = tuple(int(s) for s in args.choice_seeds.split(","))
    if args.lrs:
        over["lrs"] = tuple(float(s) for s in args.lrs.split(","))
    if args.regimes:
        over["regimes"] = tuple(args.regimes.split(","))
    if args.grid:
        over["grid"] = tuple(int(s) for s in args.grid.split(","))
    variants = []
    for v in args.variant:
        name, sep, text = v.partition("=")
        if not sep or not name:
            raise SystemExit(f"error: --variant {v!r}: expected NAME=JSON, e.g. nl-weighted='{{\"rank_weights\": [1, 1, 1, 1, 2]}}'")
        variants.append((name, text))
    if variants:
        over["variants"] = tuple(variants)
    methods = tuple(args.methods.split(",")) if args.methods else cfg.methods
    over["methods"] = methods + tuple(n for n, _ in variants if n not in methods)
    for name in ("steps", "workers", "threads"):
        if getattr(args, name):
            over[name] = getattr(args, name)
    summary = run(dataclasses.replace(cfg, **over), args.output, force=args.force, report_only=args.report_only)
    sys.stdout.write(report_markdown(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
