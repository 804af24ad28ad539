"""Pull one rank of a variant bundle from the Hub, sha256-verified against the bundle's manifest.

Only ``manifest.json`` is read first (to choose the rank: an explicit one, or with ``"auto"`` the
one a budget of size, parameters, latency and recorded score selects, :mod:`.choose`); then only the files the manifest lists for that
rank's folder, and the bundle's ``matryoshka_config.json``, are downloaded one by one, all at the
one commit the revision pointed to when the pull started. The remote is untrusted: every path
is proven a plain relative path (:func:`~.bundle.safe_relpath`) before anything is fetched, a
file the manifest does not list is never fetched, every file is checked against the manifest,
and the rank's folder must hold a valid, finite adapter of that rank (validated as a local one
is), all before the output folder appears; on any fault the error names the file and nothing is
left behind.

The output folder is a plain PEFT adapter (``adapter_config.json``, ``adapter_model.safetensors``,
the slice's ``matryoshka_config.json``) with the bundle's manifest and config kept under
``bundle/`` for provenance.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...adapter import CONFIG_NAME, NestedAdapter, write_json
from ...adapter.config import EVALUATION_KEY, RecordedEvaluation, recorded_evaluations
from ...errors import (
    ConfigError,
    HubError,
    InvalidAdapterError,
    RankError,
    RemoteIntegrityError,
)
from ...fs import atomic_output_dir, check_output_path
from ...io.jsonio import read_json
from ...params import merge_legacy
from ...urls import redact_url
from ...validate import is_int
from .bundle import MANIFEST_NAME, BundleRank, check_file, check_manifest
from .choose import RankBudget, RankChoice, choose_rank_by_budget
from .remote import check_repo_id, hub_errors, make_api, resolve_endpoint

logger = logging.getLogger(__name__)

PROVENANCE_DIR = "bundle"
#: Where the files are downloaded, inside the temporary output, before they are verified.
DOWNLOAD_DIR = ".download"


@dataclass(frozen=True)
class PullResult:
    """What :func:`pull_rank` wrote."""

    repo_id: str
    rank: int
    path: Path
    commit: str
    params: int
    bytes: int
    files: list[str]
    #: Why this rank: asked for, or what the budget of ``rank="auto"`` selected it by.
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"repo_id": self.repo_id, "rank": self.rank, "path": str(self.path), "commit": self.commit,
                "params": self.params, "bytes": self.bytes, "files": self.files, "reason": self.reason}


def choose_rank(ranks: list[BundleRank], rank: int | str, budget: RankBudget, manifest: dict[str, Any], repo_id: str,
                recorded: Mapping[str, RecordedEvaluation] | None = None) -> RankChoice:
    """The bundle rank to pull: ``rank`` itself, or with ``"auto"`` the one ``budget`` selects
    (:func:`~.choose.choose_rank_by_budget`, its scores checked against ``recorded``), with the reason.

    Raises:
        RankError: the rank is not in the bundle, or no rank meets the budget.
        ConfigError: the budget asks for something the bundle does not record (latency, scores).
        InvalidAdapterError: the manifest's scores disagree with the recorded evaluation.
    """
    if rank == "auto":
        try:
            return choose_rank_by_budget(ranks, budget, manifest, recorded, f"{repo_id}/{MANIFEST_NAME}")
        except RankError as e:
            raise RankError(f"{repo_id!r}: {e}", rank=e.rank, option=e.option) from None
    for r in ranks:
        if r.rank == rank:
            return RankChoice(r, f"rank {rank}: asked for")
    available = ", ".join(str(r.rank) for r in ranks) or "none"
    raise RankError(f"rank {rank} is not in the bundle {repo_id!r}; it has ranks {available}", rank=int(rank), option="rank")


def pull_rank(
    repo_id: str,
    rank: int | str,
    output: str | os.PathLike[str],
    budget: RankBudget | None = None,
    *,
    revision: str = "main",
    endpoint: str | None = None,
    token: str | None = None,
    force: bool = False,
    **legacy: Any,
) -> PullResult:
    """Download rank ``rank`` (or ``"auto"``) of the bundle ``repo_id`` into the new folder ``output``.

    With ``"auto"`` the rank is chosen by the ``budget`` (:class:`~.choose.RankBudget`, see
    :mod:`.choose`): the largest rank that fits ``max_bytes``, ``max_params`` and
    ``max_latency_ms`` (per-rank latency the bundle recorded), or, with ``min_score`` or
    ``within``, the smallest of those that reaches the score (of ``metric``, as recorded by an
    evaluation). ``result.reason`` says why. The limits passed as keywords of this function
    (``max_bytes=…``) still work for one release, with a ``DeprecationWarning``.

    Raises:
        ConfigError: an invalid repo id or endpoint, ``"auto"`` without a limit, or an invalid limit or rank.
        OutputExistsError: ``output`` exists and ``force`` is false.
        RankError: the rank is not in the bundle, or none fits the limits.
        InvalidAdapterError: the repo is not an mlora-export bundle (no or invalid ``manifest.json``).
        RemoteIntegrityError: a downloaded file does not match the manifest (names the file).
        HubError: unknown repo or revision, bad token, no permission, network down.
    """
    budget = _check_pull_args(repo_id, rank, revision, merge_legacy(budget, RankBudget, legacy, "pull_rank"))
    check_output_path(output, force)
    url_endpoint = resolve_endpoint(endpoint)
    api = make_api(endpoint, token)
    with hub_errors("pull", repo_id, url_endpoint, revision):
        commit = api.repo_info(repo_id, revision=revision).sha
    if not commit:
        raise HubError(f"pull: the Hub at {redact_url(url_endpoint)} did not say which commit {revision!r} of {repo_id!r} is")
    with atomic_output_dir(output, force) as tmp:
        dl = _Downloads(repo_id, revision, commit, url_endpoint, token, tmp / DOWNLOAD_DIR, str(output))
        dl.folder.mkdir()
        manifest_path, manifest = _fetch_manifest(dl)
        source = f"{repo_id}/{MANIFEST_NAME}"
        hint = f"the copy on the Hub is corrupt or was changed after the bundle was written; nothing was written to {str(output)!r}"
        # The bundle's config first (every pull takes it): a choice by score is checked against its recorded evaluation.
        config_entry = _config_entry(manifest, source)
        check_file(dl.fetch(config_entry["path"]), config_entry, label=f"{repo_id}/{CONFIG_NAME}", error=RemoteIntegrityError, hint=hint)
        recorded = _recorded_evaluations(dl)
        # bytes: what the listed files add up to (check_manifest); params: checked against the tensors below
        ranks = [BundleRank(r["rank"], r["path"].rstrip("/"), r["params"], r["bytes"], dict(r.get("metrics") or {})) for r in manifest["ranks"]]
        choice = choose_rank(ranks, rank, budget, manifest, repo_id, recorded)
        chosen = choice.rank
        logger.info("%s", choice.reason)
        entries = _rank_entries(manifest, chosen, source)
        logger.info("pulling rank %d of %s@%s (%d bytes)", chosen.rank, repo_id, commit[:10], chosen.bytes)
        # Only manifest-listed files are fetched, one by one, and each is verified before use.
        for entry in entries:
            check_file(dl.fetch(entry["path"]), entry, label=f"{repo_id}/{entry['path']}", error=RemoteIntegrityError, hint=hint)
        _check_pulled_adapter(dl, chosen)
        files = _move_into_place(dl, entries, chosen.path + "/", tmp, source)
        _keep_provenance(dl, manifest_path, tmp, chosen.rank)
        shutil.rmtree(dl.folder)
    logger.info("pulled rank %d of %s into %s", chosen.rank, repo_id, output)  # chosen.params and .bytes are verified now
    return PullResult(repo_id, chosen.rank, Path(output), commit, chosen.params, chosen.bytes, sorted(files), choice.reason)


def _check_pull_args(repo_id: str, rank: int | str, revision: str, budget: RankBudget) -> RankBudget:
    """Validate the arguments of :func:`pull_rank` before any request; return the checked budget.

    Raises:
        ConfigError: an invalid repo id, an empty revision, a bad limit, ``"auto"`` without a
            limit, a rank that is not a positive integer, or limits with a fixed rank.
    """
    check_repo_id(repo_id, require_namespace=False, option=None)  # REPO_ID is an argument
    if not revision or not revision.strip():
        raise ConfigError("the revision is empty; give a branch, tag or commit (default: main)", option="revision")
    budget = budget.check()
    if rank == "auto":
        if budget.empty:
            raise ConfigError("rank 'auto' needs a limit (bytes, parameters, latency) or a score to reach to choose a rank", option="budget")
    elif not is_int(rank) or int(rank) < 1:
        raise ConfigError(f"rank must be a positive integer or 'auto', got {rank!r}", option="rank")
    elif not budget.empty:
        raise ConfigError("limits and scores choose a rank only with rank 'auto'", option="rank")
    return budget


@dataclass(frozen=True)
class _Downloads:
    """Where and from what one pull downloads: the repo at the one ``commit`` the revision pointed
    to, into ``folder`` (inside the temporary output); ``output`` is named in errors."""

    repo_id: str
    revision: str
    commit: str
    endpoint: str
    token: str | None
    folder: Path
    output: str

    def fetch(self, path: str) -> Path:
        """Download the manifest-listed ``path`` (already proven safe) into :attr:`folder`; prove
        the result is a regular file inside it.

        Raises:
            HubError: the download fails (see :func:`~.remote.hub_errors`).
            RemoteIntegrityError: the file did not arrive as a plain file at its place.
        """
        from huggingface_hub import hf_hub_download

        with hub_errors("pull", self.repo_id, self.endpoint, self.revision):
            got = Path(hf_hub_download(self.repo_id, path, revision=self.commit, local_dir=self.folder, endpoint=self.endpoint, token=self.token))
        expected = self.folder.joinpath(*path.split("/"))
        if got.absolute() != expected.absolute() or not _inside_real(expected, self.folder) or expected.is_symlink() or not expected.is_file():
            raise RemoteIntegrityError(f"{self.repo_id}/{path}: the download did not arrive as a plain file at its place; nothing was written to {self.output!r}")
        return expected


def _fetch_manifest(dl: _Downloads) -> tuple[Path, dict[str, Any]]:
    """``(path, manifest)``: the bundle's ``manifest.json``, downloaded and validated.

    Raises:
        InvalidAdapterError: the repo has no manifest (not a bundle), or an invalid one (named as
            ``repo/manifest.json``, never by its local path).
        HubError: any other download failure.
    """
    from huggingface_hub.errors import RemoteEntryNotFoundError

    try:
        manifest_path = dl.fetch(MANIFEST_NAME)
    except HubError as e:
        if isinstance(e.__cause__, RemoteEntryNotFoundError):
            raise InvalidAdapterError(f"{dl.repo_id!r} has no {MANIFEST_NAME} at revision {dl.revision!r}: it is not a variant bundle written by mlora-export push-hub") from e
        raise
    source = f"{dl.repo_id}/{MANIFEST_NAME}"
    try:
        raw_manifest = read_json(manifest_path, InvalidAdapterError, what="manifest")
    except InvalidAdapterError as e:
        raise InvalidAdapterError(str(e).replace(str(manifest_path), source)) from e
    return manifest_path, check_manifest(raw_manifest, source)


def _config_entry(manifest: dict[str, Any], source: str) -> dict[str, Any]:
    """The manifest's entry of the bundle's ``matryoshka_config.json`` (every pull fetches it).

    Raises:
        InvalidAdapterError: the manifest does not list it.
    """
    config_entry = next((f for f in manifest["files"] if f["path"] == CONFIG_NAME), None)
    if config_entry is None:
        raise InvalidAdapterError(f"{source}: does not list {CONFIG_NAME}; the bundle is broken")
    return config_entry


def _recorded_evaluations(dl: _Downloads) -> dict[str, RecordedEvaluation]:
    """The evaluations recorded in the downloaded (and verified) bundle ``matryoshka_config.json``, typed.

    Raises:
        InvalidAdapterError: the file is not strict JSON, not an object, or its evaluation is ill-typed.
    """
    path, source = dl.folder / CONFIG_NAME, f"{dl.repo_id}/{CONFIG_NAME}"
    try:
        config = read_json(path, InvalidAdapterError, what="bundle config")
    except InvalidAdapterError as e:
        raise InvalidAdapterError(str(e).replace(str(path), source)) from e
    if not isinstance(config, dict):
        raise InvalidAdapterError(f"{source}: expected a JSON object; the bundle is broken")
    return recorded_evaluations(config.get(EVALUATION_KEY), source)


def _rank_entries(manifest: dict[str, Any], chosen: BundleRank, source: str) -> list[dict[str, Any]]:
    """The manifest's files of the chosen rank's folder: with the bundle's config, the only files a pull fetches.

    Raises:
        InvalidAdapterError: no files for the rank, or a file that is hidden or would take the
            place of the pulled folder's own ``bundle/`` or ``.download/``.
    """
    prefix = chosen.path + "/"
    entries = [f for f in manifest["files"] if f["path"].startswith(prefix)]
    if not entries:
        raise InvalidAdapterError(f"{source}: lists no files for rank {chosen.rank} ({prefix}); the bundle is broken")
    for entry in entries:
        rel = entry["path"][len(prefix):]
        if any(part.startswith(".") for part in entry["path"].split("/")):  # the client keeps its own metadata in .cache/
            raise InvalidAdapterError(f"{source}: file {entry['path']!r} is a hidden path, which a bundle never holds; the bundle is broken")
        if rel.split("/")[0] in (PROVENANCE_DIR, DOWNLOAD_DIR):
            raise InvalidAdapterError(f"{source}: file {entry['path']!r} would take the place of the pulled folder's own {rel.split('/')[0]}/; the bundle is broken")
    return entries


def _check_pulled_adapter(dl: _Downloads, chosen: BundleRank) -> None:
    """The rank's downloaded folder must hold a valid, finite adapter of that rank: checked exactly as a local one.

    Raises:
        InvalidAdapterError: not a valid adapter, or one of another rank than the manifest gives.
    """
    folder = dl.folder.joinpath(*chosen.path.split("/"))
    try:
        pulled = NestedAdapter.load(folder, check_finite=True)
    except InvalidAdapterError as e:
        raise InvalidAdapterError(
            f"{dl.repo_id}/{chosen.path}: not a valid adapter ({str(e).replace(str(folder), chosen.path)}); nothing was written to {dl.output!r}"
        ) from e
    found = pulled.slice_info.get("rank") if pulled.slice_info else pulled.max_rank
    if pulled.max_rank != chosen.rank or found != chosen.rank:
        raise InvalidAdapterError(
            f"{dl.repo_id}/{chosen.path}: the manifest gives it as rank {chosen.rank} but it holds an adapter of rank "
            f"{pulled.max_rank}; the bundle is broken, nothing was written to {dl.output!r}"
        )
    params = pulled.params_at(chosen.rank)  # from the tensors' shapes
    if params != chosen.params:
        raise InvalidAdapterError(
            f"{dl.repo_id}/{chosen.path}: the manifest gives rank {chosen.rank} {chosen.params:,} parameters but its tensors hold "
            f"{params:,}; the bundle is broken, nothing was written to {dl.output!r}"
        )


def _move_into_place(dl: _Downloads, entries: list[dict[str, Any]], prefix: str, tmp: Path, source: str) -> list[str]:
    """Move the verified files of the rank's folder to the root of the output; return their paths there.

    Raises:
        InvalidAdapterError: a file would not have a place of its own in the output.
    """
    files = []
    for entry in entries:
        rel = entry["path"][len(prefix):]
        dest = tmp.joinpath(*rel.split("/"))
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not _inside_real(dest.parent, tmp) or dest.exists() or dest.is_symlink():
            raise InvalidAdapterError(f"{source}: file {entry['path']!r} does not have a place of its own in the output; the bundle is broken")
        os.replace(dl.folder.joinpath(*entry["path"].split("/")), dest)
        files.append(rel)
    return files


def _keep_provenance(dl: _Downloads, manifest_path: Path, tmp: Path, rank: int) -> None:
    """``bundle/``: the bundle's manifest and nested config, and ``source.json`` (repo, revision, commit, endpoint, rank)."""
    prov = tmp / PROVENANCE_DIR
    prov.mkdir()
    os.replace(manifest_path, prov / MANIFEST_NAME)
    os.replace(dl.folder / CONFIG_NAME, prov / CONFIG_NAME)
    write_json(prov / "source.json", {"repo_id": dl.repo_id, "revision": dl.revision, "commit": dl.commit, "endpoint": redact_url(dl.endpoint), "rank": rank})


def _inside_real(path: Path, folder: Path) -> bool:
    """True when ``path``, symbolic links resolved, is ``folder`` or lies inside it."""
    real, root = Path(os.path.realpath(path)), Path(os.path.realpath(folder))
    return real == root or root in real.parents


__all__ = ["PROVENANCE_DIR", "PullResult", "choose_rank", "pull_rank"]
