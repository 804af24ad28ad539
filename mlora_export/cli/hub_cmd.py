"""``mlora-export bundle``, ``push-hub`` and ``pull``: variant bundles, locally and on the Hub."""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable
from typing import Any

import click

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

from ..converters.hub.bundle import BundleOptions
from ..converters.hub.choose import RankBudget
from ..converters.hub.push import PushOptions
from ..params import fields_of
from ..units import human_bytes
from ..validate import ascii_int
from ._errors import handle_errors
from ._options import BarProgress, BaseModelArg, MetricName, adapter_argument, base_model_option, collect, echo_json, echo_table
from ._options import field_help, field_option, field_options, force_option, json_option, output_option, ranks_option, revision_option

F = TypeVar("F", bound=Callable[..., Any])
logger = logging.getLogger("mlora_export.cli")

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3}


class ByteSize(click.ParamType):
    """``--max-bytes 50MB`` / ``1.5GiB`` / ``123456`` → bytes (int)."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        m = re.fullmatch(r"\s*([0-9]{1,18}(?:\.[0-9]{1,18})?)\s*([a-zA-Z]*)\s*", str(value))
        if m is None or m.group(2).lower() not in _UNITS:
            self.fail(f"{value!r} is not a size; give bytes or a number with a unit, e.g. 50MB, 1.5GiB", param, ctx)
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
        if n < 1:
            self.fail(f"{value!r} must be at least 1 byte", param, ctx)
        return n


class RankOrAuto(click.ParamType):
    """``--rank 8`` → 8; ``--rank auto`` → "auto"."""

    name = "rank"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | str:
        if isinstance(value, int) or value == "auto":
            return value
        k = ascii_int(str(value))
        if k is None:
            self.fail(f"{value!r} is not a rank; give an integer such as 8, or 'auto' with limits (--max-bytes, --max-latency-ms…) or a score (--min-score, --within)", param, ctx)
        if k < 1:
            self.fail(f"rank {k} must be at least 1", param, ctx)
        return k


#: ``--base-model`` of ``bundle`` and ``push-hub``: the base the exports are built on (the card's name too, for a Hub id).
_BUNDLE_BASE_HELP = ("The base model, a local folder or a Hub model id (downloaded): what --with-onnx exports on{gguf}. A Hub "
                     "id also names the card's base model, unless --base-model-id does.")
#: An export flag whose value, when one is given, is its older spelling.
_EXPORT_FLAG = {"is_flag": False, "flag_value": "", "default": None, "type": click.STRING, "metavar": ""}


def _older(flag: str) -> str:
    return f" ({flag} BASE, the older spelling, still works for one release.)"


def _bundle_options(gguf: bool) -> Callable[[F], F]:
    """The bundle-building options of ``bundle`` (with ``gguf``) and ``push-hub``: ``--ranks`` and :class:`BundleOptions`."""
    base_help = _BUNDLE_BASE_HELP.format(gguf=" and whose architecture --gguf reads" if gguf else "")

    def decorate(func: F) -> F:
        for opt in reversed([
            ranks_option("Comma-separated ranks (e.g. 4,8,16) or 'all' for the train ranks.", required=False, default="all"),
            field_option(BundleOptions, "scale_mode"),
            base_model_option(base_help, revision=False),
            field_option(BundleOptions, "base_model_id"),
            field_option(BundleOptions, "license_id"),
            field_option(BundleOptions, "default_rank"),
            field_option(BundleOptions, "onnx_base", **_EXPORT_FLAG, help=field_help(BundleOptions, "onnx_base") + _older("--with-onnx")),
            field_option(BundleOptions, "measure_latency"),
        ]):
            func = opt(func)
        return func

    return decorate


def _bundle_bases(options: BundleOptions, base: BaseModelArg, output: str | None, force: bool) -> BundleOptions:
    """``options`` with the exports' base resolved to a local folder (a Hub id downloaded, the output
    checked first) and the card's Hub id chosen.

    ``--with-onnx`` and ``--gguf`` are flags that build on ``--base-model`` (their value ``""``);
    their older spelling names the base itself (``--with-onnx BASE``), and then ``--base-model``
    keeps its older meaning, the card's Hub id, as it also has without either export.

    Raises:
        click.UsageError: an export flag without ``--base-model``.
    """
    from ..converters.hub.card import hub_base_model

    onnx, gguf = options.onnx_base, options.gguf_base
    older = [(flag, v) for flag, v in (("--with-onnx", onnx), ("--gguf", gguf)) if v]
    for flag, _ in older:
        logger.warning("%s BASE is deprecated: give %s with --base-model BASE (the older spelling goes in the next release)", flag, flag)
    if not older:
        missing = [flag for flag, v in (("--with-onnx", onnx), ("--gguf", gguf)) if v == "" and base.spec is None]
        if missing:
            raise click.UsageError(f"{missing[0]} builds on the base model: give --base-model (a local folder or a Hub model id)")
        onnx = base.spec if onnx == "" else None
        gguf = base.spec if gguf == "" else None
    card = options.base_model_id
    if card is None and base.spec is not None and (older or (onnx is None and gguf is None)
                                                    or (hub_base_model(base.spec) and not Path(base.spec).exists())):
        card = base.spec
    return replace(options, base_model_id=card, onnx_base=_local_base(onnx, output, force), gguf_base=_local_base(gguf, output, force, config_only=True))


def _local_base(spec: str | os.PathLike[str] | None, output: str | None, force: bool, config_only: bool = False) -> str | None:
    """The local folder of an export's base (a Hub id downloaded; the output checked first)."""
    if spec is None:
        return None
    from ..base import resolve_base_model
    from ..fs import check_output_path

    if output is not None:
        check_output_path(output, force)
    return str(resolve_base_model(spec, config_only=config_only))


@click.command("bundle")
@adapter_argument
@output_option("Bundle folder to create (same layout as the Hub repo).")
@_bundle_options(gguf=True)
@field_option(BundleOptions, "gguf_base", **_EXPORT_FLAG, help=field_help(BundleOptions, "gguf_base") + _older("--gguf"))
@field_options(BundleOptions, "repo_id")
@force_option
@json_option
@handle_errors
@collect(BundleOptions, "options")
def bundle(adapter: str, output: str, ranks: Any, base: BaseModelArg, options: BundleOptions, force: bool, as_json: bool) -> None:
    """Write a variant bundle of a nested ADAPTER to a local folder (no network).

    The folder holds README.md (model card), matryoshka_config.json, manifest.json (every
    file's size and sha256), nested/ and one PEFT slice r{k}/ per rank.

    \b
    Example:
      mlora-export bundle ./nested --ranks 4,8,16,32 --output ./bundle
      mlora-export bundle ./nested --ranks 8,16 --with-onnx --base-model ./base-model --output ./bundle
      mlora-export bundle ./nested --ranks 8,16 --gguf --base-model ./base-model --output ./bundle
    """
    if options.repo_id is not None:
        from ..converters.hub.push import check_repo_id

        check_repo_id(options.repo_id)
    from ..converters.hub.bundle import write_bundle

    options = _bundle_bases(options, base, output, force)
    with BarProgress("onnx export", unit="step") as export_bar, BarProgress("bundling") as bar:
        b = write_bundle(adapter, ranks, output, options, force=force, progress=bar, export_progress=export_bar)
    if as_json:
        echo_json({"path": str(b.path), "ranks": [r.__dict__ for r in b.ranks], "files": [f.__dict__ for f in b.files], "bytes": b.total_bytes})
        return
    echo_table(["rank", "folder", "params", "size"], [[r.rank, r.path + "/", r.params, human_bytes(r.bytes)] for r in b.ranks])
    click.echo(f"wrote {b.path} ({len(b.files) + 1} files, {human_bytes(b.total_bytes)})")


#: The flag of each bundle-building option of :func:`~mlora_export.converters.hub.push.publish`.
_BUNDLE_FLAGS = {"ranks": "--ranks", **{name: f.metadata["flag"] for name, f in fields_of(BundleOptions).items() if f.metadata["flag"]}}


@click.command("push-hub")
@click.argument("source", type=click.Path(path_type=str))
@click.option("--repo-id", required=True, help="Hub repo to push to, namespace/name (created if needed).")
@_bundle_options(gguf=False)
@field_options(PushOptions, "private", "revision", "branches")
@click.option("--dry-run", is_flag=True, help="Build the bundle and list its files and sizes; no network call (but a Hub id given to --base-model is downloaded).")
@field_options(PushOptions, "token", "endpoint", "commit_message")
@json_option
@handle_errors
@collect(PushOptions, "push")
@collect(BundleOptions, "options")
def push_hub(source: str, repo_id: str, ranks: Any, base: BaseModelArg, options: BundleOptions, push: PushOptions, dry_run: bool,
             as_json: bool) -> None:
    """Push a variant bundle of SOURCE to the Hub as one commit.

    SOURCE is a nested adapter (bundled on the fly at --ranks) or a folder written by
    `mlora-export bundle`. Files already on the Hub with the same content are not uploaded
    again; an unchanged bundle makes no commit.

    \b
    Example:
      mlora-export push-hub ./nested --repo-id my-org/llama-1b-gsm8k-mlora --ranks 4,8,16,32 --branches
      mlora-export push-hub ./bundle --repo-id my-org/llama-1b-gsm8k-mlora --dry-run
    """
    from ..converters.hub.push import publish

    options = _bundle_bases(options, base, None, False)
    with BarProgress("onnx export", unit="step") as export_bar, BarProgress("bundling") as bar:
        published = publish(source, repo_id, ranks, options, push, dry_run=dry_run, progress=bar, export_progress=export_bar)
    if published.ignored:
        flags = ", ".join(_BUNDLE_FLAGS[name] for name in published.ignored)
        click.echo(f"warning: {source} is already a bundle; {flags} ignored (rebuild it with `mlora-export bundle` to change them)", err=True)
    revision = push.revision
    if published.listing is not None:
        listing = published.listing
        if as_json:
            echo_json({"repo_id": repo_id, "revision": revision, "dry_run": True, "files": listing,
                       "bytes": sum(f["size"] for f in listing if "branch" not in f)})
            return
        echo_table(["file", "size"], [[f["path"], human_bytes(f["size"])] for f in listing])
        click.echo(f"dry run: would push {sum('branch' not in f for f in listing)} files "
                   f"({human_bytes(sum(f['size'] for f in listing if 'branch' not in f))}) to {repo_id}@{revision}; nothing was sent")
        return
    result = published.push
    assert result is not None
    if as_json:
        echo_json(result.to_dict())
        return
    main = result.main
    click.echo(f"{result.url} @ {main.branch}: " + (f"commit {main.commit} ({len(main.uploaded)} uploaded, {len(main.deleted)} deleted)"
                                                    if main.changed else f"up to date at {main.commit} (nothing uploaded)"))
    for ref in result.branches:
        click.echo(f"  branch {ref.branch}: " + (f"commit {ref.commit}" if ref.changed else "up to date"))


@dataclass(frozen=True)
class HubAccess:
    """``--token`` and ``--endpoint``: how to reach the Hub."""

    token: str | None = None
    endpoint: str | None = None


def _hub_access_options(func: F) -> F:
    """``--token`` and ``--endpoint`` (their help is :class:`PushOptions`'), handed on as one ``hub`` (:class:`HubAccess`)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return func(*args, hub=HubAccess(kwargs.pop("token"), kwargs.pop("endpoint")), **kwargs)

    f: Any = click.option("--endpoint", help=field_help(PushOptions, "endpoint"))(wrapper)
    return click.option("--token", help=field_help(PushOptions, "token"))(f)  # type: ignore[no-any-return]


@click.command("pull")
@click.argument("repo_id")
@click.option("--rank", required=True, type=RankOrAuto(),
              help="Rank to fetch, or 'auto' to choose it by the limits and scores below.")
@output_option("Folder to create: a plain PEFT adapter.")
@revision_option("Branch, tag or commit to pull from.", default="main", show_default=True)
@field_options(RankBudget, "max_bytes", "max_params", "max_latency_ms", "min_score", "within", "metric",
               overrides={"max_bytes": {"type": ByteSize()}, "metric": {"type": MetricName()}})
@_hub_access_options
@force_option
@json_option
@handle_errors
@collect(RankBudget, "budget")
def pull(repo_id: str, rank: Any, output: str, revision: str, budget: RankBudget, hub: HubAccess, force: bool, as_json: bool) -> None:
    """Fetch one rank of a variant bundle from the Hub, sha256-verified against its manifest.

    Only manifest.json, matryoshka_config.json and the rank's folder are downloaded. OUTPUT is
    a plain PEFT adapter folder; nothing is written unless every file checks out. With --rank
    auto, the limits keep the ranks that fit; --min-score or --within then take the smallest
    of them that reaches the score, otherwise the largest is taken; the choice is explained.

    \b
    Example:
      mlora-export pull my-org/llama-1b-gsm8k-mlora --rank 8 --output ./r8
      mlora-export pull my-org/llama-1b-gsm8k-mlora --rank auto --max-bytes 20MB --output ./adapter
      mlora-export pull my-org/llama-1b-gsm8k-mlora --rank auto --within 2 --max-latency-ms 15 --output ./adapter
    """
    from ..converters.hub.pull import pull_rank

    given = [f.metadata["flag"] for name, f in fields_of(RankBudget).items() if getattr(budget, name) is not None]
    if rank != "auto" and given:
        raise click.UsageError(f"{', '.join(given)} only apply with --rank auto")
    result = pull_rank(repo_id, rank, output, budget, revision=revision, endpoint=hub.endpoint, token=hub.token, force=force)
    if as_json:
        echo_json(result.to_dict())
        return
    click.echo(f"rank {result.rank} of {repo_id} @ {result.commit[:10]} -> {result.path} "
               f"({result.params:,} params, {human_bytes(result.bytes)}; sha256 verified)")
    if rank == "auto":
        click.echo(f"chosen: {result.reason}")
