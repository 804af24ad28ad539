"""Training and evaluation data: JSONL files, tokenisation with completion-only labels, a collator.

A data file has one JSON object per line, either

- ``{"text": "..."}``: causal language modelling, loss on every token; or
- ``{"prompt": "...", "completion": "..."}``: loss on the completion only (labels are ``-100`` on
  the prompt tokens and on padding).

Other keys are ignored; blank lines are skipped. Every problem is a :class:`DataError` that names
the file and the line. (The small task the demo trains on ships in :mod:`mlora_export.demo`.)
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import DataError
from .validate import is_int

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    """One validated line: ``text`` for plain LM data, or ``prompt`` + ``completion``."""

    text: str | None = None
    prompt: str | None = None
    completion: str | None = None
    line: int = 0

    @property
    def is_completion(self) -> bool:
        return self.completion is not None


def _parse_line(obj: Any, where: str) -> Example:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object like {{\"text\": ...}} or {{\"prompt\": ..., \"completion\": ...}}, found {type(obj).__name__}")
    if "prompt" in obj or "completion" in obj:
        missing = [k for k in ("prompt", "completion") if k not in obj]
        if missing:
            raise DataError(f"{where}: has {'prompt' if 'prompt' in obj else 'completion'} but no {missing[0]!r}; give both \"prompt\" and \"completion\"")
        prompt, completion = obj["prompt"], obj["completion"]
        for key, value in (("prompt", prompt), ("completion", completion)):
            if not isinstance(value, str):
                raise DataError(f"{where}: {key!r} must be a string, found {type(value).__name__}")
        if not completion:
            raise DataError(f"{where}: 'completion' is empty; there is nothing to learn from this line")
        return Example(prompt=prompt, completion=completion)
    if "text" in obj:
        text = obj["text"]
        if not isinstance(text, str):
            raise DataError(f"{where}: 'text' must be a string, found {type(text).__name__}")
        if not text:
            raise DataError(f"{where}: 'text' is empty")
        return Example(text=text)
    keys = ", ".join(repr(k) for k in list(obj)[:5]) or "none"
    raise DataError(f"{where}: expected a \"text\" key or \"prompt\" and \"completion\" keys, found keys {keys}")


#: The longest line (one record) :func:`load_jsonl` reads: a longer one is refused before it is
#: held in memory (a 200 MB record would otherwise cost gigabytes before being truncated).
MAX_LINE_CHARS = 4 * 2**20


def load_jsonl(path: str | os.PathLike[str]) -> list[Example]:
    """Read and validate a JSONL data file.

    Lines are read at most :data:`MAX_LINE_CHARS` characters at a time; a longer record is refused.

    Raises:
        DataError: the file is missing, not a regular file, not UTF-8, empty, or a line is too
            long, not valid JSON or lacks the keys; the message names the file and the line number.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"data file {str(p)!r} does not exist; give a JSONL file with one {{\"text\": ...}} or {{\"prompt\": ..., \"completion\": ...}} object per line")
    if not p.is_file():
        raise DataError(f"data file {str(p)!r} is not a file; give a JSONL file")
    examples: list[Example] = []
    try:
        with p.open("r", encoding="utf-8") as fh:
            number = 0
            while raw := fh.readline(MAX_LINE_CHARS + 1):
                number += 1
                if len(raw) > MAX_LINE_CHARS:
                    raise DataError(
                        f"{p}, line {number}: longer than {MAX_LINE_CHARS:,} characters, the most one record may have; "
                        "split or shorten it (examples are truncated to the maximum token length anyway)"
                    )
                if not raw.strip():
                    continue
                where = f"{p}, line {number}"
                try:
                    obj = json.loads(raw.rstrip("\r\n"))  # without the newline, an error points into the line
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); each line must be one JSON object") from e
                except RecursionError:
                    raise DataError(f"{where}: JSON nested too deeply; each line must be one flat JSON object") from None
                except ValueError as e:  # an integer of thousands of digits
                    raise DataError(f"{where}: invalid JSON ({str(e)[:80]}); each line must be one JSON object") from None
                ex = _parse_line(obj, where)
                examples.append(Example(ex.text, ex.prompt, ex.completion, number))
    except UnicodeDecodeError as e:
        raise DataError(f"data file {str(p)!r} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8 JSONL") from e
    except OSError as e:
        raise DataError(f"cannot read data file {str(p)!r}: {e.strerror or e}") from e
    if not examples:
        raise DataError(f"data file {str(p)!r} has no examples; it needs at least one JSON line")
    return examples


def ensure_pad_token(tokenizer: Any) -> None:
    """Use the EOS token for padding when the tokenizer has no pad token (labels mask padding anyway).

    Raises:
        DataError: the tokenizer has neither a pad nor an EOS token.
    """
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise DataError("the tokenizer has neither a pad token nor an EOS token; add a pad token to the tokenizer")
        tokenizer.pad_token = tokenizer.eos_token


def tokenize_example(ex: Example, tokenizer: Any, max_length: int) -> dict[str, list[int]]:
    """``{"input_ids", "labels"}`` for one example, right-truncated to ``max_length`` tokens.

    The tokenizer's special tokens (e.g. BOS) are added to the text or prompt; EOS is appended to
    the text or completion, so the model learns to stop. Prompt tokens get label ``-100``.
    """
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if ex.is_completion:
        prompt_ids = list(tokenizer(ex.prompt, add_special_tokens=True)["input_ids"])
        completion_ids = list(tokenizer(ex.completion, add_special_tokens=False)["input_ids"]) + eos
        ids = prompt_ids + completion_ids
        labels = [IGNORE_INDEX] * len(prompt_ids) + completion_ids
    else:
        ids = list(tokenizer(ex.text, add_special_tokens=True)["input_ids"])
        if eos and ids[-1:] != eos:  # some tokenizers append EOS themselves
            ids += eos
        labels = list(ids)
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


def tokenize_examples(
    examples: Sequence[Example], tokenizer: Any, max_length: int = 512, *, source: str = "data"
) -> list[dict[str, list[int]]]:
    """Tokenise ``examples``; drop (with a warning) those that keep no supervised token after truncation.

    Raises:
        DataError: ``max_length`` is below 2, or no example has a supervised token left.
    """
    if not is_int(max_length) or max_length < 2:
        raise DataError(f"max length must be an integer of at least 2 tokens, got {max_length!r}")
    out: list[dict[str, list[int]]] = []
    dropped: list[int] = []
    for ex in examples:
        item = tokenize_example(ex, tokenizer, max_length)
        # the first label is never predicted (no token before it): need one supervised label after position 0
        if all(x == IGNORE_INDEX for x in item["labels"][1:]) or len(item["input_ids"]) < 2:
            dropped.append(ex.line)
            continue
        out.append(item)
    if not out:
        raise DataError(f"{source}: no example keeps a completion token within max length {max_length}; raise the max length", option="max_length")
    if dropped:
        logger.warning(
            "%s: %d example(s) have no completion token within max length %d and are skipped (lines %s%s)",
            source, len(dropped), max_length, ", ".join(map(str, dropped[:5])), ", …" if len(dropped) > 5 else "",
        )
    return out


class CompletionCollator:
    """Pad a list of ``{"input_ids", "labels"}`` to the longest one (right padding).

    Returns ``input_ids`` (padded with ``pad_token_id``), ``attention_mask`` (0 on padding) and
    ``labels`` (``-100`` on padding), all ``int64 [batch, seq]``.
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = int(pad_token_id)

    def __call__(self, features: Iterable[Mapping[str, Sequence[int]]]) -> dict[str, "torch.Tensor"]:
        import torch

        feats = list(features)
        n = max(len(f["input_ids"]) for f in feats)
        ids = torch.full((len(feats), n), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(feats), n), dtype=torch.long)
        labels = torch.full((len(feats), n), IGNORE_INDEX, dtype=torch.long)
        for i, f in enumerate(feats):
            k = len(f["input_ids"])
            ids[i, :k] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            mask[i, :k] = 1
            labels[i, :k] = torch.as_tensor(f["labels"], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def load_dataset(
    path: str | os.PathLike[str], tokenizer: Any, max_length: int = 512
) -> list[dict[str, list[int]]]:
    """:func:`load_jsonl` then :func:`tokenize_examples` (the pad token is set if missing)."""
    ensure_pad_token(tokenizer)
    return tokenize_examples(load_jsonl(path), tokenizer, max_length, source=str(path))


__all__ = [
    "CompletionCollator",
    "Example",
    "IGNORE_INDEX",
    "ensure_pad_token",
    "load_dataset",
    "load_jsonl",
    "tokenize_example",
    "tokenize_examples",
]
