"""A base model named by its Hub id: downloaded once into the Hub cache, then read as a local folder.

``--base-model org/name`` (with a revision) means: a local path that exists always wins; else a
Hub id is resolved with ``huggingface_hub.snapshot_download`` into the Hub cache, fetching only
what a base folder needs (config, generation config, tokenizer files, chat template, safetensors
weights and their index: never pickle weights, which are refused as a local folder's are), and
the snapshot folder is then checked and loaded exactly as a local folder (:mod:`.folder`). The
endpoint, token, offline mode and cache are the Hub client's, as in transformers.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from ..errors import BaseModelError, ConfigError, HubError, HubInputError
from ..hubio import endpoint, has_token, is_hub_id, login_hint, quiet_hub_bars, transport_errors
from .folder import PICKLE_SUFFIXES, SAFE_INDEX, SAFE_SINGLE, convert_hint

logger = logging.getLogger(__name__)

#: Top-level files of a model repo that a base folder takes (besides ``*.safetensors``).
BASE_FILES: tuple[str, ...] = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "spiece.model",
    "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json", SAFE_INDEX,
)
#: Extra chat templates transformers reads from their own folder.
_EXTRA_TEMPLATES = "additional_chat_templates/*.jinja"


def _wanted(files: list[str], config_only: bool) -> list[str]:
    """The repo files a base folder takes: :data:`BASE_FILES` and top-level ``*.safetensors``
    (only ``config.json`` when ``config_only``)."""
    if config_only:
        return [f for f in files if f == "config.json"]
    return [f for f in files if f in BASE_FILES or ("/" not in f and f.endswith(".safetensors"))
            or fnmatch.fnmatch(f, _EXTRA_TEMPLATES)]


@contextlib.contextmanager
def _hub_errors(repo_id: str, revision: str | None, token: str | None) -> Iterator[None]:
    """huggingface_hub errors of a model download → :class:`HubInputError` (the id, revision or
    token cannot be used: exit 2) or :class:`HubError` (the Hub cannot be reached: exit 1). The
    token is never part of a message."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = endpoint()
    try:
        yield
    except RevisionNotFoundError as e:
        raise HubInputError(f"base model {repo_id!r}: revision {revision!r} not found on {where}; give a branch, tag or commit it has",
                            option="revision", repo_id=repo_id) from e
    except GatedRepoError as e:
        raise HubInputError(f"base model {repo_id!r} on {where} is gated; request access on its page, then {login_hint()}",
                            repo_id=repo_id) from e
    except RepositoryNotFoundError as e:
        who = "the token sent" if has_token(token) else "an anonymous request (no token)"
        raise HubInputError(
            f"base model {repo_id!r} is not a local folder, and the Hub at {where} has no model {repo_id!r} that {who} may read; "
            f"check the id or the path, or {login_hint()}", repo_id=repo_id,
        ) from e
    except (OfflineModeIsEnabled, LocalEntryNotFoundError) as e:
        raise HubInputError(f"base model {repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                            "download it once online, or unset HF_HUB_OFFLINE", repo_id=repo_id) from e
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            raise HubInputError(f"base model {repo_id!r}: the Hub at {where} refused the token ({status}); it is invalid, expired "
                                f"or lacks access: {login_hint()}", repo_id=repo_id) from e
        raise HubError(f"base model {repo_id!r}: the Hub at {where} answered HTTP {status}") from e
    except transport_errors() as e:
        raise HubError(f"base model {repo_id!r}: cannot reach the Hub at {where} ({type(e).__name__}); check the network and "
                       "HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use the cache") from e


def download_base(repo_id: str, *, revision: str | None = None, token: str | None = None, config_only: bool = False) -> Path:
    """Download what a base folder needs from the Hub model repo ``repo_id`` into the Hub cache; return the snapshot folder.

    Online, the repo's file list is read first: a repo whose weights are pickle files only is
    refused before anything is downloaded. Offline (``HF_HUB_OFFLINE``), the cached snapshot is used.

    Raises:
        HubInputError: no such repo or revision, no access, or not cached while offline.
        HubError: the Hub cannot be reached.
        BaseModelError: the repo has no safetensors weights.
    """
    from huggingface_hub import HfApi, constants, snapshot_download

    with quiet_hub_bars(), _hub_errors(repo_id, revision, token):
        if constants.is_offline_mode():
            patterns = ["config.json"] if config_only else [*BASE_FILES, "*.safetensors", _EXTRA_TEMPLATES]
            folder = snapshot_download(repo_id, revision=revision, token=token, allow_patterns=patterns, local_files_only=True)
            return Path(folder)
        info = HfApi(token=token, library_name="mlora-export").model_info(repo_id, revision=revision)
        files = [s.rfilename for s in (info.siblings or [])]
        if not config_only and not any("/" not in f and f.endswith(".safetensors") for f in files):
            pickles = sorted(f for f in files if "/" not in f and f.endswith(PICKLE_SUFFIXES))
            if pickles:
                raise BaseModelError(
                    f"base model {repo_id!r} on the Hub has only pickle weights ({', '.join(pickles[:3])}): pickle weights are refused, "
                    f"never loaded (unpickling runs arbitrary code); {convert_hint(Path(repo_id))}", path=repo_id,
                )
            raise BaseModelError(f"base model {repo_id!r} on the Hub has no {SAFE_SINGLE} or {SAFE_INDEX}; it is not a transformers "
                                 "model repo with safetensors weights", path=repo_id)
        if "config.json" not in files:
            raise BaseModelError(f"base model {repo_id!r} on the Hub has no config.json; it is not a transformers model repo", path=repo_id)
        wanted = _wanted(files, config_only)
        logger.info("downloading %d file(s) of %s%s from %s", len(wanted), repo_id, f"@{revision}" if revision else "", endpoint())
        folder = snapshot_download(repo_id, revision=revision, token=token, allow_patterns=wanted)
    return Path(folder)


def resolve_base_model(spec: str | os.PathLike[str], *, revision: str | None = None, token: str | None = None,
                       config_only: bool = False) -> Path:
    """The local folder of a base model given as a local path or a Hub id.

    A path that exists is returned as it is (``revision`` is then refused); a Hub id
    (``namespace/name``) is downloaded (:func:`download_base`); anything else is returned for the
    folder checks to report (a missing folder).

    Raises:
        ConfigError: a revision with a local folder.
        HubInputError, HubError, BaseModelError: see :func:`download_base`.
    """
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if path.exists() or not is_hub_id(text):
        if revision is not None and path.exists():
            raise ConfigError(f"base model {text!r} is a local folder: a revision applies to a Hub model id only", option="revision")
        return path
    return download_base(text, revision=revision, token=token, config_only=config_only)


__all__ = ["BASE_FILES", "download_base", "resolve_base_model"]
