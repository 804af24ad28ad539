"""Push a variant bundle to the Hugging Face Hub (or a private deployment/mirror) as one commit.

The remote tree is compared with the bundle first (LFS files by sha256, regular files by git
blob id), and only new or changed files go into the commit; an unchanged bundle makes no
request beyond the comparison: no upload and no commit. Files under the bundle's own folders
(``nested/``, ``onnx/``, ``r{k}/``) that the bundle no longer has are deleted in the same commit;
other files in the repo are left alone.

With ``branches``, each rank ``k`` also gets a branch ``r{k}`` whose root holds that rank's
adapter (plus the model card), for tools that take ``repo@revision`` and no subfolder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...adapter import CONFIG_NAME, PEFT_CONFIG_NAME, WEIGHTS_NAME
from ...errors import ConfigError
from ...params import fields_of, merge_legacy, param
from ...progress import Progress
from ...urls import redact_url
from .bundle import README_NAME, Bundle, BundleOptions, is_bundle, sha256_file, write_bundle
from .card import PLACEHOLDER_REPO
from .remote import check_repo_id, hub_errors, make_api, resolve_endpoint

if TYPE_CHECKING:
    from huggingface_hub import HfApi

logger = logging.getLogger(__name__)

#: Remote paths the bundle owns: stale files there are deleted on push.
OWNED_RE = re.compile(r"^(nested|onnx|r\d+)/")
KEEP_ON_BRANCH = (".gitattributes",)


@dataclass
class RefUpdate:
    """What one push did to one branch."""

    branch: str
    commit: str | None
    uploaded: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.uploaded or self.deleted)


@dataclass
class PushResult:
    """The outcome of :func:`push_bundle`: the main revision and each rank branch."""

    repo_id: str
    url: str
    main: RefUpdate
    branches: list[RefUpdate]

    def to_dict(self) -> dict[str, Any]:
        def ref(r: RefUpdate) -> dict[str, Any]:
            return {"branch": r.branch, "commit": r.commit, "changed": r.changed, "uploaded": r.uploaded, "deleted": r.deleted}

        return {"repo_id": self.repo_id, "url": self.url, "revision": ref(self.main), "branches": [ref(b) for b in self.branches]}


def git_blob_id(path: Path) -> str:
    """The git blob id of a file: ``sha1(b"blob <size>\\0" + content)``, streamed."""
    h = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _matches(remote: Any, local: Path, sha256: str | None) -> bool:
    """True when the remote ``RepoFile`` has the same content as ``local``."""
    if remote.size != local.stat().st_size:
        return False
    if remote.lfs is not None:
        return remote.lfs.sha256 == (sha256 or sha256_file(local))
    return remote.blob_id == git_blob_id(local)


def _remote_files(api: "HfApi", repo_id: str, revision: str) -> dict[str, Any]:
    from huggingface_hub.hf_api import RepoFile

    return {f.path: f for f in api.list_repo_tree(repo_id, revision=revision, recursive=True) if isinstance(f, RepoFile)}


def _sync(api: "HfApi", repo_id: str, revision: str, wanted: dict[str, tuple[Path, str | None]], remote: dict[str, Any], stale: list[str], message: str) -> RefUpdate:
    """Commit the files of ``wanted`` (repo path → local path, sha256) that differ from ``remote``, and delete ``stale``."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    uploads = sorted(p for p, (local, sha) in wanted.items() if p not in remote or not _matches(remote[p], local, sha))
    deletes = sorted(p for p in stale if p in remote)
    result = RefUpdate(revision, None, uploads, deletes)
    if not uploads and not deletes:
        result.commit = api.repo_info(repo_id, revision=revision).sha
        logger.info("%s@%s is up to date: nothing to upload", repo_id, revision)
        return result
    ops: list[Any] = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(wanted[p][0])) for p in uploads]
    ops += [CommitOperationDelete(path_in_repo=p) for p in deletes]
    logger.info("%s@%s: uploading %d file(s), deleting %d", repo_id, revision, len(uploads), len(deletes))
    info = api.create_commit(repo_id, ops, commit_message=message, revision=revision)
    result.commit = info.oid
    return result


#: A git branch name as the Hub accepts one: no ``..``, no leading ``-`` or ``/``, no empty or
#: dot-leading component, none of ``~^:?*[\\`` or spaces, no ``.lock`` ending, no ``@{``.
_BRANCH_RE = re.compile(r"(?!.*\.\.)(?!.*@\{)(?!.*//)(?!.*/\.)(?!\.)(?!-)(?!/)[A-Za-z0-9._/-]+(?<!/)(?<!\.lock)(?<!\.)")


def check_branch(revision: str) -> str:
    """Validate ``--revision`` for a push: a branch name (git's rules), not a commit id.

    Raises:
        ConfigError: empty, 40 hex characters (a commit, which cannot be pushed to), or not a
            valid branch name (``../../x``, ``a..b``, ``-x``, ``x.lock``, spaces…).
    """
    if not revision or not revision.strip() or re.fullmatch(r"[0-9a-fA-F]{40}", revision):
        raise ConfigError(f"revision {revision!r} is not a branch name; a push commits to a branch (e.g. main or dev), not to a commit", option="revision")
    if len(revision) > 200 or not _BRANCH_RE.fullmatch(revision):
        raise ConfigError(f"revision {revision[:60]!r} is not a valid branch name; use letters, digits and . _ - / (e.g. main, dev, exp/r8), no '..'", option="revision")
    return revision


def ensure_repo(api: "HfApi", repo_id: str, private: bool) -> str:
    """Create ``repo_id`` if it does not exist; return its URL.

    An existing repo is used as it is; if it is public while ``private`` was asked for, refuse
    rather than publish files meant to be private. Where the token may not create repos in the
    namespace, an existing readable repo is still used (the commit then checks write access).
    huggingface_hub's own ``exist_ok`` handling of that case builds the URL for huggingface.co only
    and fails on any other endpoint, so it is done here.

    Raises:
        ConfigError: ``private`` for an existing public repo.
        HfHubHTTPError: the Hub refused (mapped by :func:`~.remote.hub_errors`).
    """
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return str(api.create_repo(repo_id, private=private, exist_ok=False))
    except HfHubHTTPError as e:
        status = e.response.status_code if getattr(e, "response", None) is not None else None
        if status not in (401, 402, 403, 409):
            raise
        try:
            info = api.repo_info(repo_id)
        except HfHubHTTPError:
            if status == 409:
                raise
            raise e from None
    if private and not info.private:
        raise ConfigError(
            f"a private repository was asked for but {repo_id!r} already exists and is public; make it private on the Hub first, "
            "or push without asking for a private one to publish there",
            option="private",
        )
    return f"{api.endpoint.rstrip('/')}/{repo_id}"


@dataclass(frozen=True)
class PushOptions:
    """Where and how :func:`push_bundle` (and :func:`publish`) commit: the branch, the repo's
    visibility, the rank branches, the Hub and the token."""

    private: bool = param(False, flag="--private", help="Create the repo as private; refuses to push to an existing public repo.")
    revision: str = param("main", flag="--revision", show_default=True, help="Branch to commit to (created from main if needed).")
    branches: bool = param(False, flag="--branches", help="Also make a branch r{k} per rank whose root holds that rank's adapter.")
    token: str | None = param(None, flag="--token", hint="or pass --token",
                              help="Hub token (default: HF_TOKEN, then the `hf auth login` cache). Never printed.")
    endpoint: str | None = param(None, flag="--endpoint",
                                 help="Hub URL for private deployments and mirrors (default: HF_ENDPOINT, then huggingface.co).")
    commit_message: str | None = param(None, flag="--commit-message", help="Commit summary (default: names the ranks).")


def push_bundle(
    bundle_dir: str | os.PathLike[str],
    repo_id: str,
    options: PushOptions | None = None,
    **legacy: Any,
) -> PushResult:
    """Push the bundle folder ``bundle_dir`` to ``repo_id`` (created if needed) as one commit on
    ``options.revision`` (:class:`PushOptions`). The options passed as keywords of this function
    still work for one release, with a ``DeprecationWarning``.

    Raises:
        InvalidAdapterError, IntegrityError: the bundle folder is invalid or was modified.
        ConfigError: ``repo_id`` is not a valid Hub repo id, ``revision`` is not a branch name, or
            ``private`` for an existing public repo.
        HubError: the Hub refused (token, permission) or could not be reached.
    """
    opts = merge_legacy(options, PushOptions, legacy, "push_bundle")
    revision, branches = opts.revision, opts.branches
    check_repo_id(repo_id)
    check_branch(revision)
    bundle = Bundle.load(bundle_dir, verify=True)
    if PLACEHOLDER_REPO in (bundle.path / README_NAME).read_text(encoding="utf-8"):
        logger.warning("the model card's snippets show %s: rebuild the bundle with the repo id %s to fill them in", PLACEHOLDER_REPO, repo_id)
    root = bundle.path
    sha = {f.path: f.sha256 for f in bundle.files}
    wanted = {p: (root / p, sha.get(p)) for p in bundle.all_paths()}
    ranks = [r.rank for r in bundle.ranks]
    message = opts.commit_message or f"Upload MatryoshkaLoRA bundle (ranks {', '.join(map(str, ranks))}) with mlora-export"
    url_endpoint = resolve_endpoint(opts.endpoint)
    api = make_api(opts.endpoint, opts.token)

    with hub_errors("push-hub", repo_id, url_endpoint, revision):
        url = ensure_repo(api, repo_id, opts.private)
        refs = {b.name for b in api.list_repo_refs(repo_id).branches}
        if revision not in refs:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        remote = _remote_files(api, repo_id, revision)
        stale = [p for p in remote if OWNED_RE.match(p) and p not in wanted]
        main = _sync(api, repo_id, revision, wanted, remote, stale, message)
        updates = []
        if branches:
            for r in bundle.ranks:
                branch = r.path
                if branch not in refs:
                    api.create_branch(repo_id, branch=branch, revision=main.commit, exist_ok=True)
                    refs.add(branch)
                branch_files = {
                    README_NAME: (root / README_NAME, sha.get(README_NAME)),
                    **{n: (root / r.path / n, sha.get(f"{r.path}/{n}")) for n in (PEFT_CONFIG_NAME, WEIGHTS_NAME, CONFIG_NAME)},
                }
                have = _remote_files(api, repo_id, branch)
                stale_b = [p for p in have if p not in branch_files and p not in KEEP_ON_BRANCH]
                updates.append(_sync(api, repo_id, branch, branch_files, have, stale_b, f"Rank {r.rank} adapter at the root ({message})"))
    logger.info("pushed %s: %s", repo_id, "no change" if not main.changed else f"commit {main.commit}")
    return PushResult(repo_id=repo_id, url=redact_url(url), main=main, branches=updates)


def dry_run_listing(bundle: Bundle, branches: bool = False) -> list[dict[str, Any]]:
    """What a push would upload (path and size), with no network call; ``branches`` adds each rank branch's root files."""
    out = [{"path": p, "size": (bundle.path / p).stat().st_size} for p in bundle.all_paths()]
    if branches:
        for r in bundle.ranks:
            for n in (README_NAME, PEFT_CONFIG_NAME, WEIGHTS_NAME, CONFIG_NAME):
                src = bundle.path / (n if n == README_NAME else f"{r.path}/{n}")
                out.append({"path": f"{r.path}@{n}", "size": src.stat().st_size, "branch": r.path})
    return out


@dataclass
class PublishResult:
    """What :func:`publish` did: the bundle it pushed (or would push), and the push or the dry-run listing.

    ``ignored`` names the bundle-building options that were set but did not apply (the source
    was already a bundle).
    """

    bundle: Bundle
    dry_run: bool
    listing: list[dict[str, Any]] | None = None
    push: PushResult | None = None
    ignored: list[str] = field(default_factory=list)


def publish(
    source: str | os.PathLike[str],
    repo_id: str,
    ranks: Iterable[int] | str = "all",
    bundle: BundleOptions | None = None,
    push: PushOptions | None = None,
    *,
    dry_run: bool = False,
    progress: Progress | None = None,
    export_progress: Progress | None = None,
    **legacy: Any,
) -> PublishResult:
    """Push ``source`` to ``repo_id``: a bundle folder as it is, or a nested adapter bundled on the fly
    at ``ranks`` (in a temporary folder, with :func:`~.bundle.write_bundle` and ``bundle``'s options;
    the card's snippets name ``repo_id``), committed as ``push`` says. With ``dry_run``, list what
    would be uploaded and send nothing. The options passed as keywords of this function still
    work for one release, with a ``DeprecationWarning``.

    Everything that can be checked without the network (repo id, branch name, endpoint) is checked
    before a bundle is built. A bundle built on the fly lives in a temporary folder that is gone
    when this returns (``result.bundle`` still describes it).

    Raises:
        see :func:`~.bundle.write_bundle` and :func:`push_bundle`.
    """
    bundle_kw = {k: v for k, v in legacy.items() if k in fields_of(BundleOptions)}
    bopts = merge_legacy(bundle, BundleOptions, bundle_kw, "publish")
    popts = merge_legacy(push, PushOptions, {k: v for k, v in legacy.items() if k not in bundle_kw}, "publish")
    check_repo_id(repo_id)
    check_branch(popts.revision)
    if not dry_run:
        resolve_endpoint(popts.endpoint)  # a malformed endpoint fails before the bundle is built
    with tempfile.TemporaryDirectory(prefix="mlora-bundle-") as tmp:
        ignored: list[str] = []
        if is_bundle(source):
            ignored = (["ranks"] if ranks != "all" else []) + _set_options(bopts)
            built = Bundle.load(source, verify=True)
        else:
            built = write_bundle(source, ranks, Path(tmp) / "bundle", dataclasses.replace(bopts, repo_id=repo_id),
                                 progress=progress, export_progress=export_progress)
        if dry_run:
            return PublishResult(built, True, listing=dry_run_listing(built, popts.branches), ignored=ignored)
        result = push_bundle(built.path, repo_id, popts)
        return PublishResult(built, False, push=result, ignored=ignored)


def _set_options(options: BundleOptions) -> list[str]:
    """The bundle-building options set away from their defaults, in declaration order (the card's
    repo id aside: :func:`publish` sets it)."""
    default = BundleOptions()
    return [name for name in fields_of(BundleOptions) if name != "repo_id" and getattr(options, name) != getattr(default, name)]


__all__ = [
    "PublishResult", "PushOptions", "PushResult", "RefUpdate", "check_branch", "check_repo_id", "dry_run_listing", "ensure_repo",
    "git_blob_id", "publish", "push_bundle",
]
