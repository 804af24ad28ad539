"""Per-rank evaluation of nested adapters, with AURAC (DESIGN.md §1).

The base model is loaded once; every adapter is put on it through PEFT
(:func:`mlora_export.training.load_nested_adapter`), evaluated at each rank by switching the rank
**in place** (:meth:`NestedLoraModel.set_rank`: ``ΔW_k = s(k)·B[:, :k]·A[:k, :]``), then unloaded
again, so ``m`` ranks of ``n`` adapters never reload the base.

Data is JSONL, read and tokenised exactly as training reads it (:mod:`mlora_export.data`: the
tokenizer's special tokens such as BOS before the text or prompt, EOS appended to the text or
completion), one kind of record per file:

- ``{"text": …}``: language modelling. ``loss`` is the mean next-token negative log-likelihood over
  every predicted token (token-weighted over the whole file, EOS included), ``perplexity =
  exp(loss)``; ``accuracy`` is next-token (argmax) accuracy over the same tokens.
- ``{"prompt": …, "completion": …}``: the same on the completion tokens (and EOS) only; the prompt
  is context. ``exact-match`` greedily generates from the prompt and counts the examples whose
  generated text equals the completion after ``strip()``. Generation stops at EOS or after
  ``max_new_tokens``; by default each example may generate as many tokens as its reference
  completion has (EOS not counted), so a model that has not learned to stop is not penalised for
  running on, and one that stops early is wrong.

Scores and AURAC: the per-rank ``score`` is the chosen metric; AURAC v1/v2 are the mean score over
the rank axis (linear / ``log2``). For ``accuracy`` and ``exact-match`` higher is better; for
``loss`` AURAC is a mean loss and **lower is better** (``higher_is_better`` in the result says so).

Which ranks: a multi-rank adapter (nested ``matryoshka``/``dylora``) is evaluated at every
requested rank up to its max rank (``"all"`` = its train ranks). A single-rank adapter (a plain
PEFT LoRA folder, a slice, a nested adapter trained with method ``lora``) is evaluated at its own
rank only. Single-rank adapters given one by one are joined into one curve (``"single-rank
adapters"``); a *collection folder* (a folder whose sub-folders are adapters, e.g. the output of
``mlora-export slice`` or a grid of separately trained LoRA runs ``grid/r1 … grid/r32``) is one
curve, each member at its own rank.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .adapter import CONFIG_NAME, NESTED_FORMAT, PEFT_CONFIG_NAME, NestedAdapter
from .base import check_base_model_dir, check_device, check_dtype, check_fits, load_base_model, load_tokenizer
from .errors import ConfigError, DataError, InvalidAdapterError, RankError
from .fs import atomic_output_dir
from .method import aurac
from .validate import is_int

logger = logging.getLogger(__name__)

METRICS: tuple[str, ...] = ("loss", "accuracy", "exact-match")
RESULTS_FORMAT = "mlora-eval/1"
RESULTS_NAME = "results.json"
PLOT_NAME = "rank_curve.png"
#: Key under which ``--record`` stores results in ``matryoshka_config.json``.
RECORD_KEY = "evaluation"
SINGLE_RANK_LABEL = "single-rank adapters"
#: ``progress(done, total)`` counted in evaluated (adapter, rank) pairs.
Progress = Callable[[int, int], None]


# -- data --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalExample:
    """One tokenised record: ``input_ids`` and the positions (indices into ``input_ids``) whose tokens are scored."""

    input_ids: tuple[int, ...]
    first_target: int
    prompt: str | None = None
    completion: str | None = None
    #: tokens of the completion without the appended EOS (the default generation budget)
    completion_tokens: int = 0

    @property
    def n_targets(self) -> int:
        return len(self.input_ids) - self.first_target


@dataclass(frozen=True)
class EvalData:
    """A tokenised evaluation file."""

    path: Path
    kind: str  # "text" | "prompt-completion"
    examples: tuple[EvalExample, ...]
    sha256: str

    def describe(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "kind": self.kind,
            "examples": len(self.examples),
            "target_tokens": sum(e.n_targets for e in self.examples),
            "sha256": self.sha256,
        }


def load_eval_data(
    path: str | os.PathLike[str], tokenizer: Any, *, max_length: int | None = None, max_examples: int | None = None
) -> EvalData:
    """Read and tokenise an evaluation JSONL file exactly as training does (:mod:`mlora_export.data`).

    Raises:
        DataError: bad records (named by line), a file mixing ``text`` and ``prompt``/``completion``
            records, or an example longer than ``max_length`` tokens.
    """
    from .data import IGNORE_INDEX, ensure_pad_token, load_jsonl, tokenize_example

    p = Path(path)
    records = load_jsonl(p)
    if max_examples is not None:
        records = records[:max_examples]
    kinds = {r.is_completion for r in records}
    if len(kinds) > 1:
        first_other = next(r.line for r in records if r.is_completion != records[0].is_completion)
        raise DataError(f"{p}, line {first_other}: the file mixes \"text\" and \"prompt\"/\"completion\" records; use one kind per evaluation file")
    ensure_pad_token(tokenizer)
    examples = []
    for rec in records:
        item = tokenize_example(rec, tokenizer, 1 << 30)
        ids, labels = item["input_ids"], item["labels"]
        if max_length is not None and len(ids) > max_length:
            raise DataError(f"{p}, line {rec.line}: {len(ids)} tokens, more than the model's {max_length} positions; shorten it")
        first = max(1, next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), len(ids)))
        if first >= len(ids):
            raise DataError(f"{p}, line {rec.line}: nothing to score (a text of one token or an empty completion)")
        n_comp = len(ids) - first - int(tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id)
        examples.append(EvalExample(tuple(ids), first, rec.prompt, rec.completion, max(1, n_comp)))
    digest = hashlib.sha256(p.read_bytes()).hexdigest()
    return EvalData(p, "prompt-completion" if records[0].is_completion else "text", tuple(examples), digest)


# -- scoring one model -------------------------------------------------------------------------
@dataclass
class RankScore:
    """The numbers of one adapter at one rank (``rank = 0``: the base model without adapter)."""

    rank: int
    score: float
    loss: float
    perplexity: float
    token_accuracy: float
    exact_match: float | None
    examples: int
    target_tokens: int
    seconds: float
    adapter: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _batches(examples: Sequence[EvalExample], batch_size: int) -> list[list[EvalExample]]:
    order = sorted(examples, key=lambda e: len(e.input_ids))  # similar lengths → little padding
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def teacher_forced(model: Any, data: EvalData, *, batch_size: int = 16, pad_id: int = 0) -> tuple[float, int, int]:
    """Sum of next-token NLL, number of scored tokens and number of argmax hits over ``data``.

    Batches are right-padded (pads masked out of attention and scoring), computed in float32.
    """
    import torch

    device = next(model.parameters()).device
    nll_sum, n_tok, n_hit = 0.0, 0, 0
    with torch.inference_mode():
        for batch in _batches(data.examples, batch_size):
            width = max(len(e.input_ids) for e in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            att = torch.zeros((len(batch), width), dtype=torch.long)
            score = torch.zeros((len(batch), width), dtype=torch.bool)
            for i, e in enumerate(batch):
                n = len(e.input_ids)
                ids[i, :n] = torch.tensor(e.input_ids)
                att[i, :n] = 1
                score[i, e.first_target : n] = True
            ids, att, score = ids.to(device), att.to(device), score.to(device)
            logits = model(input_ids=ids, attention_mask=att).logits[:, :-1].float()
            targets = ids[:, 1:]
            mask = score[:, 1:]
            logp = torch.log_softmax(logits, dim=-1)
            nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            nll_sum += float(nll[mask].double().sum())
            n_tok += int(mask.sum())
            n_hit += int((logits.argmax(-1) == targets)[mask].sum())
    return nll_sum, n_tok, n_hit


def greedy_completions(
    model: Any, tokenizer: Any, data: EvalData, *, batch_size: int = 16, max_new_tokens: int | None = None
) -> list[str]:
    """Greedy completion text of every example's prompt (in data order), stopped at EOS or the token budget.

    The budget is ``max_new_tokens`` or, when ``None``, the token length of the example's reference
    completion (EOS not counted).
    """
    import torch

    if data.kind != "prompt-completion":
        raise DataError(f"{data.path}: exact-match needs {{\"prompt\", \"completion\"}} records, the file has {{\"text\"}} records; use --metric loss or accuracy")
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    index = {id(e): i for i, e in enumerate(data.examples)}
    out: list[str] = [""] * len(data.examples)
    with torch.inference_mode():
        for batch in _batches(data.examples, batch_size):
            prompts = [e.input_ids[: e.first_target] for e in batch]
            budgets = [max_new_tokens if max_new_tokens is not None else e.completion_tokens for e in batch]
            width = max(len(p) for p in prompts)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            att = torch.zeros((len(batch), width), dtype=torch.long)
            for i, p in enumerate(prompts):  # left padding: every prompt ends at the same column
                ids[i, width - len(p) :] = torch.tensor(p)
                att[i, width - len(p) :] = 1
            gen = model.generate(
                input_ids=ids.to(device),
                attention_mask=att.to(device),
                max_new_tokens=max(budgets),
                min_new_tokens=0,
                do_sample=False,
                num_beams=1,
                pad_token_id=pad,
                eos_token_id=eos,
            )
            new = gen[:, width:].tolist()
            for e, toks, budget in zip(batch, new, budgets):
                toks = toks[:budget]
                if eos is not None and eos in toks:
                    toks = toks[: toks.index(eos)]
                out[index[id(e)]] = tokenizer.decode(toks, skip_special_tokens=True)
    return out


def score_model(
    model: Any,
    tokenizer: Any,
    data: EvalData,
    *,
    metric: str = "loss",
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    rank: int = 0,
) -> RankScore:
    """Evaluate one model (a base model, a ``PeftModel``, a nested adapter at some rank) on ``data``.

    Returns loss, perplexity and token accuracy (always) and exact-match (for ``metric="exact-match"``).
    """
    check_metric(metric)
    t0 = time.perf_counter()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    nll, n_tok, n_hit = teacher_forced(model, data, batch_size=batch_size, pad_id=pad)
    loss = nll / n_tok
    acc = n_hit / n_tok
    em: float | None = None
    if metric == "exact-match":
        preds = greedy_completions(model, tokenizer, data, batch_size=batch_size, max_new_tokens=max_new_tokens)
        hits = sum(p.strip() == (e.completion or "").strip() for p, e in zip(preds, data.examples))
        em = hits / len(data.examples)
    score = {"loss": loss, "accuracy": acc, "exact-match": em}[metric]
    return RankScore(
        rank=rank,
        score=float(score),  # type: ignore[arg-type]
        loss=loss,
        perplexity=math.exp(min(loss, 700.0)),
        token_accuracy=acc,
        exact_match=em,
        examples=len(data.examples),
        target_tokens=n_tok,
        seconds=time.perf_counter() - t0,
    )


def check_metric(metric: str) -> str:
    """Return ``metric`` if known; raise :class:`ConfigError` otherwise."""
    if metric not in METRICS:
        raise ConfigError(f"unknown metric {metric!r}: expected one of {', '.join(METRICS)}")
    return metric


# -- what to evaluate --------------------------------------------------------------------------
@dataclass
class Curve:
    """One curve of the plot: one multi-rank adapter at several ranks, or several single-rank adapters."""

    label: str
    path: str
    kind: str  # "adapter" | "collection" | "single-rank adapters"
    method: str
    max_rank: int
    members: list[tuple[NestedAdapter, tuple[int, ...]]]
    points: list[RankScore] = field(default_factory=list)
    aurac: dict[str, float] = field(default_factory=dict)

    @property
    def ranks(self) -> list[int]:
        return [k for _, ks in self.members for k in ks]

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "path": self.path,
            "kind": self.kind,
            "method": self.method,
            "max_rank": self.max_rank,
            "ranks": [p.to_dict() for p in self.points],
            "aurac": self.aurac,
        }


def _is_adapter_dir(p: Path) -> bool:
    return (p / PEFT_CONFIG_NAME).is_file()


def _ranks_for(adapter: NestedAdapter, ranks: Sequence[int] | str) -> tuple[int, ...]:
    if len(adapter.config.train_ranks) == 1:
        return (adapter.max_rank,)
    if isinstance(ranks, str):
        if ranks != "all":
            raise RankError(f"ranks must be a list of integers or 'all', got {ranks!r}")
        return tuple(adapter.config.train_ranks)
    fit = tuple(k for k in sorted(set(ranks)) if k <= adapter.max_rank)
    skipped = sorted(set(ranks) - set(fit))
    if skipped:
        logger.warning("adapter %s has max rank %d: skipping rank(s) %s", adapter.path, adapter.max_rank, skipped)
    if not fit:
        raise RankError(
            f"none of the ranks {sorted(set(ranks))} fits adapter {str(adapter.path)!r} (max rank {adapter.max_rank}); "
            f"give ranks up to {adapter.max_rank}, or 'all' for its train ranks {list(adapter.config.train_ranks)}"
        )
    for k in fit:
        adapter.check_rank(k)
    return fit


def _check_distinct(members: list[NestedAdapter], where: str) -> None:
    seen: dict[int, Path] = {}
    for a in members:
        if a.max_rank in seen:
            raise RankError(
                f"{where} holds two adapters of rank {a.max_rank} ({str(seen[a.max_rank])!r} and {str(a.path)!r}); "
                "one curve needs one adapter per rank: put them in separate collection folders"
            )
        seen[a.max_rank] = a.path


def plan_curves(adapters: Sequence[str | os.PathLike[str]], ranks: Sequence[int] | str = "all") -> list[Curve]:
    """Validate every adapter path and decide which ranks each is evaluated at (no model is loaded).

    Raises:
        InvalidAdapterError: a path is not an adapter folder nor a folder of adapter folders.
        RankError: no requested rank fits an adapter, or one curve has two adapters of one rank.
    """
    if not adapters:
        raise ConfigError("no adapter given: pass at least one adapter folder")
    if not isinstance(ranks, str):
        bad = [k for k in ranks if not is_int(k) or k < 1]
        if bad or not ranks:
            raise RankError(f"ranks must be positive integers, got {list(ranks)}")
    curves: list[Curve] = []
    singles: list[NestedAdapter] = []
    for raw in adapters:
        p = Path(raw)
        if p.is_dir() and not _is_adapter_dir(p) and not (p / "adapter_model.safetensors").exists():
            subs = sorted(d for d in p.iterdir() if d.is_dir() and _is_adapter_dir(d))
            if not subs:
                raise InvalidAdapterError(
                    f"{str(p)!r} is neither an adapter folder (no {PEFT_CONFIG_NAME}) nor a folder of adapter folders; "
                    "pass a nested adapter, a PEFT LoRA adapter, or a folder such as the output of 'mlora-export slice'"
                )
            members = sorted((NestedAdapter.load(d) for d in subs), key=lambda a: a.max_rank)
            _check_distinct(members, f"collection {str(p)!r}")
            methods = sorted({a.config.method for a in members})
            curves.append(Curve(p.name or str(p), str(p), "collection", "+".join(methods), members[-1].max_rank,
                                [(a, (a.max_rank,)) for a in members]))
            continue
        adapter = NestedAdapter.load(p)
        if len(adapter.config.train_ranks) == 1:
            singles.append(adapter)
            continue
        curves.append(Curve(p.name or str(p), str(p), "adapter", adapter.config.method, adapter.max_rank,
                            [(adapter, _ranks_for(adapter, ranks))]))
    if len(singles) == 1:
        a = singles[0]
        curves.append(Curve(a.path.name or str(a.path), str(a.path), "adapter", a.config.method, a.max_rank, [(a, (a.max_rank,))]))
    elif singles:
        singles.sort(key=lambda a: a.max_rank)
        _check_distinct(singles, "the single-rank adapters given")
        curves.append(Curve(SINGLE_RANK_LABEL, ", ".join(str(a.path) for a in singles), SINGLE_RANK_LABEL,
                            "+".join(sorted({a.config.method for a in singles})), singles[-1].max_rank,
                            [(a, (a.max_rank,)) for a in singles]))
    labels: dict[str, int] = {}
    for c in curves:  # unique labels for the table and the plot legend
        n = labels.get(c.label, 0)
        labels[c.label] = n + 1
        if n:
            c.label = f"{c.label} ({n + 1})"
    return curves


# -- the base model ----------------------------------------------------------------------------
def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _max_positions(base_model_dir: str | os.PathLike[str]) -> int | None:
    try:
        cfg = json.loads((Path(base_model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # load_base_model reports it
    value = cfg.get("max_position_embeddings") or cfg.get("n_positions")
    return int(value) if isinstance(value, int) else None


# -- evaluate ----------------------------------------------------------------------------------
@dataclass
class EvalResult:
    """Everything one evaluation produced; :meth:`to_dict` is the ``results.json`` content."""

    metric: str
    curves: list[Curve]
    data: EvalData
    base_model: str
    base: RankScore | None = None
    seconds: float = 0.0

    @property
    def higher_is_better(self) -> bool:
        return self.metric != "loss"

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": RESULTS_FORMAT,
            "metric": self.metric,
            "higher_is_better": self.higher_is_better,
            "data": self.data.describe(),
            "base_model": self.base_model,
            "base": self.base.to_dict() if self.base else None,
            "adapters": [c.to_dict() for c in self.curves],
            "seconds": self.seconds,
            "created_by": f"mlora-export {__version__}",
        }


def evaluate(
    adapters: Sequence[str | os.PathLike[str]],
    base_model_dir: str | os.PathLike[str],
    data_path: str | os.PathLike[str],
    ranks: Sequence[int] | str = "all",
    *,
    metric: str = "loss",
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    tokenizer_dir: str | os.PathLike[str] | None = None,
    dtype: str = "auto",
    device: str | None = None,
    with_base: bool = False,
    max_examples: int | None = None,
    progress: Progress | None = None,
) -> EvalResult:
    """Evaluate every adapter at every rank on ``data_path``; per-rank scores and AURAC v1/v2 per curve.

    All inputs are validated before the base model is loaded. The base is loaded once; each adapter
    is put on it, evaluated at its ranks by switching the rank in place, and unloaded again.
    ``with_base`` also scores the base model alone (rank 0; not part of AURAC).

    Raises:
        ConfigError, RankError, InvalidAdapterError, DataError, BaseModelError,
        BaseModelMismatchError: bad inputs (see the helpers above).
    """
    from .training import load_nested_adapter

    check_metric(metric)
    if not is_int(batch_size) or batch_size < 1:
        raise ConfigError(f"batch size must be a positive integer, got {batch_size!r}")
    if max_new_tokens is not None and (not is_int(max_new_tokens) or max_new_tokens < 1):
        raise ConfigError(f"max new tokens must be a positive integer, got {max_new_tokens!r}")
    t0 = time.perf_counter()
    curves = plan_curves(adapters, ranks)
    check_dtype(dtype)
    device = check_device(device) if device is not None else None
    check_base_model_dir(base_model_dir)
    tokenizer = load_tokenizer(tokenizer_dir if tokenizer_dir is not None else base_model_dir, hint="save one there or pass --tokenizer DIR")
    max_len = _max_positions(base_model_dir)
    data = load_eval_data(data_path, tokenizer, max_length=max_len, max_examples=max_examples)  # before loading weights
    if metric == "exact-match" and data.kind != "prompt-completion":
        raise DataError(f"{data.path}: exact-match needs {{\"prompt\", \"completion\"}} records, the file has {{\"text\"}} records; use --metric loss or accuracy")
    model = load_base_model(base_model_dir, dtype, device=device or _default_device())
    for c in curves:
        for a, _ in c.members:
            check_fits(a, model, base=str(base_model_dir))
    total = sum(len(ks) for c in curves for _, ks in c.members) + int(with_base)
    done = 0
    kw = {"metric": metric, "batch_size": batch_size, "max_new_tokens": max_new_tokens}
    base_score = None
    if with_base:
        base_score = score_model(model, tokenizer, data, rank=0, **kw)
        done += 1
        if progress:
            progress(done, total)
    for c in curves:
        for adapter, ks in c.members:
            handle = load_nested_adapter(model, adapter)
            try:
                for k in ks:
                    handle.set_rank(k)
                    point = score_model(handle.model, tokenizer, data, rank=k, **kw)
                    point.adapter = str(adapter.path)
                    c.points.append(point)
                    logger.info("%s rank %d: %s = %.6g", c.label, k, metric, point.score)
                    done += 1
                    if progress:
                        progress(done, total)
            finally:
                handle.remove()
                model = handle.model.unload()
        c.aurac = aurac([p.rank for p in c.points], [p.score for p in c.points])
    return EvalResult(metric, curves, data, str(base_model_dir), base_score, time.perf_counter() - t0)


# -- output ------------------------------------------------------------------------------------
def write_results(result: EvalResult, output: str | os.PathLike[str], *, force: bool = False) -> Path:
    """Write ``results.json`` and ``rank_curve.png`` into the folder ``output``, atomically.

    Raises:
        OutputPathError: ``output`` is, holds or lies inside an evaluated adapter, the base model
            or the data file.
        OutputExistsError: ``output`` exists and ``force`` is false.
    """
    from .plotting import plot_rank_curves

    inputs = [result.base_model, result.data.path, *(c.path for c in result.curves),
              *(m.path for c in result.curves for m, _ in c.members)]
    with atomic_output_dir(output, force, inputs) as tmp:
        with open(tmp / RESULTS_NAME, "w", encoding="utf-8") as f:
            json.dump(result.to_dict(), f, indent=2)
            f.write("\n")
        plot_rank_curves(result.to_dict(), tmp / PLOT_NAME)
    return Path(output)


def record_entry(result: EvalResult, curve: Curve) -> dict[str, Any]:
    """The ``evaluation[<metric>]`` entry stored in ``matryoshka_config.json`` by ``--record``."""
    return {
        "metric": result.metric,
        "higher_is_better": result.higher_is_better,
        "data": result.data.path.name,
        "data_sha256": result.data.sha256,
        "examples": len(result.data.examples),
        "base_model": result.base_model,
        "ranks": [{"rank": p.rank, "score": p.score} for p in curve.points],
        "aurac": dict(curve.aurac),
        "base_score": result.base.score if result.base else None,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "created_by": f"mlora-export {__version__}",
    }


def recordable(curve: Curve) -> bool:
    """True when ``curve`` is one nested adapter folder (with a ``matryoshka_config.json`` of format ``mlora-nested/1``)."""
    return curve.kind == "adapter" and curve.members[0][0].is_nested


def record_evaluation(adapter_dir: str | os.PathLike[str], entry: dict[str, Any]) -> Path:
    """Store ``entry`` under ``evaluation[<metric>]`` in the adapter's ``matryoshka_config.json``, atomically.

    Other fields, and entries for other metrics, are kept; an entry for the same metric is replaced.

    Raises:
        InvalidAdapterError: the folder has no nested ``matryoshka_config.json``.
    """
    path = Path(adapter_dir) / CONFIG_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise InvalidAdapterError(f"{path}: cannot read it to record results ({e})") from e
    if not isinstance(data, dict) or data.get("format") != NESTED_FORMAT:
        raise InvalidAdapterError(f"{path}: not a nested adapter config ({NESTED_FORMAT}); results are recorded for nested adapters only")
    section = data.get(RECORD_KEY)
    if not isinstance(section, dict):
        section = {}
    section[entry["metric"]] = entry
    data[RECORD_KEY] = section
    fd, tmp = tempfile.mkstemp(prefix=f".{CONFIG_NAME}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, path.stat().st_mode & 0o777)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


__all__ = [
    "METRICS", "RECORD_KEY", "Curve", "EvalData", "EvalExample", "EvalResult", "RankScore",
    "evaluate", "greedy_completions", "load_base_model", "load_eval_data", "load_tokenizer",
    "plan_curves", "record_entry", "record_evaluation", "recordable", "score_model",
    "teacher_forced", "write_results",
]
