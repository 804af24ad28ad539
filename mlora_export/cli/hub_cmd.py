"""``mlora-export bundle``, ``push-hub`` and ``pull``: variant bundles, locally and on the Hub."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

import click

from ._errors import handle_errors
from ._options import BarProgress, RankList, echo_json, echo_table, force_option, json_option

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3}


class ByteSize(click.ParamType):
    """``--max-bytes 50MB`` / ``1.5GiB`` / ``123456`` → bytes (int)."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
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
        try:
            k = int(str(value))
        except ValueError:
            self.fail(f"{value!r} is not a rank; give an integer such as 8, or 'auto' with --max-bytes/--max-params", param, ctx)
        if k < 1:
            self.fail(f"rank {k} must be at least 1", param, ctx)
        return k


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _bundle_options(func: Any) -> Any:
    for opt in reversed([
        click.option("--ranks", type=RankList(), default="all", show_default=True, help="Comma-separated ranks (e.g. 4,8,16) or 'all' for the train ranks."),
        click.option("--scale-mode", type=click.Choice(["baked", "native"]), default="baked", show_default=True, help="How the slices express s(k) (see `mlora-export slice --help`)."),
        click.option("--base-model", help="Hub id of the base model for the card (default: the one recorded in the adapter)."),
        click.option("--license", "license_id", help="License id for the card, e.g. apache-2.0."),
        click.option("--default-rank", type=click.IntRange(min=1),
                     help="Rank also written at the bundle's root, for PeftModel.from_pretrained(base, repo).  [default: the best by the recorded evaluation, else the largest]"),
        click.option("--with-onnx", "onnx_base", type=click.Path(path_type=str), metavar="BASE_DIR",
                     help="Also export a dynamic-rank ONNX model (verified in ONNX Runtime) into onnx/, built on the local base model folder BASE_DIR."),
    ]):
        func = opt(func)
    return func


def _build(adapter: str, ranks: Any, output: Path, *, scale_mode: str, base_model: str | None, license_id: str | None,
           repo_id: str | None, force: bool, onnx_base: str | None = None, default_rank: int | None = None,
           gguf_base: str | None = None) -> Any:
    from ..converters.hub.bundle import write_bundle
    from ..fs import check_output_path

    check_output_path(output, force)
    with tempfile.TemporaryDirectory(prefix="mlora-onnx-") as tmp:
        onnx_dir = None
        if onnx_base is not None:
            from ..converters.onnx import export_onnx

            with BarProgress("onnx export", unit="step") as bar:
                onnx_dir = export_onnx(adapter, onnx_base, Path(tmp) / "onnx", progress=bar).path
        gguf_dir = None
        if gguf_base is not None:
            from ..converters.gguf import export_gguf

            gguf_dir = Path(tmp) / "gguf"
            export_gguf(adapter, ranks, gguf_dir, base_model=gguf_base, scale_mode=scale_mode)
        with BarProgress("bundling") as bar:
            return write_bundle(adapter, ranks, output, scale_mode=scale_mode, base_model=base_model, license_id=license_id,
                                repo_id=repo_id, onnx_dir=onnx_dir, default_rank=default_rank, force=force, progress=bar,
                                gguf_dir=gguf_dir)


@click.command("bundle")
@click.argument("adapter", type=click.Path(path_type=str))
@click.option("--output", "-o", required=True, type=click.Path(path_type=str), help="Bundle folder to create (same layout as the Hub repo).")
@_bundle_options
@click.option("--gguf", "gguf_base", type=click.Path(path_type=str), metavar="BASE",
              help="Also write each rank's llama.cpp LoRA adapter, r{k}/adapter.gguf; BASE: the local base model folder or its config.json (for the architecture).")
@click.option("--repo-id", help="Repo id to show in the card's snippets (default: a placeholder).")
@force_option
@json_option
@handle_errors
def bundle(adapter: str, output: str, ranks: Any, scale_mode: str, base_model: str | None, license_id: str | None,
           default_rank: int | None, onnx_base: str | None, gguf_base: str | None, repo_id: str | None, force: bool, as_json: bool) -> None:
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
    b = _build(adapter, ranks, Path(output), scale_mode=scale_mode, base_model=base_model, license_id=license_id, repo_id=repo_id,
               force=force, onnx_base=onnx_base, default_rank=default_rank, gguf_base=gguf_base)
    if as_json:
        echo_json({"path": str(b.path), "ranks": [r.__dict__ for r in b.ranks], "files": [f.__dict__ for f in b.files], "bytes": b.total_bytes})
        return
    echo_table(["rank", "folder", "params", "size"], [[r.rank, r.path + "/", r.params, _human(r.bytes)] for r in b.ranks])
    click.echo(f"wrote {b.path} ({len(b.files) + 1} files, {_human(b.total_bytes)})")


@click.command("push-hub")
@click.argument("source", type=click.Path(path_type=str))
@click.option("--repo-id", required=True, help="Hub repo to push to, namespace/name (created if needed).")
@_bundle_options
@click.option("--private", is_flag=True, help="Create the repo as private; refuses to push to an existing public repo.")
@click.option("--revision", default="main", show_default=True, help="Branch to commit to (created from main if needed).")
@click.option("--branches", is_flag=True, help="Also make a branch r{k} per rank whose root holds that rank's adapter.")
@click.option("--dry-run", is_flag=True, help="Build the bundle and list its files and sizes; no network call.")
@click.option("--token", help="Hub token (default: HF_TOKEN, then the `hf auth login` cache). Never printed.")
@click.option("--endpoint", help="Hub URL for private deployments and mirrors (default: HF_ENDPOINT, then huggingface.co).")
@click.option("--commit-message", help="Commit summary (default: names the ranks).")
@json_option
@handle_errors
def push_hub(source: str, repo_id: str, ranks: Any, scale_mode: str, base_model: str | None, license_id: str | None,
             default_rank: int | None, onnx_base: str | None, private: bool, revision: str, branches: bool, dry_run: bool, token: str | None, endpoint: str | None,
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
    from ..converters.hub.bundle import Bundle, is_bundle
    from ..converters.hub.push import check_branch, check_repo_id, dry_run_listing, push_bundle

    check_repo_id(repo_id)
    check_branch(revision)
    if not dry_run:
        from ..converters.hub.remote import resolve_endpoint

        resolve_endpoint(endpoint)  # a malformed --endpoint/HF_ENDPOINT fails before the bundle is built
    with tempfile.TemporaryDirectory(prefix="mlora-bundle-") as tmp:
        if is_bundle(source):
            ignored = [name for name, value in (("--ranks", ranks != "all"), ("--base-model", base_model), ("--license", license_id),
                                                ("--default-rank", default_rank), ("--with-onnx", onnx_base),
                                                ("--scale-mode", scale_mode != "baked")) if value]
            if ignored:
                click.echo(f"warning: {source} is already a bundle; {', '.join(ignored)} ignored (rebuild it with `mlora-export bundle` to change them)", err=True)
            b = Bundle.load(source, verify=True)
        else:
            b = _build(source, ranks, Path(tmp) / "bundle", scale_mode=scale_mode, base_model=base_model,
                       license_id=license_id, repo_id=repo_id, force=False, onnx_base=onnx_base, default_rank=default_rank)
        if dry_run:
            listing = dry_run_listing(b, branches)
            if as_json:
                echo_json({"repo_id": repo_id, "revision": revision, "dry_run": True, "files": listing,
                           "bytes": sum(f["size"] for f in listing if "branch" not in f)})
                return
            echo_table(["file", "size"], [[f["path"], _human(f["size"])] for f in listing])
            click.echo(f"dry run: would push {sum('branch' not in f for f in listing)} files "
                       f"({_human(sum(f['size'] for f in listing if 'branch' not in f))}) to {repo_id}@{revision}; nothing was sent")
            return
        result = push_bundle(b.path, repo_id, private=private, revision=revision, branches=branches, token=token,
                             endpoint=endpoint, commit_message=commit_message)
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
@click.option("--rank", required=True, type=RankOrAuto(), help="Rank to fetch, or 'auto' for the largest that fits --max-bytes/--max-params.")
@click.option("--output", "-o", required=True, type=click.Path(path_type=str), help="Folder to create: a plain PEFT adapter.")
@click.option("--revision", default="main", show_default=True, help="Branch, tag or commit to pull from.")
@click.option("--max-bytes", type=ByteSize(), help="With --rank auto: the download size limit (e.g. 50MB, 1GiB).")
@click.option("--max-params", type=click.IntRange(min=1), help="With --rank auto: the parameter count limit.")
@click.option("--token", help="Hub token (default: HF_TOKEN, then the `hf auth login` cache). Never printed.")
@click.option("--endpoint", help="Hub URL for private deployments and mirrors (default: HF_ENDPOINT, then huggingface.co).")
@force_option
@json_option
@handle_errors
def pull(repo_id: str, rank: Any, output: str, revision: str, max_bytes: int | None, max_params: int | None,
         token: str | None, endpoint: str | None, force: bool, as_json: bool) -> None:
    """Fetch one rank of a variant bundle from the Hub, sha256-verified against its manifest.

    Only manifest.json, matryoshka_config.json and the rank's folder are downloaded. OUTPUT is
    a plain PEFT adapter folder; nothing is written unless every file checks out.

    \b
    Example:
      mlora-export pull my-org/llama-1b-gsm8k-mlora --rank 8 --output ./r8
      mlora-export pull my-org/llama-1b-gsm8k-mlora --rank auto --max-bytes 20MB --output ./adapter
    """
    from ..converters.hub.pull import pull_rank

    if rank != "auto" and (max_bytes is not None or max_params is not None):
        raise click.UsageError("--max-bytes/--max-params only apply with --rank auto")
    result = pull_rank(repo_id, rank, output, revision=revision, endpoint=endpoint, token=token,
                       max_bytes=max_bytes, max_params=max_params, force=force)
    if as_json:
        echo_json(result.to_dict())
        return
    click.echo(f"rank {result.rank} of {repo_id} @ {result.commit[:10]} -> {result.path} "
               f"({result.params:,} params, {_human(result.bytes)}; sha256 verified)")
