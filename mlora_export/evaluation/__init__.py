"""Per-rank evaluation of nested adapters, with AURAC (docs/design.md §1).

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

lm-evaluation-harness tasks (:mod:`.lm_eval_tasks`, the ``lm-eval`` extra): every rank is also (or
only) scored by lm-eval itself on its own task registry, through its ``HFLM`` wrapping the one
loaded model; each task metric is named ``<task>:<metric>[:<filter>]``
(:mod:`mlora_export.metric_names`) and gets its AURAC.

Which ranks: a multi-rank adapter (nested ``matryoshka``/``dylora``) is evaluated at every
requested rank up to its max rank (``"all"`` = its train ranks). A single-rank adapter (a plain
PEFT LoRA folder, a slice, a nested adapter trained with method ``lora``) is evaluated at its own
rank only. Single-rank adapters given one by one are joined into one curve (``"single-rank
adapters"``); a *collection folder* (a folder whose sub-folders are adapters, e.g. the output of
``mlora-export slice`` or a grid of separately trained LoRA runs ``grid/r1 … grid/r32``) is one
curve, each member at its own rank.
"""


from __future__ import annotations

from .data import EvalData, EvalExample, load_eval_data
from .lm_eval_tasks import LM_EVAL_EXTRA, LmEvalTasks, TaskMetric, TaskSuite
from .plan import SINGLE_RANK_LABEL, Curve, plan_curves
from .report import (
    PLOT_NAME,
    RECORD_KEY,
    RESULTS_NAME,
    record_entries,
    record_entry,
    record_evaluation,
    record_evaluations,
    task_record_entries,
    record_results,
    write_results,
)
from .options import EvalOptions
from .result import RESULTS_FORMAT, EvalResult
from .run import evaluate
from .scoring import (
    METRICS,
    RankScore,
    check_metric,
    exact_match,
    greedy_completions,
    score_model,
    teacher_forced,
)

__all__ = [
    "LM_EVAL_EXTRA", "METRICS", "PLOT_NAME", "RECORD_KEY", "RESULTS_FORMAT", "RESULTS_NAME", "SINGLE_RANK_LABEL", "Curve",
    "EvalData", "EvalExample", "EvalOptions", "EvalResult", "LmEvalTasks", "RankScore", "TaskMetric", "TaskSuite", "check_metric",
    "evaluate", "exact_match", "greedy_completions", "load_eval_data", "plan_curves", "record_entries", "record_entry",
    "record_evaluation", "record_evaluations", "record_results", "score_model", "task_record_entries", "teacher_forced",
    "write_results",
]
