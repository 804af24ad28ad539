"""Scoring one model at one rank: teacher-forced loss and token accuracy, greedy exact match."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import (
    ConfigError,
    DataError,
)
from .data import EvalData, EvalExample

logger = logging.getLogger(__name__)

METRICS: tuple[str, ...] = ("loss", "accuracy", "exact-match")


# -- scoring one model -------------------------------------------------------------------------
@dataclass
class RankScore:
    """The numbers of one adapter at one rank (``rank = 0``: the base model without adapter).

    ``score`` is the evaluation's metric. ``loss`` … ``target_tokens`` are those of the data file
    (``None`` in a run on lm-eval tasks alone); ``tasks`` holds the lm-eval task metrics by name,
    each ``{"value", "stderr"}`` (:mod:`~mlora_export.evaluation.lm_eval_tasks`), ``None`` without tasks.
    """

    rank: int
    score: float
    loss: float | None
    perplexity: float | None
    token_accuracy: float | None
    exact_match: float | None
    examples: int | None
    target_tokens: int | None
    seconds: float
    adapter: str | None = None
    tasks: dict[str, dict[str, float | None]] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.tasks is None:
            del out["tasks"]
        return out


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
                if e.scored is not None:
                    score[i, :n] = torch.tensor(e.scored, dtype=torch.bool)
                else:
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


def stop_token_ids(model: Any, tokenizer: Any, data: EvalData) -> list[int]:
    """The tokens that end a generation: the tokenizer's EOS, the model's generation config EOS
    (one id or several) and the chat template's end-of-turn tokens found in the data."""
    ids: list[int] = []
    cfg_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, *(cfg_eos if isinstance(cfg_eos, (list, tuple)) else [cfg_eos]), *data.stop_ids):
        if isinstance(value, int) and value not in ids:
            ids.append(value)
    return ids


def greedy_completions(
    model: Any, tokenizer: Any, data: EvalData, *, batch_size: int = 16, max_new_tokens: int | None = None
) -> list[str]:
    """Greedy completion text of every example's prompt (in data order), stopped at an end token or the token budget.

    The prompt is the record's prompt, or, for a conversation, the template's generation prompt for
    the conversation up to its last assistant turn. Generation stops at any of
    :func:`stop_token_ids` or after the budget: ``max_new_tokens`` or, when ``None``, the token
    length of the example's reference (the completion without EOS, or the last assistant turn).
    """
    import torch

    if not data.generates:
        raise DataError(f"{data.source or data.path}: exact-match needs a reference to generate (prompt/completion or conversation "
                        "records), the file has {\"text\"} records; use metric loss or accuracy", option="metric")
    device = next(model.parameters()).device
    stops = stop_token_ids(model, tokenizer, data)
    eos = stops[0] if stops else None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    index = {id(e): i for i, e in enumerate(data.examples)}
    out: list[str] = [""] * len(data.examples)
    with torch.inference_mode():
        for batch in _batches(data.examples, batch_size):
            prompts = [e.prompt_ids for e in batch]
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
                eos_token_id=stops or None,
            )
            new = gen[:, width:].tolist()
            for e, toks, budget in zip(batch, new, budgets):
                toks = toks[:budget]
                cut = next((j for j, t in enumerate(toks) if t in stops), len(toks))
                out[index[id(e)]] = tokenizer.decode(toks[:cut], skip_special_tokens=True)
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
        em = exact_match(model, tokenizer, data, batch_size=batch_size, max_new_tokens=max_new_tokens)
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


def exact_match(model: Any, tokenizer: Any, data: EvalData, *, batch_size: int = 16, max_new_tokens: int | None = None) -> float:
    """Share of ``data``'s examples whose greedy completion (:func:`greedy_completions`) equals the
    reference, both stripped of surrounding whitespace: the ``exact-match`` score without the
    teacher-forced pass of :func:`score_model`."""
    preds = greedy_completions(model, tokenizer, data, batch_size=batch_size, max_new_tokens=max_new_tokens)
    hits = sum(p.strip() == (e.completion or "").strip() for p, e in zip(preds, data.examples))
    return hits / len(data.examples)


def check_metric(metric: str) -> str:
    """Return ``metric`` if known; raise :class:`ConfigError` otherwise."""
    if metric not in METRICS:
        raise ConfigError(f"unknown metric {metric!r}: expected one of {', '.join(METRICS)}")
    return metric


