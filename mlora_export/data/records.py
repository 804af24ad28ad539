"""Record kinds: what one record (a JSONL line, a JSON array item, a table row) may hold, validated into an :class:`Example`.

Four kinds, told apart by their keys (no flag), one kind per file:

- ``{"text": "..."}``: language modelling, loss on every token;
- ``{"prompt": "...", "completion": "..."}``: loss on the completion only;
- ``{"messages": [{"role": ..., "content": ...}, ...]}``: a conversation (TRL's conversational
  language-modelling format; ``conversations`` with ``from``/``value`` keys is read as TRL reads it);
  loss on every assistant turn;
- ``{"prompt": [messages], "completion": [messages]}``: TRL's conversational prompt-completion;
  loss on the assistant turns of the completion.

Messages keep every key they have (``tool_calls``, ``name``, ``reasoning_content``…) for the chat
template to render; keys whose value is ``null`` are dropped, as transformers drops them. A record
may also carry ``tools`` (JSON schemas, or a JSON string of them) and ``chat_template_kwargs``, as
TRL reads them. Other keys are ignored.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import DataError
from ..io.jsonio import JsonFault, loads

KIND_TEXT = "text"
KIND_PROMPT_COMPLETION = "prompt-completion"
KIND_MESSAGES = "messages"
KIND_CHAT_PROMPT_COMPLETION = "conversational-prompt-completion"
#: Every record kind, in the order the documentation lists them.
KINDS: tuple[str, ...] = (KIND_TEXT, KIND_PROMPT_COMPLETION, KIND_MESSAGES, KIND_CHAT_PROMPT_COMPLETION)
#: The kinds rendered with a chat template.
CONVERSATIONAL_KINDS: tuple[str, ...] = (KIND_MESSAGES, KIND_CHAT_PROMPT_COMPLETION)

#: Message roles a conversation may use (OpenAI's and TRL's; ``developer`` is OpenAI's newer ``system``).
ROLES: tuple[str, ...] = ("system", "developer", "user", "assistant", "tool")
ASSISTANT = "assistant"

#: What a record of each kind looks like, for messages that say what was expected.
_EXPECTED = ('a "text" key, "prompt" and "completion" keys (strings, or lists of messages), '
             'or a "messages" list of {"role", "content"} objects')

_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class Example:
    """One validated record.

    ``text`` for plain language modelling; ``prompt`` + ``completion`` (strings) for completion-only
    data; ``messages`` for a conversation, where ``prompt_turns`` (conversational prompt-completion
    only) is how many of the messages are the prompt. ``line`` is the record's 1-based number in
    its file (line, item or row) and ``where`` names it in messages ("train.jsonl, line 3").
    """

    text: str | None = None
    prompt: str | None = None
    completion: str | None = None
    line: int = 0
    messages: tuple[dict[str, Any], ...] | None = None
    prompt_turns: int | None = None
    tools: tuple[dict[str, Any], ...] | None = None
    template_kwargs: Mapping[str, Any] | None = None
    where: str = field(default="", compare=False)

    @property
    def kind(self) -> str:
        """One of :data:`KINDS`."""
        if self.messages is not None:
            return KIND_MESSAGES if self.prompt_turns is None else KIND_CHAT_PROMPT_COMPLETION
        return KIND_PROMPT_COMPLETION if self.completion is not None else KIND_TEXT

    @property
    def is_completion(self) -> bool:
        """A string prompt-completion record (loss on the completion only)."""
        return self.completion is not None

    @property
    def is_conversational(self) -> bool:
        """A record rendered with the chat template (``messages`` or conversational prompt-completion)."""
        return self.messages is not None

    @property
    def trained_from(self) -> int:
        """Index of the first message whose assistant turns are trained (0, or the prompt's length)."""
        return self.prompt_turns or 0

    def located(self, where: str, line: int) -> "Example":
        """A copy that knows where it was read."""
        return Example(self.text, self.prompt, self.completion, line, self.messages, self.prompt_turns, self.tools,
                       self.template_kwargs, where)


def _type_name(value: Any) -> str:
    return "null" if value is None else {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
                                         int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def find_surrogate(value: Any, path: str = "") -> str | None:
    """The key path of the first string in ``value`` (keys included) holding a lone UTF-16 surrogate
    (``"\\ud800"`` escaped in JSON without its pair), or ``None``. Such a string is not Unicode text:
    no tokenizer can encode it."""
    if isinstance(value, str):
        return path or "the record" if _SURROGATE.search(value) else None
    if isinstance(value, Mapping):
        for k, v in value.items():
            here = f"{path}.{k}" if path else str(k)
            if isinstance(k, str) and _SURROGATE.search(k):
                return here
            found = find_surrogate(v, here)
            if found:
                return found
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            found = find_surrogate(v, f"{path}[{i}]")
            if found:
                return found
    return None


def _message(obj: Any, where: str, key: str, index: int) -> dict[str, Any]:
    """One validated message: a role of :data:`ROLES`, string content (an assistant turn with
    ``tool_calls`` may have none); ``null`` values dropped, every other key kept."""
    at = f"{where}: {key}[{index}]"
    if not isinstance(obj, Mapping):
        raise DataError(f"{at} is {_type_name(obj)}; each message must be an object like {{\"role\": \"user\", \"content\": \"...\"}}")
    msg = {k: v for k, v in obj.items() if v is not None}
    role = msg.get("role")
    if role is None:
        raise DataError(f"{at} has no \"role\"; give each message a role ({', '.join(ROLES)}) and a \"content\"")
    if not isinstance(role, str) or role not in ROLES:
        shown = role if isinstance(role, str) else _type_name(role)
        hint = " (ShareGPT's human/gpt: rename them to user/assistant)" if shown in ("human", "gpt", "bot", "model") else ""
        raise DataError(f"{at} has the unknown role {str(shown)[:40]!r}; expected one of {', '.join(ROLES)}{hint}")
    content = msg.get("content")
    if content is None:
        calls = msg.get("tool_calls")
        if not (role == ASSISTANT and isinstance(calls, list) and calls):
            raise DataError(f"{at} ({role}) has no \"content\"; every message needs string content (an assistant turn may "
                            "have \"tool_calls\" instead)")
    elif not isinstance(content, str):
        raise DataError(f"{at} ({role}): \"content\" must be a string, found {_type_name(content)}; "
                        "give the text of the message as one string")
    if "tool_calls" in msg and not isinstance(msg["tool_calls"], list):
        raise DataError(f"{at} ({role}): \"tool_calls\" must be a list, found {_type_name(msg['tool_calls'])}")
    return msg


def _messages(value: Any, where: str, key: str) -> tuple[dict[str, Any], ...]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: {key!r} must be a non-empty list of messages, found "
                        f"{'an empty list' if isinstance(value, list) else _type_name(value)}")
    return tuple(_message(m, where, key, i) for i, m in enumerate(value))


def _sharegpt(value: Any) -> Any:
    """TRL's reading of ``conversations``: ``from`` → ``role``, ``value`` → ``content`` in each message."""
    if not isinstance(value, list):
        return value
    out = []
    for m in value:
        if isinstance(m, Mapping) and ("from" in m or "value" in m):
            m = {("role" if k == "from" else "content" if k == "value" else k): v for k, v in m.items()}
        out.append(m)
    return out


def _tools(obj: Mapping[str, Any], where: str) -> tuple[dict[str, Any], ...] | None:
    tools = obj.get("tools")
    if tools is None:
        return None
    if isinstance(tools, str):  # TRL accepts the JSON text of the list (a string column)
        try:
            tools = loads(tools)
        except JsonFault:
            raise DataError(f"{where}: \"tools\" is a string but not JSON; give a list of tool schemas") from None
    if not isinstance(tools, list) or not all(isinstance(t, Mapping) for t in tools):
        raise DataError(f"{where}: \"tools\" must be a list of tool schemas (objects), found {_type_name(tools)}")
    return tuple(dict(t) for t in tools) or None


def _template_kwargs(obj: Mapping[str, Any], where: str) -> Mapping[str, Any] | None:
    kwargs = obj.get("chat_template_kwargs")
    if kwargs is None:
        return None
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise DataError(f"{where}: \"chat_template_kwargs\" must be an object, found {_type_name(kwargs)}")
    return dict(kwargs)


def _check_conversation(messages: Sequence[dict[str, Any]], where: str, key: str, first_trained: int) -> None:
    """A conversation the template can render turn by turn: it does not open with an assistant
    turn (there would be no prompt to generate it from), and it has an assistant turn to learn."""
    if messages[0]["role"] == ASSISTANT:
        raise DataError(f"{where}: {key} opens with an assistant turn; put a system or user message before it "
                        "(an assistant turn is learned from the conversation before it)")
    if not any(m["role"] == ASSISTANT for m in messages[first_trained:]):
        part = "the completion" if first_trained else "the conversation"
        raise DataError(f"{where}: {part} has no assistant turn, so there is nothing to learn; "
                        f"roles found: {', '.join(dict.fromkeys(m['role'] for m in messages[first_trained:]))}")


def parse_record(obj: Any, where: str) -> Example:
    """Validate one record (a parsed JSON object or a table row) and return its :class:`Example`.

    Raises:
        DataError: ``where`` (file and line) first, then what is wrong and what to do: not an
            object, keys of no kind or of two kinds, a missing or mistyped field, an unknown role,
            a conversation without an assistant turn, a string with a lone surrogate.
    """
    if not isinstance(obj, Mapping):
        raise DataError(f"{where}: expected a JSON object with {_EXPECTED}, found {_type_name(obj)}")
    bad = find_surrogate(obj)
    if bad:
        raise DataError(f"{where}: {bad} holds a lone surrogate (a \\ud800-\\udfff escape without its pair), which is not "
                        "Unicode text; fix the escape or re-export the file as UTF-8")
    has_chat = "messages" in obj or "conversations" in obj
    has_pc = "prompt" in obj or "completion" in obj
    if "messages" in obj and "conversations" in obj:
        raise DataError(f"{where}: has both \"messages\" and \"conversations\"; keep one list of messages per record")
    if has_chat and (has_pc or "text" in obj):
        other = "\"prompt\"/\"completion\"" if has_pc else "\"text\""
        raise DataError(f"{where}: has \"messages\" and {other}, keys of two record kinds; keep the keys of one kind "
                        "(with a dataset, pick the columns with a column mapping such as messages=messages)")
    if has_chat:
        key = "messages" if "messages" in obj else "conversations"
        value = obj[key] if key == "messages" else _sharegpt(obj[key])
        messages = _messages(value, where, key)
        _check_conversation(messages, where, key, 0)
        return Example(messages=messages, tools=_tools(obj, where), template_kwargs=_template_kwargs(obj, where))
    if has_pc:
        missing = [k for k in ("prompt", "completion") if k not in obj]
        if missing:
            raise DataError(f"{where}: has {'prompt' if 'prompt' in obj else 'completion'} but no {missing[0]!r}; give both \"prompt\" and \"completion\"")
        prompt, completion = obj["prompt"], obj["completion"]
        if isinstance(prompt, list) or isinstance(completion, list):
            return _chat_prompt_completion(obj, prompt, completion, where)
        for key, value in (("prompt", prompt), ("completion", completion)):
            if not isinstance(value, str):
                raise DataError(f"{where}: {key!r} must be a string (or both must be lists of messages), found {_type_name(value)}")
        if not completion:
            raise DataError(f"{where}: 'completion' is empty; there is nothing to learn from this line")
        return Example(prompt=prompt, completion=completion)
    if "text" in obj:
        text = obj["text"]
        if not isinstance(text, str):
            raise DataError(f"{where}: 'text' must be a string, found {_type_name(text)}")
        if not text:
            raise DataError(f"{where}: 'text' is empty")
        return Example(text=text)
    keys = ", ".join(repr(k) for k in list(obj)[:5]) or "none"
    raise DataError(f"{where}: expected {_EXPECTED}, found keys {keys}")


def _chat_prompt_completion(obj: Mapping[str, Any], prompt: Any, completion: Any, where: str) -> Example:
    """TRL's conversational prompt-completion: two lists of messages; the completion opens with
    the assistant turn that answers the prompt."""
    if not (isinstance(prompt, list) and isinstance(completion, list)):
        raise DataError(f"{where}: \"prompt\" is {_type_name(prompt)} and \"completion\" is {_type_name(completion)}; "
                        "give both as strings, or both as lists of messages")
    p = _messages(prompt, where, "prompt")
    c = _messages(completion, where, "completion")
    if p[-1]["role"] == ASSISTANT:
        raise DataError(f"{where}: the prompt ends with an assistant turn; end it with the user (or tool) message the "
                        "completion answers, and put the assistant turn in the completion")
    if c[0]["role"] != ASSISTANT:
        raise DataError(f"{where}: the completion opens with a {c[0]['role']} message; it must open with the assistant turn "
                        "that answers the prompt")
    messages = p + c
    _check_conversation(messages, where, "prompt", len(p))
    return Example(messages=messages, prompt_turns=len(p), tools=_tools(obj, where), template_kwargs=_template_kwargs(obj, where))


def check_one_kind(examples: Sequence[Example], source: str) -> str:
    """The kind shared by every example; a source that mixes kinds is refused (train and eval alike).

    Raises:
        DataError: naming the first record of another kind than the first one.
    """
    kind = examples[0].kind
    for ex in examples:
        if ex.kind != kind:
            first = examples[0].where or f"{source}, record {examples[0].line}"
            here = ex.where or f"{source}, record {ex.line}"
            raise DataError(f"{here}: a {ex.kind} record, but {first} is a {kind} record; "
                            "a data file holds one kind of record: split it into one file per kind")
    return kind


__all__ = [
    "ASSISTANT", "CONVERSATIONAL_KINDS", "KINDS", "KIND_CHAT_PROMPT_COMPLETION", "KIND_MESSAGES", "KIND_PROMPT_COMPLETION",
    "KIND_TEXT", "ROLES", "Example", "check_one_kind", "find_surrogate", "parse_record",
]
