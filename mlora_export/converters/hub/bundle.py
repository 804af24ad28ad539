"""Variant bundles (docs/design.md §2): one folder holding the nested adapter and a PEFT slice per rank.

Layout (the same locally and in a Hub repo)::

    README.md                 model card (see :mod:`.card`)
    matryoshka_config.json    the nested adapter's config (byte copy)
    manifest.json             every file's path, size, sha256; every rank's folder and numbers
    adapter_config.json       the default rank's PEFT adapter at the root, so that
    adapter_model.safetensors   ``PeftModel.from_pretrained(base, repo)`` works without a subfolder
    nested/                   the full nested adapter (its three files)
    r{k}/                     one PEFT slice per requested rank (:func:`~..slice.write_slices`)
    onnx/                     optional ONNX export(s)

Every ``adapter_config.json`` of a bundle names the base model by its Hub id, or not at all: a
local path of the machine that trained the adapter means nothing on another one.

A bundle is deterministic: the same nested adapter and options give byte-identical files, so
re-pushing an unchanged bundle uploads nothing (:mod:`.push`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...adapter import (
    BUNDLE_MANIFEST_NAME,
    BUNDLE_NESTED_DIR,
    CONFIG_NAME,
    PEFT_CONFIG_NAME,
    WEIGHTS_NAME,
    NestedAdapter,
    write_json,
)
from ...adapter.config import EVALUATION_KEY, RecordedEvaluation, recorded_evaluations
from ...adapter.ranks import SCALE_MODES, check_scale_mode, resolve_ranks
from ...errors import (
    ConfigError,
    ExportError,
    IntegrityError,
    InvalidAdapterError,
    RankError,
)
from ...fs import atomic_output_dir, check_free_space, check_output_path
from ...io.jsonio import read_json
from ...params import merge_legacy, param
from ...progress import Progress
from ...provenance import created_by
from ...validate import ascii_int, is_finite_real, is_int
from ..slice import write_slices
from .card import check_license, hub_base_model, render_card

logger = logging.getLogger(__name__)

BUNDLE_FORMAT = "mlora-bundle/1"
MANIFEST_NAME = BUNDLE_MANIFEST_NAME
README_NAME = "README.md"
NESTED_DIR = BUNDLE_NESTED_DIR
ONNX_DIR = "onnx"
#: A rank folder's llama.cpp LoRA adapter (``bundle --gguf``).
GGUF_NAME = "adapter.gguf"


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def rank_dir(k: int) -> str:
    """The bundle folder of rank ``k``: ``r{k}``."""
    return f"r{k}"


@dataclass(frozen=True)
class BundleFile:
    """One file of a bundle, as recorded in ``manifest.json``."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class BundleRank:
    """One rank of a bundle: its folder, parameter count, download size and metrics."""

    rank: int
    path: str
    params: int
    bytes: int
    metrics: dict[str, float]


class Bundle:
    """A bundle folder on disk with its parsed manifest; open one with :meth:`load`."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest

    @property
    def files(self) -> list[BundleFile]:
        """Every file but ``manifest.json`` itself, sorted by path."""
        return [BundleFile(f["path"], f["size"], f["sha256"]) for f in self.manifest["files"]]

    @property
    def ranks(self) -> list[BundleRank]:
        return [BundleRank(r["rank"], r["path"], r["params"], r["bytes"], dict(r.get("metrics") or {})) for r in self.manifest["ranks"]]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files) + (self.path / MANIFEST_NAME).stat().st_size

    def all_paths(self) -> list[str]:
        """Every path to upload, ``manifest.json`` included, sorted."""
        return sorted([f.path for f in self.files] + [MANIFEST_NAME])

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, verify: bool = True) -> "Bundle":
        """Open a bundle folder; with ``verify`` check every file's size and sha256 against the manifest.

        Raises:
            InvalidAdapterError: no or invalid ``manifest.json``.
            IntegrityError: a listed file is missing or differs from the manifest.
        """
        root = Path(path)
        manifest = read_manifest(root / MANIFEST_NAME)
        if verify:
            for f in manifest["files"]:
                check_file(root / f["path"], f, label=f["path"])
        return cls(root, manifest)


def read_manifest(path: Path) -> dict[str, Any]:
    """Read and validate a ``manifest.json``.

    Raises:
        InvalidAdapterError: missing, not JSON, another format, or missing fields.
    """
    if not path.exists():
        raise InvalidAdapterError(f"{path}: not found; is {str(path.parent)!r} a bundle written by `mlora-export bundle`?", path=path)
    return check_manifest(read_json(path, InvalidAdapterError, what="manifest"), str(path))


_SHA256_RE = re.compile(r"[0-9a-f]{64}")
#: Longest path a manifest may name (the Hub's own limit is far below what a file system allows).
MAX_PATH_CHARS = 1024


def safe_relpath(path: Any, source: str, what: str = "file path") -> str:
    """Return ``path`` if it is a plain relative POSIX path inside a folder, else raise.

    A path from a remote or a manifest is untrusted: it must be a non-empty string of at most
    :data:`MAX_PATH_CHARS` characters, with no leading ``/``, no backslash, no control
    character, no empty, ``.`` or ``..`` segment (so ``a//b``, ``/etc/x``, ``a/../b`` are refused)
    and no segment over 255 bytes. Joined to any folder it names a place inside that folder.

    Raises:
        InvalidAdapterError: naming ``source`` and the path.
    """
    if not isinstance(path, str) or not path:
        raise InvalidAdapterError(f"{source}: {what} {json.dumps(path)[:80]} is not a non-empty string; the bundle is broken")
    shown = json.dumps(path[:120])
    if len(path) > MAX_PATH_CHARS:
        raise InvalidAdapterError(f"{source}: {what} {shown}… is {len(path)} characters long; the bundle is broken")
    if "\\" in path or any(ord(c) < 32 or ord(c) == 127 for c in path):
        raise InvalidAdapterError(f"{source}: {what} {shown} holds a backslash or a control character; the bundle is broken")
    parts = path.split("/")
    if path.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise InvalidAdapterError(f"{source}: {what} {shown} is not a plain relative path (absolute, empty, '.' or '..' segments); it could write outside the folder")
    if any(len(part.encode()) > 255 for part in parts):
        raise InvalidAdapterError(f"{source}: {what} {shown} has a segment over 255 bytes; the bundle is broken")
    return path


def check_manifest(data: Any, source: str) -> dict[str, Any]:
    """Validate the structure of a parsed manifest; return it.

    Every file path must be a safe relative path (:func:`safe_relpath`), listed once, and no
    file may sit where another is a folder; ranks are positive integers, each listed once, with
    a safe folder path of their own.

    Raises:
        InvalidAdapterError: another format, missing/ill-typed fields, unsafe paths, duplicated or
            clashing entries, naming ``source``.
    """
    if not isinstance(data, dict) or data.get("format") != BUNDLE_FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise InvalidAdapterError(f"{source}: format is {str(found)[:40]!r}, expected {BUNDLE_FORMAT!r}; this is not an mlora-export variant bundle")
    for key, typ in (("files", list), ("ranks", list), ("nested", dict), ("config", dict)):
        if not isinstance(data.get(key), typ):
            raise InvalidAdapterError(f"{source}: field {key!r} is missing or not a {typ.__name__}; re-create the bundle")

    def nonneg(v: Any) -> bool:
        return is_int(v) and v >= 0

    paths: set[str] = set()
    for f in data["files"]:
        if not (isinstance(f, dict) and isinstance(f.get("path"), str) and nonneg(f.get("size"))
                and isinstance(f.get("sha256"), str) and _SHA256_RE.fullmatch(f["sha256"])):
            raise InvalidAdapterError(f"{source}: file entry {json.dumps(f)[:120]} needs path, size (a non-negative integer) and sha256 (64 hex digits)")
        path = safe_relpath(f["path"], source)
        if path in paths:
            raise InvalidAdapterError(f"{source}: file {path!r} is listed twice; the bundle is broken")
        if path == MANIFEST_NAME:
            raise InvalidAdapterError(f"{source}: lists {MANIFEST_NAME} itself as a file; the bundle is broken")
        paths.add(path)
    for path in paths:
        parts = path.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in paths:
                raise InvalidAdapterError(f"{source}: {'/'.join(parts[:i])!r} is listed as a file and as the folder of {path!r}; the bundle is broken")
    ranks: set[int] = set()
    folders: set[str] = set()
    for r in data["ranks"]:
        if not (isinstance(r, dict) and is_int(r.get("rank")) and r["rank"] >= 1
                and isinstance(r.get("path"), str) and nonneg(r.get("params")) and nonneg(r.get("bytes"))):
            raise InvalidAdapterError(f"{source}: rank entry {json.dumps(r)[:120]} needs rank (a positive integer), path, params and bytes")
        folder = safe_relpath(r["path"], source, what="rank folder").rstrip("/")
        if r["rank"] in ranks:
            raise InvalidAdapterError(f"{source}: rank {r['rank']} is listed twice; the bundle is broken")
        if folder in folders:
            raise InvalidAdapterError(f"{source}: folder {folder!r} is given for two ranks; the bundle is broken")
        if folder in paths:
            raise InvalidAdapterError(f"{source}: rank folder {folder!r} is listed as a file; the bundle is broken")
        metrics = r.get("metrics", {})
        if not (isinstance(metrics, dict) and all(isinstance(m, str) and is_finite_real(v) for m, v in metrics.items())):
            raise InvalidAdapterError(f"{source}: rank {r['rank']}'s metrics must map metric names to finite numbers; the bundle is broken")
        ranks.add(r["rank"])
        folders.add(folder)
    _check_rank_numbers(data, source)
    latency = data.get("latency")
    if latency is not None and not (isinstance(latency, dict) and isinstance(latency.get("ms"), dict)
                                    and all(ascii_int(k) is not None and is_finite_real(v) and v >= 0 for k, v in latency["ms"].items())):
        raise InvalidAdapterError(f"{source}: 'latency' must hold 'ms', a map of rank (ASCII digits) to non-negative milliseconds; the bundle is broken")
    if latency is not None and latency.get("machine") is not None and not (
            isinstance(latency["machine"], dict) and all(isinstance(k, str) for k in latency["machine"])):
        raise InvalidAdapterError(f"{source}: 'latency.machine' must be an object describing the machine; the bundle is broken")
    _check_evaluation_section(data.get("evaluation"), source)
    return data


def _check_rank_numbers(data: Mapping[str, Any], source: str) -> None:
    """A rank's ``bytes`` must be what the files the manifest lists in its folder add up to (so
    the download, which checks every file's size, verifies it), and its ``params`` must be ``k``
    times the same per-rank count for every rank (so checking one rank's tensors verifies all).

    Raises:
        InvalidAdapterError: naming the rank and the numbers that disagree.
    """
    per_rank: tuple[int, int] | None = None  # (params, rank) of the first rank, to compare the others with
    for r in data["ranks"]:
        prefix = r["path"].rstrip("/") + "/"
        listed = sum(f["size"] for f in data["files"] if f["path"].startswith(prefix))
        if r["bytes"] != listed:
            raise InvalidAdapterError(f"{source}: rank {r['rank']} gives {r['bytes']:,} bytes but the files listed in {prefix} "
                                      f"add up to {listed:,}; the bundle is broken")
        if per_rank is not None and r["params"] * per_rank[1] != per_rank[0] * r["rank"]:
            raise InvalidAdapterError(f"{source}: rank {r['rank']} gives {r['params']:,} parameters, not {r['rank']} × "
                                      f"{per_rank[0] / per_rank[1]:g} as rank {per_rank[1]} does; the bundle is broken")
        per_rank = per_rank or (r["params"], r["rank"])


def _check_evaluation_section(evaluation: Any, source: str) -> None:
    """The manifest's ``evaluation`` (optional): per metric, ``higher_is_better`` a boolean or null,
    ``aurac`` an object of finite numbers or null.

    Raises:
        InvalidAdapterError: another type, naming the field.
    """
    if evaluation is None:
        return
    if not isinstance(evaluation, dict):
        raise InvalidAdapterError(f"{source}: 'evaluation' must be an object of metrics; the bundle is broken")
    for metric, entry in evaluation.items():
        if not isinstance(entry, dict):
            raise InvalidAdapterError(f"{source}: evaluation[{metric[:40]!r}] must be an object; the bundle is broken")
        higher = entry.get("higher_is_better")
        if higher is not None and not isinstance(higher, bool):
            raise InvalidAdapterError(f"{source}: evaluation[{metric[:40]!r}].higher_is_better must be true or false, "
                                      f"found {json.dumps(higher)[:40]}; the bundle is broken")
        aurac = entry.get("aurac")
        if aurac is not None and not (isinstance(aurac, dict) and all(is_finite_real(v) for v in aurac.values())):
            raise InvalidAdapterError(f"{source}: evaluation[{metric[:40]!r}].aurac must map names to finite numbers; the bundle is broken")


def check_file(path: Path, entry: Mapping[str, Any], *, label: str, error: type[IntegrityError] = IntegrityError, hint: str = "re-create the bundle") -> None:
    """Raise ``error`` naming ``label`` when ``path`` is missing or its size/sha256 differ from ``entry``."""
    if path.is_symlink():
        raise error(f"{label}: is a symbolic link, which a bundle may not hold; {hint}")
    if not path.is_file():
        raise error(f"{label}: listed in manifest.json but missing; {hint}")
    size = path.stat().st_size
    if size != entry["size"]:
        raise error(f"{label}: size {size} bytes does not match manifest.json ({entry['size']} bytes); {hint}")
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        raise error(f"{label}: sha256 {digest[:12]}… does not match manifest.json ({entry['sha256'][:12]}…); {hint}")


def _metrics_by_rank(recorded: Mapping[str, RecordedEvaluation]) -> dict[int, dict[str, float]]:
    """``{rank: {metric: score}}`` from the typed recorded evaluations of a nested config."""
    out: dict[int, dict[str, float]] = {}
    for metric, rec in recorded.items():
        for k, score in rec.scores.items():
            out.setdefault(k, {})[metric] = score
    return out


def higher_is_better(rec: RecordedEvaluation) -> bool:
    """Whether higher scores are better for ``rec``: as recorded, else every metric but ``loss``."""
    return rec.higher_is_better if rec.higher_is_better is not None else rec.metric != "loss"


def choose_default_rank(ranks: Sequence[int], recorded: Mapping[str, RecordedEvaluation]) -> tuple[int, str]:
    """``(rank, why)``: the rank a bundle serves from its root. The best by the first recorded
    evaluation that scores one of ``ranks`` (ties: the smaller rank), else the largest of ``ranks``."""
    for metric, rec in recorded.items():
        scores = {k: v for k, v in rec.scores.items() if k in ranks}
        if scores:
            sign = 1.0 if higher_is_better(rec) else -1.0
            return min(scores, key=lambda k: (-sign * scores[k], k)), f"best recorded {metric}"
    return max(ranks), "largest rank"


def _portable_peft_config(path: Path, hub_base: str | None) -> None:
    """Set ``base_model_name_or_path`` of the ``adapter_config.json`` at ``path`` to ``hub_base`` (``None``: unset)."""
    cfg = read_json(path, InvalidAdapterError, what="adapter config")
    cfg["base_model_name_or_path"] = hub_base
    write_json(path, cfg)


def _folder_files(root: Path, sub: str) -> list[Path]:
    return sorted(p for p in (root / sub).rglob("*") if p.is_file())


def _exports(
    adapter: NestedAdapter | str | os.PathLike[str], ranks: Iterable[int] | str, tmp: Path, opts: BundleOptions, export_progress: Progress | None,
) -> tuple[Any, Any]:
    """Run the exports a bundle was asked to carry into ``tmp``: an ONNX model (``opts.onnx_base``),
    GGUF files (``opts.gguf_base``); return the folders to carry (``opts.onnx_dir``/``gguf_dir`` otherwise)."""
    onnx_dir, gguf_dir = opts.onnx_dir, opts.gguf_dir
    if opts.onnx_base is not None:
        from ..onnx import export_onnx

        try:
            onnx_dir = export_onnx(adapter, opts.onnx_base, tmp / ONNX_DIR, progress=export_progress).path
        except ExportError as e:
            e.option = None  # the opset is the export's default here, not an option of the bundle
            raise
    if opts.gguf_base is not None:
        from ..gguf import GgufOptions, export_gguf

        gguf_dir = tmp / "gguf"
        export_gguf(adapter, ranks, gguf_dir, GgufOptions(scale_mode=opts.scale_mode), base_model=opts.gguf_base)
    return onnx_dir, gguf_dir


def _finish_rank(
    tmp: Path, nested: NestedAdapter, res: Any, hub_base: str | None, gguf_dir: Any, metrics: dict[str, float], latency: dict[str, Any] | None,
) -> dict[str, Any]:
    """Make a written slice folder portable (its source relative, the Hub id as its base), add its
    GGUF file, and return its manifest entry."""
    k, folder = res.rank, res.path
    # record the source relative to the bundle (deterministic; no local path on the Hub)
    slice_cfg = read_json(folder / CONFIG_NAME, InvalidAdapterError, what="slice config")
    slice_cfg["source"]["path"] = f"../{NESTED_DIR}"
    write_json(folder / CONFIG_NAME, slice_cfg)
    _portable_peft_config(folder / PEFT_CONFIG_NAME, hub_base)
    gguf_entry = {}
    if gguf_dir is not None:
        shutil.copyfile(Path(gguf_dir) / f"r{k}.gguf", folder / GGUF_NAME)
        gguf_entry = {"gguf": f"{rank_dir(k)}/{GGUF_NAME}"}
    return {
        "rank": k,
        "path": rank_dir(k),
        "params": res.params,
        "bytes": sum(p.stat().st_size for p in _folder_files(tmp, rank_dir(k))),
        "scale": res.scale,
        "trained": k in nested.config.train_ranks,
        "metrics": metrics,
        **({"latency_ms": latency["ms"][str(k)]} if latency else {}),
        **gguf_entry,
    }


def _aurac(value: Any) -> dict[str, float] | None:
    """A recorded AURAC (``{"v1": …, "v2": …}``) when it is an object of finite numbers, else ``None``."""
    if isinstance(value, dict) and all(isinstance(k, str) and is_finite_real(v) for k, v in value.items()):
        return {k: float(v) for k, v in value.items()}
    return None


def _manifest(
    nested: NestedAdapter, hub_base: str | None, scale_mode: str, rank_entries: list[dict[str, Any]], default: tuple[int, str],
    evaluation: Mapping[str, RecordedEvaluation], nested_bytes: int, onnx_entries: list[str], latency: dict[str, Any] | None,
) -> dict[str, Any]:
    """``manifest.json`` without its ``files`` list (added once every file is written)."""
    root_rank, chosen_by = default
    manifest: dict[str, Any] = {
        "format": BUNDLE_FORMAT,
        "created_by": created_by(),
        "base_model": hub_base,
        "task_type": nested.peft_config.get("task_type"),
        "dtype": nested.dtype,
        "scale_mode": scale_mode,
        "config": {
            "method": nested.config.method,
            "max_rank": nested.max_rank,
            "train_ranks": list(nested.config.train_ranks),
            "scaling": nested.config.scaling,
            "alpha": nested.config.alpha,
        },
        "nested": {"path": NESTED_DIR, "rank": nested.max_rank, "params": nested.params_at(nested.max_rank), "bytes": nested_bytes},
        "ranks": rank_entries,
        "default_rank": {"rank": root_rank, "path": ".", "source": rank_dir(root_rank), "chosen_by": chosen_by},
    }
    if evaluation:
        raw = nested.config.extra.get(EVALUATION_KEY) or {}
        manifest["evaluation"] = {
            m: {"metric": m, "higher_is_better": rec.higher_is_better, "aurac": _aurac(raw[m].get("aurac")),
                "data": raw[m]["data"] if isinstance(raw[m].get("data"), str) else None}
            for m, rec in evaluation.items()
        }
    if onnx_entries:
        manifest["onnx"] = onnx_entries
    if latency is not None:
        manifest["latency"] = latency
    return manifest


@dataclass(frozen=True)
class BundleOptions:
    """What a bundle carries besides its slices (:func:`write_bundle`, :func:`~.push.publish`): the
    card's names, the default rank, the scale mode, and the exports (ONNX, GGUF) made or copied in."""

    base_model_id: str | None = param(
        None, flag="--base-model-id",
        help="Hub id of the base model for the card (default: a Hub id given to --base-model, else the one recorded in "
             "the adapter); only a name, nothing is read from it.")
    license_id: str | None = param(None, flag="--license", help="License id for the card, e.g. apache-2.0.")
    repo_id: str | None = param(None, flag="--repo-id", help="Repo id to show in the card's snippets (default: a placeholder).")
    default_rank: int | None = param(
        None, flag="--default-rank", min=1,
        help="Rank also written at the bundle's root, for PeftModel.from_pretrained(base, repo).  "
             "[default: the best by the recorded evaluation, else the largest]")
    onnx_base: str | os.PathLike[str] | None = param(
        None, flag="--with-onnx",
        help="Also export a dynamic-rank ONNX model (verified in ONNX Runtime) into onnx/, built on --base-model.")
    measure_latency: bool = param(
        False, flag="--measure-latency", hint="see --measure-latency and --with-onnx",
        help="With --with-onnx: time every rank in ONNX Runtime on this machine; record it (and the machine) in the manifest "
             "for pull --max-latency-ms.")
    scale_mode: str = param("baked", flag="--scale-mode", choices=SCALE_MODES, show_default=True,
                            help="How the slices express s(k) (see `mlora-export slice --help`).")
    gguf_base: str | os.PathLike[str] | None = param(
        None, flag="--gguf",
        help="Also write each rank's llama.cpp LoRA adapter, r{k}/adapter.gguf, for the architecture of --base-model "
             "(its folder, its config.json, or a Hub id: only the config is read).")
    onnx_dir: str | os.PathLike[str] | None = param(None, help="An existing ONNX export to carry in onnx/ (instead of onnx_base).")
    gguf_dir: str | os.PathLike[str] | None = param(
        None, help="Existing GGUF files at the bundle's ranks (export_gguf's r{k}.gguf) to carry as r{k}/adapter.gguf (instead of gguf_base).")
    warn_local_base: bool = param(True, help="Warn when the card's base model is a local path (left out of the card).")


def write_bundle(
    adapter: NestedAdapter | str | os.PathLike[str],
    ranks: Iterable[int] | str,
    output: str | os.PathLike[str],
    options: BundleOptions | None = None,
    *,
    force: bool = False,
    progress: Progress | None = None,
    export_progress: Progress | None = None,
    **legacy: Any,
) -> Bundle:
    """Write the variant bundle of a nested ``adapter`` at ``ranks`` into the new folder ``output``,
    as ``options`` say (:class:`BundleOptions`).

    ``base_model_id`` overrides the base model recorded in the adapter (the card's ``base_model``
    must be a Hub repo id; a local path is left out of the card with a warning). ``repo_id`` is
    only used in the card's snippets. ``onnx_dir``, when given, is copied into ``onnx/``; with
    ``onnx_base`` (a local base model folder) a dynamic-rank ONNX model is exported and verified
    first (:func:`~mlora_export.converters.onnx.export_onnx`, reporting to ``export_progress``)
    and carried in ``onnx/`` (the one place a converter composes another, docs/design.md §3).
    ``gguf_dir`` (written by :func:`mlora_export.converters.gguf.export_gguf` at these ranks): its
    ``r{k}.gguf`` becomes ``r{k}/adapter.gguf``, the rank's llama.cpp LoRA adapter; with
    ``gguf_base`` (the base's folder or ``config.json``) they are written first
    (:func:`~mlora_export.converters.gguf.export_gguf`, in the bundle's scale mode).
    ``default_rank`` (one of ``ranks``) is also written at the bundle's root; by default the best
    rank by the adapter's recorded evaluation, else the largest (:func:`choose_default_rank`).
    ``measure_latency`` times the ONNX export (a dynamic-rank one) in ONNX Runtime at every rank on
    this machine and records the milliseconds, with the machine, in the manifest (``latency``),
    for ``pull_rank(..., RankBudget(max_latency_ms=...))``.
    ``warn_local_base=False`` silences the warning about a base model that is a local path.
    The folder appears at once, complete (written in a temporary sibling, then renamed). The
    options passed as keywords of this function still work for one release, with a ``DeprecationWarning``.

    Raises:
        InvalidAdapterError: the adapter is invalid or a plain PEFT LoRA adapter.
        RankError: a rank is outside ``[1, r]``, or ``default_rank`` is not one of ``ranks``.
        ConfigError: unknown ``scale_mode`` or an invalid license id.
        OutputExistsError: ``output`` exists and ``force`` is false.
        OutputPathError: ``output`` is, holds or lies inside the adapter or ``onnx_dir``.
        BaseModelError, UnsupportedArchitectureError: ``gguf_base`` has no readable ``config.json``,
            or llama.cpp cannot take its architecture or a target module (checked before any export runs).
    """
    opts = merge_legacy(options, BundleOptions, legacy, "write_bundle")
    check_scale_mode(opts.scale_mode)
    check_license(opts.license_id)
    ranks = ranks if isinstance(ranks, str) else list(ranks)  # used more than once below
    inputs = [adapter.path if isinstance(adapter, NestedAdapter) else adapter, opts.onnx_dir, opts.onnx_base, opts.gguf_dir, opts.gguf_base]
    check_output_path(output, force, inputs)
    exporting = opts.onnx_base is not None or opts.gguf_base is not None
    if exporting:
        _check_export_options(opts.onnx_base, opts.onnx_dir, opts.gguf_base, opts.gguf_dir)
    nested = _open_nested(adapter)
    ks = resolve_ranks(nested, ranks)
    if opts.gguf_base is not None:  # the GGUF base is read in a blink: refuse a bad one before the ONNX export runs
        from ..gguf import check_gguf_export

        check_gguf_export(nested, ks, base_model=opts.gguf_base)
    with tempfile.TemporaryDirectory(prefix="mlora-bundle-exports-") if exporting else contextlib.nullcontext() as exports:
        if exports is not None:
            onnx_dir, gguf_dir = _exports(adapter, ranks, Path(exports), opts, export_progress)
            opts = dataclasses.replace(opts, onnx_dir=onnx_dir, gguf_dir=gguf_dir)
        _write_bundle(nested, ks, output, inputs, opts, force=force, progress=progress)
    return Bundle.load(output, verify=False)


def _write_bundle(
    nested: NestedAdapter, ks: Sequence[int], output: str | os.PathLike[str], inputs: list[Any], opts: BundleOptions, *,
    force: bool, progress: Progress | None,
) -> None:
    """The writing half of :func:`write_bundle`, once its inputs are checked and its exports made
    (``opts.onnx_dir``, ``opts.gguf_dir``): the room, the default rank and latency, then every file,
    the card and the manifest last."""
    default_rank, gguf_dir = opts.default_rank, opts.gguf_dir
    base = opts.base_model_id or nested.base_model
    hub_base = hub_base_model(base)
    onnx_src = Path(opts.onnx_dir) if opts.onnx_dir is not None else None
    _check_bundle_room(output, nested, ks, onnx_src, gguf_dir)
    evaluation = recorded_evaluations(nested.config.extra.get(EVALUATION_KEY), str(nested.path / CONFIG_NAME))
    if default_rank is not None and default_rank not in ks:
        raise RankError(f"default rank {default_rank!r} is not one of the bundle's ranks {list(ks)}")
    root_rank, chosen_by = (default_rank, "option") if default_rank is not None else choose_default_rank(ks, evaluation)
    latency = _measure_latency(onnx_src, ks) if opts.measure_latency else None

    with atomic_output_dir(output, force, inputs) as tmp:
        _copy_nested(tmp, nested, hub_base)
        folders = {k: tmp / rank_dir(k) for k in ks}
        rank_entries = _write_ranks(tmp, nested, folders, opts.scale_mode, progress, hub_base, gguf_dir, _metrics_by_rank(evaluation), latency)
        for name in (PEFT_CONFIG_NAME, WEIGHTS_NAME):  # the default rank at the root
            shutil.copyfile(folders[root_rank] / name, tmp / name)
        onnx_entries = _copy_onnx(tmp, onnx_src)
        manifest = _manifest(nested, hub_base, opts.scale_mode, rank_entries, (root_rank, chosen_by), evaluation,
                             sum(p.stat().st_size for p in _folder_files(tmp, NESTED_DIR)), onnx_entries, latency)
        (tmp / README_NAME).write_text(render_card(manifest, repo_id=opts.repo_id, license_id=opts.license_id), encoding="utf-8")
        _write_manifest(tmp, manifest)
    if base and hub_base is None and opts.warn_local_base:  # after the writing: an error stays the one line on stderr
        logger.warning("base model %r is not a Hub repo id, so the model card leaves base_model out; give the Hub id of the base (base_model_id)", base)
    logger.info("bundle: wrote %s (ranks %s)", output, list(ks))


def _check_export_options(onnx_base: Any, onnx_dir: Any, gguf_base: Any, gguf_dir: Any) -> None:
    """A bundle carries an existing export or one it makes, not both.

    Raises:
        ConfigError: ``onnx_base`` with ``onnx_dir``, or ``gguf_base`` with ``gguf_dir``.
    """
    if onnx_base is not None and onnx_dir is not None:
        raise ConfigError("give an existing ONNX export (onnx_dir) or a base model to export one (onnx_base), not both", option="onnx_base")
    if gguf_base is not None and gguf_dir is not None:
        raise ConfigError("give existing GGUF files (gguf_dir) or a base model to write them (gguf_base), not both", option="gguf_base")


def _open_nested(adapter: NestedAdapter | str | os.PathLike[str]) -> NestedAdapter:
    """The nested adapter a bundle is made of (its NaN/inf check is made by ``write_slices``, alongside the writing).

    Raises:
        InvalidAdapterError: an invalid folder, or a plain PEFT LoRA adapter (only a nested adapter's prefixes are trained ranks).
    """
    nested = adapter if isinstance(adapter, NestedAdapter) else NestedAdapter.load(adapter, check_finite=False)
    if not nested.is_nested:
        raise InvalidAdapterError(
            f"{nested.path}: a plain PEFT LoRA adapter (no nested {CONFIG_NAME}); a bundle needs a nested adapter "
            "written by mlora-export training, since only its prefixes are trained ranks"
        )
    return nested


def _nested_files(nested: NestedAdapter) -> list[Path]:
    """The nested adapter's three files, as ``nested/`` holds them."""
    return [nested.path / n for n in (PEFT_CONFIG_NAME, WEIGHTS_NAME, CONFIG_NAME)]


def _check_bundle_room(output: str | os.PathLike[str], nested: NestedAdapter, ks: Sequence[int], onnx_src: Path | None, gguf_dir: Any) -> None:
    """Refuse a bundle whose GGUF files are missing or that the disk cannot hold: the slices, the
    nested adapter (twice: ``nested/`` and the root's config copy are bounded by it), the ONNX
    export and the GGUF files.

    Raises:
        ConfigError: ``gguf_dir`` lacks an ``r{k}.gguf`` of the bundle's ranks.
        InsufficientDiskError: not enough free space next to ``output``.
    """
    slice_total = sum(nested.bytes_at(k) for k in ks)
    onnx_bytes = sum(p.stat().st_size for p in onnx_src.rglob("*") if p.is_file()) if onnx_src else 0
    gguf_files = [Path(gguf_dir) / f"r{k}.gguf" for k in ks] if gguf_dir is not None else []
    missing = [p.name for p in gguf_files if not p.is_file()]
    if missing:
        raise ConfigError(f"{gguf_dir}: no {', '.join(missing)}; write the GGUF files at the bundle's ranks first (export_gguf)",
                          path=gguf_dir, option="gguf_base")
    gguf_bytes = sum(p.stat().st_size for p in gguf_files)
    check_free_space(Path(output).absolute().parent, slice_total + sum(p.stat().st_size for p in _nested_files(nested)) * 2 + onnx_bytes + gguf_bytes)


def _measure_latency(onnx_src: Path | None, ks: Sequence[int]) -> dict[str, Any]:
    """Milliseconds per rank of the (dynamic-rank) ONNX export on this machine, with the machine, for the manifest.

    Raises:
        ConfigError: no ONNX export of the dynamic kind to time.
    """
    if onnx_src is None or not (onnx_src / "model.onnx").is_file():
        raise ConfigError("measuring latency needs an ONNX export (onnx_dir or onnx_base) of the dynamic kind", option="measure_latency")
    from ..onnx.latency import measure_rank_latency

    latency = measure_rank_latency(onnx_src / "model.onnx", ks).to_dict()
    logger.info("bundle: latency per rank (ms): %s", latency["ms"])
    return latency


def _copy_nested(tmp: Path, nested: NestedAdapter, hub_base: str | None) -> None:
    """``nested/`` (the adapter's three files, its PEFT config made portable) and the nested config at the root."""
    (tmp / NESTED_DIR).mkdir()
    for src in _nested_files(nested):
        shutil.copyfile(src, tmp / NESTED_DIR / src.name)
    _portable_peft_config(tmp / NESTED_DIR / PEFT_CONFIG_NAME, hub_base)
    shutil.copyfile(nested.path / CONFIG_NAME, tmp / CONFIG_NAME)


def _write_ranks(
    tmp: Path, nested: NestedAdapter, folders: dict[int, Path], scale_mode: str, progress: Progress | None, hub_base: str | None,
    gguf_dir: Any, metrics: dict[int, dict[str, float]], latency: dict[str, Any] | None,
) -> list[dict[str, Any]]:
    """One slice folder ``r{k}/`` per rank (:func:`~..slice.write_slices`), each made portable and
    given its GGUF file; return their manifest entries."""
    for folder in folders.values():
        folder.mkdir()
    entries = []
    for res in write_slices(nested, folders, scale_mode, progress=progress):
        entries.append(_finish_rank(tmp, nested, res, hub_base, gguf_dir, metrics.get(res.rank, {}), latency))
        logger.info("bundle: wrote rank %d (%d params)", res.rank, res.params)
    return entries


def _copy_onnx(tmp: Path, onnx_src: Path | None) -> list[str]:
    """Copy the ONNX export into ``onnx/``; return its files' bundle paths (none without an export)."""
    if onnx_src is None:
        return []
    shutil.copytree(onnx_src, tmp / ONNX_DIR)
    return [p.relative_to(tmp).as_posix() for p in _folder_files(tmp, ONNX_DIR)]


def _write_manifest(tmp: Path, manifest: dict[str, Any]) -> None:
    """Complete ``manifest`` with every file written so far (path, size, sha256, sorted by path) and write it."""
    all_files = [p for p in tmp.rglob("*") if p.is_file() and p != tmp / MANIFEST_NAME]
    manifest["files"] = [
        {"path": p.relative_to(tmp).as_posix(), "size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(all_files, key=lambda p: p.relative_to(tmp).as_posix())
    ]
    write_json(tmp / MANIFEST_NAME, manifest)


def is_bundle(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a folder with a ``manifest.json`` (a bundle, valid or not)."""
    return (Path(path) / MANIFEST_NAME).is_file()


__all__ = [
    "BUNDLE_FORMAT", "MANIFEST_NAME", "README_NAME", "NESTED_DIR", "ONNX_DIR",
    "Bundle", "BundleFile", "BundleOptions", "BundleRank", "check_file", "check_manifest", "is_bundle", "safe_relpath",
    "rank_dir", "read_manifest", "sha256_file", "write_bundle",
]
