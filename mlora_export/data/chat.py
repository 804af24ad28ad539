"""Chat rendering with the tokenizer's own template, and where the trained assistant turns lie in it.

A conversation is rendered once, whole, with ``tokenizer.apply_chat_template`` (as TRL renders it);
the loss goes on the characters of every trained assistant turn of that rendering, end-of-turn
token included, so the model learns to stop. Which characters those are is computed on the
rendered conversation itself:

- a template with ``{% generation %}`` markers says so itself (``return_assistant_tokens_mask``,
  used by :mod:`.tokens`);
- otherwise by **rendering prefixes**: turn ``i`` starts where the conversation before it,
  rendered with the generation prompt, ends (``S_i``), and ends where the conversation through it
  ends (``E_i``). Both must be prefixes of the whole rendering;
- where ``E_i`` is not (a template that renders a turn differently once later turns follow, e.g.
  Qwen3 dropping the ``<think>`` part of earlier turns), **in context**: the end of the turn's
  content in the whole rendering is found by appending a probe character to the content and
  seeing where it appears, and the turn ends after the text that follows the content in ``E_i``
  (its end-of-turn), which must follow it in the whole rendering too.

Anything else (the conversation before a turn rendered differently than it is with the
generation prompt, a content rendered twice or transformed) is refused, naming the record and
pointing at a template with generation markers.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..io.jsonio import JsonFault, loads
from .records import ASSISTANT, Example

#: Two characters from Unicode's private use area, appended to an assistant turn's content to
#: find where the content ends in a rendering (two, so that one that happens to follow it is told apart).
_PROBES = ("\ue000", "\ue001")
_MARKERS = re.compile(r"\{%-?\s*generation\s*-?%\}")
#: The most bytes a chat template file may have.
MAX_TEMPLATE_BYTES = 1 << 20


def has_generation_markers(template: str) -> bool:
    """Whether ``template`` has ``{% generation %}`` markers (whitespace-trim variants included), as TRL checks."""
    return _MARKERS.search(template) is not None


def read_chat_template(path: str | os.PathLike[str]) -> str:
    """The chat template in ``path``: a Jinja file, or a ``chat_template.json`` (``{"chat_template": "..."}``).

    Raises:
        DataError: the file is missing, not a regular file, too large, not UTF-8, empty, or a JSON
            file without a ``chat_template`` string.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"chat template {str(p)!r} {'is not a file' if p.exists() else 'does not exist'}; give a Jinja file",
                        path=p, option="chat_template")
    if p.stat().st_size > MAX_TEMPLATE_BYTES:
        raise DataError(f"chat template {str(p)!r} has {p.stat().st_size:,} bytes, more than a template may have", path=p, option="chat_template")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"chat template {str(p)!r} is not UTF-8 text ({e.reason} at byte {e.start})", path=p, option="chat_template") from e
    if p.suffix.lower() == ".json":
        try:
            obj = loads(text)
        except JsonFault:
            obj = None
        found = obj.get("chat_template") if isinstance(obj, dict) else None
        if not isinstance(found, str):
            raise DataError(f"chat template {str(p)!r}: a .json template file must be an object with a \"chat_template\" string "
                            "(as transformers saves it); or give the Jinja text in a .jinja file", path=p, option="chat_template")
        text = found
    if not text.strip():
        raise DataError(f"chat template {str(p)!r} is empty", path=p, option="chat_template")
    return text


def resolve_template(tokenizer: Any, override: str | None, source: str, tools: Sequence[Mapping[str, Any]] | None = None) -> str:
    """The Jinja text that renders conversations: ``override``, else the tokenizer's own template
    (the ``tool_use`` variant of a named set when the record has tools, as transformers picks it).

    Raises:
        DataError: neither is there (``option="chat_template"``: the CLI names ``--chat-template FILE``).
    """
    if override is not None:
        return override
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, str) and own.strip():
        return own
    if isinstance(own, Mapping) and own:
        if tools and "tool_use" in own:
            return str(own["tool_use"])
        if "default" in own:
            return str(own["default"])
    name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
    raise DataError(
        f"{source}: conversational records are rendered with a chat template, and the tokenizer of {str(name)!r} has none; "
        "supply one (a Jinja file like the model family's chat_template.jinja)",
        option="chat_template",
    )


def template_error_types() -> tuple[type[BaseException], ...]:
    """What a chat template raises on a conversation it cannot render (its own ``raise_exception`` included)."""
    from jinja2.exceptions import TemplateError

    return (TemplateError, TypeError, ValueError, KeyError, AttributeError, IndexError)


def render(tokenizer: Any, messages: Sequence[Mapping[str, Any]], template: str, ex: Example, *,
           add_generation_prompt: bool = False) -> str:
    """``messages`` rendered by ``template`` (text, not tokens), with the record's tools and template arguments.

    Raises:
        DataError: the template fails on this conversation (its own ``raise_exception`` included),
            naming the record.
    """
    try:
        out = tokenizer.apply_chat_template(
            [dict(m) for m in messages], tools=list(ex.tools) if ex.tools else None, chat_template=template, tokenize=False,
            add_generation_prompt=add_generation_prompt, **dict(ex.template_kwargs or {}),
        )
    except template_error_types() as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise DataError(f"{ex.where or 'record'}: the chat template cannot render this conversation ({first}); "
                        "fix the record or supply a template that renders it") from e
    if not isinstance(out, str):
        raise DataError(f"{ex.where or 'record'}: the chat template did not render text (got {type(out).__name__})")
    return out


def assistant_turns(ex: Example) -> list[int]:
    """Indices of the trained assistant turns of a conversational record (those of its completion
    for conversational prompt-completion)."""
    return [i for i, m in enumerate(ex.messages or ()) if i >= ex.trained_from and m["role"] == ASSISTANT]


@dataclass(frozen=True)
class RenderedChat:
    """A conversation rendered whole, and the character spans ``[start, end)`` of its trained
    assistant turns, in order. ``method`` says how they were found: ``prefix`` (every turn by
    prefix rendering) or ``in-context`` (at least one turn needed the in-context rule)."""

    text: str
    spans: tuple[tuple[int, int], ...]
    method: str


def _insertion_point(plain: str, probed: Sequence[str]) -> int | None:
    """Where one probe character was inserted into ``plain`` to give each of ``probed`` (the same
    point for all), or ``None`` when the probes changed anything else."""
    points = []
    for text, _probe in zip(probed, _PROBES):
        if len(text) != len(plain) + 1:
            return None
        n = 0
        for a, b in zip(plain, text):
            if a != b:
                break
            n += 1
        points.append(n)
    p = min(points)
    if all(text == plain[:p] + probe + plain[p:] for text, probe in zip(probed, _PROBES)):
        return p
    return None


def _content_end(tokenizer: Any, messages: Sequence[Mapping[str, Any]], i: int, template: str, ex: Example, plain: str) -> int | None:
    """Where assistant turn ``i``'s content ends in ``plain`` (the rendering of ``messages``), found
    by appending a probe character to it; ``None`` when the content is not a string rendered once, verbatim at its end."""
    content = messages[i].get("content")
    if not isinstance(content, str):
        return None
    probed = []
    for probe in _PROBES:
        altered = [dict(m) for m in messages]
        altered[i]["content"] = content + probe
        probed.append(render(tokenizer, altered, template, ex))
    return _insertion_point(plain, probed)


def _refuse_context(ex: Example, i: int, what: str) -> DataError:
    n = assistant_turns(ex).index(i) + 1
    return DataError(
        f"{ex.where or 'record'}: the chat template renders {what} (assistant turn {n}, message {i + 1}), so its loss mask "
        "cannot be computed from the rendering; supply a chat template with {% generation %} markers around each assistant turn",
        option="chat_template",
    )


def render_with_spans(tokenizer: Any, ex: Example, template: str) -> RenderedChat:
    """Render a conversational record whole and find its trained assistant turns (prefix rendering,
    the in-context rule where a turn renders differently once later turns follow).

    Raises:
        DataError: the template fails on the record, or a turn's place cannot be found exactly.
    """
    messages = ex.messages or ()
    full = render(tokenizer, messages, template, ex)
    spans: list[tuple[int, int]] = []
    method = "prefix"
    for i in assistant_turns(ex):
        before = render(tokenizer, messages[:i], template, ex, add_generation_prompt=True)
        if not full.startswith(before):
            raise _refuse_context(ex, i, "the conversation before this turn differently with the generation prompt than inside the whole conversation")
        start = len(before)
        through = full if i == len(messages) - 1 else render(tokenizer, messages[: i + 1], template, ex)
        if full.startswith(through) and len(through) >= start:
            end = len(through)
        else:
            method = "in-context"
            end_here = _content_end(tokenizer, messages, i, template, ex, full)
            end_alone = _content_end(tokenizer, messages[: i + 1], i, template, ex, through)
            if end_here is None or end_alone is None or end_here < start:
                raise _refuse_context(ex, i, "this turn differently once later turns follow, and not with its content verbatim")
            tail = through[end_alone:]
            if not full.startswith(tail, end_here):
                raise _refuse_context(ex, i, "this turn's end differently once later turns follow")
            end = end_here + len(tail)
        if spans and start < spans[-1][1]:
            raise _refuse_context(ex, i, "turns that overlap")
        if end <= start:
            raise _refuse_context(ex, i, "this turn as nothing")
        spans.append((start, end))
    return RenderedChat(full, tuple(spans), method)


def generation_prompt(tokenizer: Any, ex: Example, template: str) -> tuple[str, int]:
    """``(text, index)``: the conversation up to its last trained assistant turn, rendered with the
    generation prompt (what a model answers at inference), and that turn's index."""
    last = assistant_turns(ex)[-1]
    return render(tokenizer, (ex.messages or ())[:last], template, ex, add_generation_prompt=True), last


__all__ = [
    "MAX_TEMPLATE_BYTES", "RenderedChat", "assistant_turns", "generation_prompt", "has_generation_markers", "read_chat_template",
    "render", "render_with_spans", "resolve_template",
]
