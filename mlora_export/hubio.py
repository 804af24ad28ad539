"""Reading models and datasets from the Hub, the parts shared by :mod:`.base.hub` and :mod:`.data.sources`:
what counts as a Hub id, the endpoint as shown in messages (credentials redacted), the login hint,
and the errors that mean the Hub could not be reached.

The endpoint, token, offline mode and cache are the Hub client's own (``HF_ENDPOINT``,
``HF_TOKEN`` or the login, ``HF_HUB_OFFLINE``, ``HF_HOME``), as transformers and datasets use them.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

#: ``namespace/name`` as the Hub spells repo ids (letters, digits, ``-``, ``_``, ``.``; at most 96 each).
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
#: Names that are local file names, never Hub ids (a typo in a path must not reach the network).
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".tsv", ".txt", ".arrow", ".safetensors", ".gguf", ".bin")


def is_hub_id(spec: str) -> bool:
    """Whether ``spec`` reads as a Hub repo id ``namespace/name``: one slash, no leading ``.``,
    ``/`` or ``~``, no ``..`` or ``--``, and no file suffix such as ``.jsonl`` (a path, then)."""
    return (bool(_REPO_ID.fullmatch(spec)) and not spec.lower().endswith(LOCAL_SUFFIXES)
            and ".." not in spec and "--" not in spec and not spec.endswith("."))


def redact_endpoint(url: str) -> str:
    """``url`` without the ``user:password@`` part (an endpoint with credentials is never shown)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "the configured endpoint"
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def endpoint() -> str:
    """The Hub client's endpoint (``HF_ENDPOINT`` as it read it), redacted for messages."""
    from huggingface_hub import constants

    return redact_endpoint(constants.ENDPOINT)


def login_hint() -> str:
    return "log in with `hf auth login` or set HF_TOKEN"


def has_token(token: str | None) -> bool:
    """Whether a token is sent: ``token``, else the client's lookup (``HF_TOKEN``, the login)."""
    if token:
        return True
    from huggingface_hub import get_token

    return get_token() is not None


def transport_errors() -> tuple[type[BaseException], ...]:
    """The exception types of a Hub that cannot be reached (connection refused, timeouts), for the installed HTTP client."""
    errs: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for mod in ("httpx2", "httpx", "requests"):
        try:
            m = __import__(mod)
        except ImportError:
            continue
        for name in ("TransportError", "ConnectionError", "Timeout"):
            cls = getattr(m, name, None)
            if isinstance(cls, type) and issubclass(cls, BaseException):
                errs.append(cls)
    return tuple(errs)


@contextmanager
def quiet_hub_bars() -> Iterator[None]:
    """The Hub client's download bars off within the block (the CLI draws its own; stderr stays one line on error)."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()


__all__ = ["LOCAL_SUFFIXES", "endpoint", "has_token", "is_hub_id", "login_hint", "quiet_hub_bars", "redact_endpoint", "transport_errors"]
