"""The evaluation data: read and tokenised as training reads it (:mod:`mlora_export.data`), fingerprinted.

Every record kind evaluates:

- ``text``: every predicted token is scored;
- string ``prompt``/``completion``: the completion tokens (and EOS) are scored; exact match
  generates from the prompt and compares with the completion;
- conversations (``messages``, conversational prompt-completion): the tokens of the trained
  assistant turns (end-of-turn included) are scored, exactly the tokens training learns; exact
  match generates after the template's generation prompt for the conversation up to its last
  assistant turn and compares with that turn's content. Generation stops at the template's
  end-of-turn token (besides the tokenizer's and the model's EOS).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data import DataSource, Records, read_records
from ..errors import DataError

logger = logging.getLogger(__name__)


# -- data --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalExample:
    """One tokenised record: ``input_ids`` and which positions are scored.

    Positions ``first_target …`` are scored, or, where ``scored`` is given (conversations), the
    positions it marks. ``completion`` is the reference of exact match (the completion, or the
    last assistant turn's content), generated from ``generation_prompt`` (default: the tokens
    before ``first_target``) with a budget of ``completion_tokens`` by default.
    """

    input_ids: tuple[int, ...]
    first_target: int
    prompt: str | None = None
    completion: str | None = None
    #: tokens of the completion without the appended EOS, or of the last assistant turn (the default generation budget)
    completion_tokens: int = 0
    scored: tuple[bool, ...] | None = None
    generation_prompt: tuple[int, ...] | None = None

    @property
    def n_targets(self) -> int:
        return sum(self.scored) if self.scored is not None else len(self.input_ids) - self.first_target

    @property
    def prompt_ids(self) -> tuple[int, ...]:
        """The tokens exact match generates from."""
        return self.generation_prompt if self.generation_prompt is not None else self.input_ids[: self.first_target]


@dataclass(frozen=True)
class EvalData:
    """A tokenised evaluation source (a local file, or a Hub dataset split).

    ``path`` is the local file (``None`` for a Hub dataset), ``source`` names it in messages and
    ``name`` in records; ``stop_ids`` are end-of-turn tokens of the chat template that end a generation.
    """

    path: Path | None
    kind: str
    examples: tuple[EvalExample, ...]
    sha256: str
    source: str = ""
    name: str = ""
    stop_ids: tuple[int, ...] = ()

    @property
    def generates(self) -> bool:
        """Whether exact match applies (a reference to generate: anything but ``text``)."""
        return self.kind != "text"

    def describe(self) -> dict[str, Any]:
        return {
            "path": str(self.path) if self.path is not None else self.source,
            "kind": self.kind,
            "examples": len(self.examples),
            "target_tokens": sum(e.n_targets for e in self.examples),
            "sha256": self.sha256,
        }


def _end_of_turn_ids(tokenizer: Any, ids: list[int], turns: tuple[tuple[int, int], ...]) -> set[int]:
    """The last token of each assistant turn that is a special or added token (the template's
    end-of-turn, e.g. ``<|im_end|>``), skipping trailing whitespace tokens."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    try:
        special |= set(tokenizer.get_added_vocab().values())
    except (AttributeError, TypeError):
        pass
    out = set()
    for a, b in turns:
        for t in reversed(ids[a:b]):
            if tokenizer.decode([t]).strip() == "":
                continue
            if t in special:
                out.add(t)
            break
    return out


def _conversation_example(rec: Any, tokenizer: Any, template: str, stops: set[int]) -> tuple[list[int], EvalExample]:
    from ..data.chat import generation_prompt
    from ..data.tokens import tokenize_conversation

    conv = tokenize_conversation(rec, tokenizer, template)
    ids = conv.input_ids
    scored = tuple(bool(m) and i > 0 for i, m in enumerate(conv.mask))
    first = next((i for i, s in enumerate(scored) if s), len(ids))
    text, last = generation_prompt(tokenizer, rec, template)
    prompt_ids = tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
    a, b = conv.turns[-1] if conv.turns else (len(ids), len(ids))
    stops |= _end_of_turn_ids(tokenizer, ids, conv.turns)
    reference = (rec.messages or ())[last].get("content") or ""
    return ids, EvalExample(tuple(ids), first, None, reference, max(1, b - a), scored, prompt_ids)


def load_eval_data(
    data: "str | os.PathLike[str] | DataSource | Records", tokenizer: Any, *, max_length: int | None = None,
    max_examples: int | None = None, chat_template: str | None = None, token: str | None = None, default_split: str = "test",
) -> EvalData:
    """Read (:func:`~mlora_export.data.read_records`) and tokenise evaluation data exactly as training does.

    ``data`` is a local file, a Hub dataset id or :class:`~mlora_export.data.DataSource` (split
    ``default_split`` unless it names one), or records already read. ``chat_template`` (Jinja text)
    replaces the tokenizer's template for conversations.

    Raises:
        DataError: bad records (named by line), a source mixing record kinds, conversations without
            a chat template, or an example longer than ``max_length`` tokens.
        HubInputError, HubError: a Hub dataset that cannot be read.
    """
    from ..data import IGNORE_INDEX, ensure_pad_token, resolve_template, tokenize_example

    records = data if isinstance(data, Records) else read_records(data, default_split=default_split, token=token, max_records=max_examples)
    examples_in = records.examples[:max_examples] if max_examples is not None else records.examples
    ensure_pad_token(tokenizer)
    template = resolve_template(tokenizer, chat_template, records.source) if examples_in[0].is_conversational else None
    examples = []
    stops: set[int] = set()
    for rec in examples_in:
        if template is not None:
            ids, ex = _conversation_example(rec, tokenizer, template, stops)
        else:
            item = tokenize_example(rec, tokenizer, 1 << 30)
            ids, labels = item["input_ids"], item["labels"]
            first = max(1, next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), len(ids)))
            n_comp = len(ids) - first - int(tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id)
            ex = EvalExample(tuple(ids), first, rec.prompt, rec.completion, max(1, n_comp))
        where = rec.where or f"{records.source}, line {rec.line}"
        if max_length is not None and len(ids) > max_length:
            raise DataError(f"{where}: {len(ids)} tokens, more than the model's {max_length} positions; shorten it", path=records.path)
        if ex.first_target >= len(ids) or ex.n_targets == 0:
            raise DataError(f"{where}: nothing to score (a text of one token or an empty completion)", path=records.path)
        examples.append(ex)
    return EvalData(records.path, records.kind, tuple(examples), records.sha256, records.source, records.name, tuple(sorted(stops)))
