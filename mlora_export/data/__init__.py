"""Training and evaluation data: one reader and one tokeniser for ``train``, ``eval``, the Python API
and the reproduction harness (docs/design.md §5).

- :mod:`.records`: the record kinds (``text``, string ``prompt``/``completion``, ``messages``,
  conversational ``prompt``/``completion``), validated into :class:`Example`; one kind per source;
- :mod:`.files`: local ``.jsonl``/``.json``/``.parquet`` files, read strictly (a duplicate key, a
  lone surrogate, a malformed record: a :class:`~mlora_export.errors.DataError` naming the line);
- :mod:`.sources`: :func:`read_records`, a local file or a Hub dataset id (``datasets``), with
  split, config and a column mapping;
- :mod:`.chat`: rendering with the tokenizer's chat template and where the assistant turns lie;
- :mod:`.tokens`: ``{"input_ids", "labels"}`` per record (labels ``-100`` where nothing is learned);
- :mod:`.collate`: :class:`CompletionCollator`.

Typical use::

    records = read_records("train.jsonl")            # or DataSource("org/name", split="train")
    features = tokenize_records(records, tokenizer, max_length=1024)
"""

from __future__ import annotations

from .chat import has_generation_markers, read_chat_template, render_with_spans, resolve_template
from .collate import CompletionCollator
from .files import MAX_LINE_CHARS, load_jsonl, read_file_records
from .records import CONVERSATIONAL_KINDS, KINDS, ROLES, Example, check_one_kind, parse_record
from .sources import COLUMN_TARGETS, DataSource, Records, as_source, parse_columns, read_records
from .tokens import (
    IGNORE_INDEX,
    ConversationTokens,
    ensure_pad_token,
    tokenize_conversation,
    tokenize_example,
    tokenize_examples,
    tokenize_records,
)


def load_dataset(path: "str | DataSource", tokenizer: object, max_length: int = 512, *, train_on_prompt: bool = False,
                 chat_template: str | None = None) -> list[dict[str, list[int]]]:
    """:func:`read_records` then :func:`tokenize_records` (the pad token is set if missing)."""
    return tokenize_records(read_records(path), tokenizer, max_length, train_on_prompt=train_on_prompt, chat_template=chat_template)


__all__ = [
    "COLUMN_TARGETS", "CONVERSATIONAL_KINDS", "IGNORE_INDEX", "KINDS", "MAX_LINE_CHARS", "ROLES", "CompletionCollator", "as_source",
    "ConversationTokens", "DataSource", "Example", "Records", "check_one_kind", "ensure_pad_token", "has_generation_markers",
    "load_dataset", "load_jsonl", "parse_columns", "parse_record", "read_chat_template", "read_file_records", "read_records",
    "render_with_spans", "resolve_template", "tokenize_conversation", "tokenize_example", "tokenize_examples", "tokenize_records",
]
