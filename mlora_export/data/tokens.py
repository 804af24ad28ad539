"""Tokenisation: every record kind into ``{"input_ids", "labels"}``, labels ``-100`` where nothing is learned.

- ``text``: the tokenizer's special tokens (e.g. BOS) added, EOS appended; every token learned.
- string ``prompt``/``completion``: prompt and completion tokenised apart (special tokens on the
  prompt, EOS appended to the completion); the prompt's labels are ``-100``.
- conversations: the whole conversation rendered by the chat template (:mod:`.chat`) and
  tokenised as ``apply_chat_template`` tokenises it (no special tokens added: the template writes
  them); labels on the trained assistant turns only (those of the completion for conversational
  prompt-completion), end-of-turn included: from the template's ``{% generation %}`` markers where
  it has them, else from the turns' character spans, a token learned when it overlaps a span
  (transformers' rule for the markers).

``train_on_prompt`` learns every token of a record instead. Records are right-truncated to
``max_length`` tokens; one left with no learned token is dropped with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import DataError
from ..validate import is_int
from .chat import assistant_turns, has_generation_markers, render, render_with_spans, resolve_template
from .records import Example

if TYPE_CHECKING:
    from .sources import Records

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


def ensure_pad_token(tokenizer: Any) -> None:
    """Use the EOS token for padding when the tokenizer has no pad token (labels mask padding anyway).

    Raises:
        DataError: the tokenizer has neither a pad nor an EOS token.
    """
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise DataError("the tokenizer has neither a pad token nor an EOS token; add a pad token to the tokenizer")
        tokenizer.pad_token = tokenizer.eos_token


@dataclass(frozen=True)
class ConversationTokens:
    """A tokenised conversation: ``input_ids``, ``mask`` (the tokens of the trained assistant
    turns), ``turns`` (each trained turn's token range ``[start, end)``) and how the mask was found
    (``markers``, ``prefix`` or ``in-context``)."""

    input_ids: list[int]
    mask: list[bool]
    turns: tuple[tuple[int, int], ...]
    method: str


def _offsets(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]] | None]:
    """Token ids of ``text`` as ``apply_chat_template`` makes them, and each token's character span
    (``None`` for a tokenizer without offsets)."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError):  # a Python ("slow") tokenizer has no offsets
        return list(tokenizer(text, add_special_tokens=False)["input_ids"]), None
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]  # type: ignore[misc]


def _token_ranges(tokenizer: Any, ex: Example, text: str, ids: list[int], offsets: list[tuple[int, int]] | None,
                  spans: Sequence[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Token ranges of character ``spans``: the tokens overlapping each span. Without offsets, the
    token prefixes of ``text[:start]`` and ``text[:end]`` must be prefixes of ``ids``."""
    out = []
    for start, end in spans:
        if offsets is not None:
            hit = [t for t, (a, b) in enumerate(offsets) if b > start and a < end]
            if hit:
                out.append((hit[0], hit[-1] + 1))
            continue
        bounds = []
        for c in (start, end):
            head = list(tokenizer(text[:c], add_special_tokens=False)["input_ids"])
            if ids[: len(head)] != head:
                raise DataError(f"{ex.where or 'record'}: this tokenizer merges tokens across an assistant turn's edge and gives no "
                                "character offsets to place it; use the model's fast tokenizer (tokenizer.json)")
            bounds.append(len(head))
        if bounds[1] > bounds[0]:
            out.append((bounds[0], bounds[1]))
    return tuple(out)


def _by_markers(tokenizer: Any, ex: Example, template: str) -> ConversationTokens:
    """The template's own ``{% generation %}`` spans (``return_assistant_tokens_mask``), kept to the
    completion's turns for conversational prompt-completion."""
    messages = ex.messages or ()
    try:
        out = tokenizer.apply_chat_template(
            [dict(m) for m in messages], tools=list(ex.tools) if ex.tools else None, chat_template=template, tokenize=True,
            return_dict=True, return_assistant_tokens_mask=True, tokenizer_kwargs={"return_offsets_mapping": True},
            **dict(ex.template_kwargs or {}),
        )
    except Exception as e:  # the template's error, reported for the record
        from .chat import template_error_types

        if not isinstance(e, template_error_types()):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise DataError(f"{ex.where or 'record'}: the chat template cannot render this conversation ({first})") from e
    ids = list(out["input_ids"])
    mask = [bool(m) for m in out["assistant_masks"]]
    if ex.prompt_turns:
        boundary = len(render(tokenizer, messages[: ex.prompt_turns], template, ex, add_generation_prompt=True))
        offsets = out.get("offset_mapping")
        if offsets is None:
            raise DataError(f"{ex.where or 'record'}: a template with generation markers needs the model's fast tokenizer (tokenizer.json)")
        mask = [m and b > boundary for m, (_, b) in zip(mask, offsets)]
    if not any(mask):
        raise DataError(f"{ex.where or 'record'}: the chat template's {{% generation %}} markers mark no token of the assistant "
                        "turns; put them around each assistant turn (its content and end-of-turn)", option="chat_template")
    turns, t = [], 0
    while t < len(mask):
        if mask[t]:
            s = t
            while t < len(mask) and mask[t]:
                t += 1
            turns.append((s, t))
        t += 1
    return ConversationTokens(ids, mask, tuple(turns), "markers")


def tokenize_conversation(ex: Example, tokenizer: Any, template: str) -> ConversationTokens:
    """Render and tokenise a conversational record; the mask marks its trained assistant turns.

    Raises:
        DataError: the template fails on the record, or the turns cannot be placed exactly.
    """
    if has_generation_markers(template):
        return _by_markers(tokenizer, ex, template)
    chat = render_with_spans(tokenizer, ex, template)
    ids, offsets = _offsets(tokenizer, chat.text)
    turns = _token_ranges(tokenizer, ex, chat.text, ids, offsets, chat.spans)
    mask = [False] * len(ids)
    for a, b in turns:
        mask[a:b] = [True] * (b - a)
    return ConversationTokens(ids, mask, turns, chat.method)


def tokenize_example(ex: Example, tokenizer: Any, max_length: int, *, train_on_prompt: bool = False,
                     chat_template: str | None = None) -> dict[str, list[int]]:
    """``{"input_ids", "labels"}`` for one example, right-truncated to ``max_length`` tokens.

    ``chat_template`` (Jinja text) renders conversational records instead of the tokenizer's own template.

    Raises:
        DataError: a conversational record without a chat template, or one the template cannot render exactly.
    """
    if ex.is_conversational:
        template = resolve_template(tokenizer, chat_template, ex.where or "data", ex.tools)
        conv = tokenize_conversation(ex, tokenizer, template)
        ids = conv.input_ids
        labels = list(ids) if train_on_prompt else [t if m else IGNORE_INDEX for t, m in zip(ids, conv.mask)]
        return {"input_ids": ids[:max_length], "labels": labels[:max_length]}
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if ex.is_completion:
        prompt_ids = list(tokenizer(ex.prompt, add_special_tokens=True)["input_ids"])
        completion_ids = list(tokenizer(ex.completion, add_special_tokens=False)["input_ids"]) + eos
        ids = prompt_ids + completion_ids
        labels = list(ids) if train_on_prompt else [IGNORE_INDEX] * len(prompt_ids) + completion_ids
    else:
        ids = list(tokenizer(ex.text, add_special_tokens=True)["input_ids"])
        if eos and ids[-1:] != eos:  # some tokenizers append EOS themselves
            ids += eos
        labels = list(ids)
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


def tokenize_examples(
    examples: Sequence[Example], tokenizer: Any, max_length: int = 512, *, source: str = "data", train_on_prompt: bool = False,
    chat_template: str | None = None,
) -> list[dict[str, list[int]]]:
    """Tokenise ``examples``; drop (with a warning) those that keep no supervised token after truncation.

    Raises:
        DataError: ``max_length`` is below 2, no example has a supervised token left, conversational
            records without a chat template (``option="chat_template"``), or a record the template
            cannot render exactly.
    """
    if not is_int(max_length) or max_length < 2:
        raise DataError(f"max length must be an integer of at least 2 tokens, got {max_length!r}")
    if any(ex.is_conversational for ex in examples[:1]):
        resolve_template(tokenizer, chat_template, source)  # no template: one error for the source, before any record
    out: list[dict[str, list[int]]] = []
    dropped: list[int] = []
    for ex in examples:
        item = tokenize_example(ex, tokenizer, max_length, train_on_prompt=train_on_prompt, chat_template=chat_template)
        # the first label is never predicted (no token before it): need one supervised label after position 0
        if all(x == IGNORE_INDEX for x in item["labels"][1:]) or len(item["input_ids"]) < 2:
            dropped.append(ex.line)
            continue
        out.append(item)
    what = "an assistant token" if examples and examples[0].is_conversational else "a completion token"
    if not out:
        raise DataError(f"{source}: no example keeps {what} within max length {max_length}; raise the max length", option="max_length")
    if dropped:
        logger.warning(
            "%s: %d example(s) have no %s within max length %d and are skipped (lines %s%s)",
            source, len(dropped), what.removeprefix("an ").removeprefix("a "), max_length, ", ".join(map(str, dropped[:5])),
            ", …" if len(dropped) > 5 else "",
        )
    return out


def tokenize_records(records: "Records", tokenizer: Any, max_length: int = 512, *, train_on_prompt: bool = False,
                     chat_template: str | None = None) -> list[dict[str, list[int]]]:
    """Tokenise records read by :func:`~.sources.read_records` for training (the pad token is set if missing).

    ``chat_template`` is Jinja text (:func:`~.chat.read_chat_template` reads a file) that replaces the
    tokenizer's template; ``train_on_prompt`` learns every token instead of the assistant turns or completion.

    Raises:
        DataError: see :func:`tokenize_examples`.
    """
    ensure_pad_token(tokenizer)
    return tokenize_examples(records.examples, tokenizer, max_length, source=records.source, train_on_prompt=train_on_prompt,
                             chat_template=chat_template)


__all__ = [
    "IGNORE_INDEX", "ConversationTokens", "assistant_turns", "ensure_pad_token", "tokenize_conversation", "tokenize_example",
    "tokenize_examples", "tokenize_records",
]
