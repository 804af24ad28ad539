"""The evaluation data: a JSONL file read and tokenised as training reads it, fingerprinted."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import (
    DataError,
)

logger = logging.getLogger(__name__)

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
    from ..data import IGNORE_INDEX, ensure_pad_token, load_jsonl, tokenize_example

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
            raise DataError(f"{p}, line {rec.line}: {len(ids)} tokens, more than the model's {max_length} positions; shorten it", path=p)
        first = max(1, next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), len(ids)))
        if first >= len(ids):
            raise DataError(f"{p}, line {rec.line}: nothing to score (a text of one token or an empty completion)", path=p)
        n_comp = len(ids) - first - int(tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id)
        examples.append(EvalExample(tuple(ids), first, rec.prompt, rec.completion, max(1, n_comp)))
    digest = hashlib.sha256(p.read_bytes()).hexdigest()
    return EvalData(p, "prompt-completion" if records[0].is_completion else "text", tuple(examples), digest)


