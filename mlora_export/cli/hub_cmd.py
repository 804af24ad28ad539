"""``mlora-export bundle``, ``push-hub`` and ``pull``: variant bundles, locally and on the Hub."""

from __future__ import annotations

import re
from typing import Any

import click

from ..evaluation.scoring import METRICS
from ..units import human_bytes
from ..validate import ascii_int
from ._errors import handle_errors
from ._options import (
    FLOAT,
    AsciiFloatRange,
    AsciiIntRange,
    BarProgress,
    RankList,
    echo_json,
    echo_table,
    force_option,
    json_option,
    scale_mode_option,
)

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



#: The flag of each bundle-building option of :func:`~mlora_export.converters.hub.push.publish`.
_BUNDLE_FLAGS = {"ranks": "--ranks", "base_model_id": "--base-model-id", "license_id": "--license", "default_rank": "--default-rank",
                 "onnx_base": "--with-onnx", "measure_latency": "--measure-latency", "scale_mode": "--scale-mode"}


def _bundle_options(func: Any) -> Any:
    for opt in reversed([
        click.option("--ranks", type=RankList(), default="all", show_default=True, help="Comma-separated ranks (e.g. 4,8,16) or 'all' for the train ranks."),
        scale_mode_option("How the slices express s(k) (see `mlora-export slice --help`)."),
        click.option("--base-model-id", "--base-model", "base_model",
                     help="Hub id of the base model for the card (default: the one recorded in the adapter); only a name, nothing is "
                          "read from it (--base-model is its older name)."),
        click.option("--license", "license_id", help="License id for the card, e.g. apache-2.0."),
        click.option("--default-rank", type=AsciiIntRange(min=1),
                     help="Rank also written at the bundle's root, for PeftModel.from_pretrained(base, repo).  [default: the best by the recorded evaluation, else the largest]"),
        click.option("--with-onnx", "onnx_base", type=click.Path(path_type=str), metavar="BASE_DIR",
                     help="Also export a dynamic-rank ONNX model (verified in ONNX Runtime) into onnx/, built on the base model BASE_DIR "
                          "(a local folder or a Hub model id)."),
        click.option("--measure-latency", is_flag=True,
                     help="With --with-onnx: time every rank in ONNX Runtime on this machine; record it (and the machine) in the manifest for pull --max-latency-ms."),
    ]):
        func = opt(func)
    return func


def _local_bases(output: str | None, force: bool, onnx_base: str | None, gguf_base: str | None) -> tuple[str | None, str | None]:
    """``--with-onnx`` and ``--gguf`` bases given as Hub ids, downloaded (the output checked first)."""
    from ..base import resolve_base_model
    from ..fs import check_output_path

    if output is not None and (onnx_base is not None or gguf_base is not None):
        check_output_path(output, force)
    return (None if onnx_base is None else str(resolve_base_model(onnx_base)),
            None if gguf_base is None else str(resolve_base_model(gguf_base, config_only=True)))


@click.command("bundle")
@click.argument("adapter", type=click.Path(path_type=str))
@click.option("--output", "-o", required=True, type=click.Path(path_type=str), help="Bundle folder to create (same layout as the Hub repo).")
@_bundle_options
@click.option("--gguf", "gguf_base", type=click.Path(path_type=str), metavar="BASE",
              help="Also write each rank's llama.cpp LoRA adapter, r{k}/adapter.gguf; BASE: the base model folder or its config.json, "
                   "or a Hub model id (for the architecture).")
@click.option("--repo-id", help="Repo id to show in the card's snippets (default: a placeholder).")
@force_option
@json_option
@handle_errors
def bundle(adapter: str, output: str, ranks: Any, scale_mode: str, base_model: str | None, license_id: str | None,
           default_rank: int | None, onnx_base: str | None, measure_latency: bool, gguf_base: str | None, repo_id: str | None, force: bool, as_json: bool) -> None:
    """Write a variant bundle of a nested ADAPTER to a local folder (no network).

    The folder holds README.md (model card), matryoshka_config.json, manifest.json (every
    file's size and sha256), nested/ and one PEFT slice r{k}/ per rank.

    \b
    Example:
      mlora-export bundle ./nested --ranks 4,8,16,32 --output ./bundle
      mlora-export bundle ./nested --ranks 8,16 --with-onnx ./base-model --output ./bundle
      mlora-export bundle ./nested --ranks 8,16 --gguf ./base-model --output ./bundle
    """
    if repo_id is not None:
        from ..converters.hub.push import check_repo_id

        check_repo_id(repo_id)
    from ..converters.hub.bundle import write_bundle

    onnx_base, gguf_base = _local_bases(output, force, onnx_base, gguf_base)
    with BarProgress("onnx export", unit="step") as export_bar, BarProgress("bundling") as bar:
        b = write_bundle(adapter, ranks, output, scale_mode=scale_mode, base_model_id=base_model, license_id=license_id,
                         repo_id=repo_id, onnx_base=onnx_base, default_rank=default_rank, measure_latency=measure_latency,
                         gguf_base=gguf_base, force=force, progress=bar,
                         export_progress=export_bar)
    if as_json:
        echo_json({"path": str(b.path), "ranks": [r.__dict__ for r in b.ranks], "files": [f.__dict__ for f in b.files], "bytes": b.total_bytes})
        return
    echo_table(["rank", "folder", "params", "size"], [[r.rank, r.path + "/", r.params, human_bytes(r.bytes)] for r in b.ranks])
    click.echo(f"wrote {b.path} ({len(b.files) + 1} files, {human_bytes(b.total_bytes)})")


@click.command("push-hub")
@click.argument("source", type=click.Path(path_type=str))
@click.option("--repo-id", required=True, help="Hub repo to push to, namespace/name (created if needed).")
@_bundle_options
@click.option("--private", is_flag=True, help="Create the repo as private; refuses to push to an existing public repo.")
@click.option("--revision", default="main", show_default=True, help="Branch to commit to (created from main if needed).")
@click.option("--branches", is_flag=True, help="Also make a branch r{k} per rank whose root holds that rank's adapter.")
@click.option("--dry-run", is_flag=True, help="Build the bundle and list its files and sizes; no network call (but a Hub id given to --with-onnx is downloaded).")
@click.option("--token", help="Hub token (default: HF_TOKEN, then the `hf auth login` cache). Never printed.")
@click.option("--endpoint", help="Hub URL for private deployments and mirrors (default: HF_ENDPOINT, then huggingface.co).")
@click.option("--commit-message", help="Commit summary (default: names the ranks).")
@json_option
@handle_errors
def push_hub(source: str, repo_id: str, ranks: Any, scale_mode: str, base_model: str | None, license_id: str | None,
             default_rank: int | None, onnx_base: str | None, measure_latency: bool, private: bool, revision: str, branches: bool, dry_run: bool, token: str | None, endpoint: str | None,
             commit_message: str | None, as_json: bool) -> None:
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

    onnx_base, _ = _local_bases(None, False, onnx_base, None)
    with BarProgress("onnx export", unit="step") as export_bar, BarProgress("bundling") as bar:
        published = publish(source, repo_id, ranks=ranks, scale_mode=scale_mode, base_model_id=base_model, license_id=license_id,
                            default_rank=default_rank, onnx_base=onnx_base, measure_latency=measure_latency, private=private, revision=revision, branches=branches,
                            dry_run=dry_run, token=token, endpoint=endpoint, commit_message=commit_message, progress=bar,
                            export_progress=export_bar)
    if published.ignored:
        flags = ", ".join(_BUNDLE_FLAGS[name] for name in published.ignored)
        click.echo(f"warning: {source} is already a bundle; {flags} ignored (rebuild it with `mlora-export bundle` to change them)", err=True)
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


@click.command("pull")
@click.argument("repo_id")
@click.option("--rank", required=True, type=RankOrAuto(),
              help="Rank to fetch, or 'auto' to choose it by the limits and scores below.")
@click.option("--output", "-o", required=True, type=click.Path(path_type=str), help="Folder to create: a plain PEFT adapter.")
@click.option("--revision", default="main", show_default=True, help="Branch, tag or commit to pull from.")
@click.option("--max-bytes", type=ByteSize(), help="With --rank auto: the download size limit (e.g. 50MB, 1GiB).")
@click.option("--max-params", type=AsciiIntRange(min=1), help="With --rank auto: the parameter count limit.")
@click.option("--max-latency-ms", type=AsciiFloatRange(min=0, min_open=True),
              help="With --rank auto: the per-forward latency limit, as the bundle recorded it (bundle --measure-latency).")
@click.option("--min-score", type=FLOAT,
              help="With --rank auto: the smallest rank whose recorded score reaches this (percent for accuracy and exact-match).")
@click.option("--within", type=AsciiFloatRange(min=0),
              help="With --rank auto: the smallest rank within this many points of the best recorded score.")
@click.option("--metric", type=click.Choice(list(METRICS)), help="The recorded evaluation --min-score/--within judge by (default: the first recorded).")
@click.option("--token", help="Hub token (default: HF_TOKEN, then the `hf auth login` cache). Never printed.")
@click.option("--endpoint", help="Hub URL for private deployments and mirrors (default: HF_ENDPOINT, then huggingface.co).")
@force_option
@json_option
@handle_errors
def pull(repo_id: str, rank: Any, output: str, revision: str, max_bytes: int | None, max_params: int | None,
         max_latency_ms: float | None, min_score: float | None, within: float | None, metric: str | None,
         token: str | None, endpoint: str | None, force: bool, as_json: bool) -> None:
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

    limits = {"--max-bytes": max_bytes, "--max-params": max_params, "--max-latency-ms": max_latency_ms,
              "--min-score": min_score, "--within": within, "--metric": metric}
    if rank != "auto" and any(v is not None for v in limits.values()):
        raise click.UsageError(f"{', '.join(k for k, v in limits.items() if v is not None)} only apply with --rank auto")
    result = pull_rank(repo_id, rank, output, revision=revision, endpoint=endpoint, token=token,
                       max_bytes=max_bytes, max_params=max_params, max_latency_ms=max_latency_ms,
                       min_score=min_score, within=within, metric=metric, force=force)
    if as_json:
        echo_json(result.to_dict())
        return
    click.echo(f"rank {result.rank} of {repo_id} @ {result.commit[:10]} -> {result.path} "
               f"({result.params:,} params, {human_bytes(result.bytes)}; sha256 verified)")
    if rank == "auto":
        click.echo(f"chosen: {result.reason}")
