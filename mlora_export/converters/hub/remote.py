"""Talking to the Hub: endpoint and token resolution, and huggingface_hub errors → one-line errors.

The token comes from ``--token``, else ``HF_TOKEN``, else the ``hf auth login`` cache (the
client's own lookup); it is passed to the client and never logged or put in a message. The
endpoint comes from ``--endpoint``, else ``HF_ENDPOINT`` (read at call time, so it works even when
set after ``huggingface_hub`` was imported), else the client's default. Credentials in an endpoint
URL (``https://user:secret@host``) are passed to the client but never shown or recorded: every
message and record names the endpoint through :func:`redact_url`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ...errors import ConfigError, HubError
from ...hubio import transport_errors
from ...urls import redact_url

if TYPE_CHECKING:
    from huggingface_hub import HfApi

logger = logging.getLogger(__name__)


def resolve_endpoint(endpoint: str | None) -> str:
    """``endpoint``, else ``$HF_ENDPOINT``, else huggingface_hub's default endpoint (no trailing slash).

    Raises:
        ConfigError: the endpoint is not an ``http://`` or ``https://`` URL.
    """
    from huggingface_hub import constants

    source = "endpoint" if endpoint else "HF_ENDPOINT" if os.environ.get("HF_ENDPOINT") else "the default endpoint"
    value = (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).strip()
    if not re.fullmatch(r"https?://[^/\s?#]+(/[^\s?#]*)?", value):
        raise ConfigError(f"{source} {redact_url(value)!r} is not an http(s) URL; give the Hub's address, e.g. https://huggingface.co",
                          option="endpoint" if endpoint else None)
    return value.rstrip("/")


def check_repo_id(repo_id: str, *, require_namespace: bool = True, option: str | None = "repo_id") -> str:
    """Validate a Hub repo id (``namespace/name``; ``name`` alone when ``require_namespace`` is false) before any I/O.

    ``option`` is the error's field naming the caller's parameter (``None`` where the id is not an option).

    Raises:
        ConfigError: not a valid Hub repo id, or no namespace where one is required.
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ConfigError(f"repo id {repo_id!r} is not a valid Hub repo id; expected namespace/name, e.g. my-org/llama-1b-gsm8k-mlora", option=option) from e
    if require_namespace and "/" not in repo_id:
        raise ConfigError(f"repo id {repo_id!r} needs a namespace: give it as namespace/name, e.g. my-org/{repo_id}", option=option)
    return repo_id


def make_api(endpoint: str | None, token: str | None) -> "HfApi":
    """An :class:`HfApi` for ``endpoint`` (see :func:`resolve_endpoint`); ``token=None`` uses the client's lookup."""
    from huggingface_hub import HfApi

    return HfApi(endpoint=resolve_endpoint(endpoint), token=token, library_name="mlora-export")


def _one_line(text: object, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _server_message(exc: Any) -> str:
    msg = getattr(exc, "server_message", None)
    return _one_line(msg) if msg else ""


@contextlib.contextmanager
def hub_errors(action: str, repo_id: str, endpoint: str, revision: str | None = None) -> Iterator[None]:
    """Turn huggingface_hub and network errors raised inside the block into :class:`HubError` (exit 1).

    ``action`` names what was being done ("push", "pull"...) for the message; ``endpoint`` is shown
    without its credentials (:func:`redact_url`), as is any URL the client's error quotes.
    """
    try:
        yield
    except HubError:
        raise
    except Exception as e:  # mapped, and its text redacted, by _hub_error
        mapped = _hub_error(e, action, repo_id, redact_url(endpoint), revision)
        if mapped is None:
            raise
        mapped.message = redact_url(mapped.message)
        mapped.args = (mapped.message,)
        raise mapped from e


def _hub_error(e: Exception, action: str, repo_id: str, endpoint: str, revision: str | None) -> HubError | None:
    """The :class:`HubError` for a huggingface_hub or network error ``e`` (``None``: not one of those)."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    login_hint = "log in with `hf auth login` or set HF_TOKEN"
    if isinstance(e, RevisionNotFoundError):
        return HubError(f"{action}: revision {revision!r} not found in {repo_id!r} on {endpoint}; check the revision (a branch, tag or commit)", option="revision")
    if isinstance(e, GatedRepoError):
        return HubError(f"{action}: {repo_id!r} on {endpoint} is gated; request access on its page, then {login_hint}", option="token")
    if isinstance(e, RepositoryNotFoundError):
        return HubError(
            f"{action}: repository {repo_id!r} not found on {endpoint}, or it is private and "
            f"{'your token cannot read it' if _has_auth(e) else 'no token was sent'}; check the repo id, or {login_hint}",
            option="token",
        )
    if isinstance(e, RemoteEntryNotFoundError):
        return HubError(f"{action}: a file is missing in {repo_id!r} on {endpoint} ({_server_message(e) or 'entry not found'}); the bundle there is incomplete")
    if isinstance(e, HfHubHTTPError):
        status = e.response.status_code if getattr(e, "response", None) is not None else None
        server = _server_message(e)
        if status == 401 and not _has_auth(e):
            return HubError(f"{action}: the Hub at {endpoint} needs a token for this (401{': ' + server if server else ''}); {login_hint}", option="token")
        if status == 401:
            return HubError(f"{action}: the Hub at {endpoint} rejected the token (401{': ' + server if server else ''}); it is invalid or expired: {login_hint}", option="token")
        if status == 403:
            return HubError(
                f"{action}: permission denied for {repo_id!r} on {endpoint} (403{': ' + server if server else ''}); "
                "use a token with write access to that namespace"
            )
        return HubError(f"{action}: the Hub at {endpoint} answered HTTP {status} for {repo_id!r}{': ' + server if server else ''}")
    if isinstance(e, (OfflineModeIsEnabled, LocalEntryNotFoundError)):
        return HubError(f"{action}: cannot reach the Hub at {endpoint} ({_one_line(e, 160)}); check the network, HF_HUB_OFFLINE and the endpoint", option="endpoint")
    if isinstance(e, transport_errors()):
        return HubError(f"{action}: cannot reach the Hub at {endpoint} ({type(e).__name__}: {_one_line(e, 160)}); check the network and the endpoint", option="endpoint")
    # huggingface_hub wraps LFS upload failures: RuntimeError("Error while uploading 'x' to the Hub.") from cause
    if isinstance(e, RuntimeError) and "uploading" in str(e) and e.__cause__ is not None:
        return HubError(f"{action}: {_one_line(e)} ({type(e.__cause__).__name__}: {_one_line(e.__cause__, 200)})")
    return None


def _has_auth(exc: Any) -> bool:
    try:
        return "authorization" in {k.lower() for k in exc.response.request.headers.keys()}
    except Exception:  # noqa: BLE001 - best effort for the message only
        return False
