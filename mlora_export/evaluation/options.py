"""How :func:`~.run.evaluate` scores (:class:`EvalOptions`): the metric, the batches, the base
model's dtype and device, what else to score (lm-eval tasks: :class:`~.lm_eval_tasks.LmEvalTasks`) and where to record it."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..base import DTYPES
from ..params import param
from .lm_eval_tasks import LmEvalTasks
from .scoring import METRICS


@dataclass(frozen=True)
class EvalOptions:
    """The options of :func:`~.run.evaluate`; the defaults score the loss on every example."""

    metric: str = param(
        "loss", flag="--metric", choices=METRICS, show_default=True,
        help="loss: NLL of the completion, the assistant turns or the text (lower is better); accuracy: next-token accuracy "
             "on the same tokens; exact-match: greedy generation equals the completion (or a conversation's last assistant turn). "
             "The metric of --data; lm-eval --tasks have their own.")
    record: bool = param(False, flag="--record",
                         help="Also store the numbers in each nested adapter's matryoshka_config.json (key 'evaluation'): the --metric of "
                              "--data and every lm-eval task metric (task:metric), for bundle and pull --rank auto.")
    batch_size: int = param(16, flag="--batch-size", min=1, show_default=True, help="Examples per forward pass (lm-eval's too).")
    max_new_tokens: int | None = param(
        None, flag="--max-new-tokens", min=1,
        help="exact-match generation budget (default: each reference's token length); generation also stops at "
             "EOS and the chat template's end-of-turn token.")
    tokenizer_dir: str | os.PathLike[str] | None = param(None, flag="--tokenizer", hint="or pass --tokenizer DIR",
                                                         help="Tokenizer folder (default: --base-model).")
    dtype: str = param("auto", flag="--dtype", choices=DTYPES, show_default=True, help="Dtype to load the base model in.")
    device: str | None = param(None, flag="--device", help="torch device (default: cuda if available, else cpu).")
    with_base: bool = param(False, flag="--with-base",
                            help="Also score the base model without adapter (rank 0, a dashed line in the plot).")
    max_examples: int | None = param(None, flag="--max-examples", min=1, help="Use only the first N records.")
    chat_template: str | None = param(None, help="Jinja text of a chat template that replaces the tokenizer's own.")
    revision: str | None = param(None, help="Branch, tag or commit of a Hub base model id.")
    lm_eval: LmEvalTasks | None = param(None, help="lm-evaluation-harness tasks to score every rank on too (or only, with no data).")


__all__ = ["EvalOptions", "LmEvalTasks"]
