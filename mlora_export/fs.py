"""Safe output folders: refuse to clobber, write into a temporary sibling, rename at the end.

Every command that writes a folder goes through :func:`atomic_output_dir`, so an error, a
Ctrl-C, a ``SIGTERM`` or a ``SIGHUP`` (the CLI turns both into an interrupt) leaves either the
previous state or the complete new output, never a half-written one. The output may never be,
contain or lie inside one of the command's inputs, nor be the working folder or a parent of it
(:func:`check_output_path`), so ``--force`` can only ever replace an earlier output.

The temporary sibling is named ``.NAME.tmp-PID-XXXXXXXX``; one left by a run that was killed
(``SIGKILL``, a power cut) is removed by the next run writing the same output once its process
is gone (:func:`remove_stale_temporaries`). Output folders get the mode a plain ``mkdir`` gives
under the umask.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import json
import logging
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import InsufficientDiskError, OutputExistsError, OutputPathError

logger = logging.getLogger(__name__)

#: Longest output name accepted: room is left for the ``.NAME.tmp-PID-XXXXXXXX`` sibling.
_SUFFIX_ROOM = 32
#: A temporary sibling without a process id in its name (older releases) counts as stale after this.
STALE_AGE_S = 24 * 3600

PathLike = str | os.PathLike[str]

_protected: contextvars.ContextVar[tuple[tuple[Path, str | None], ...]] = contextvars.ContextVar("mlora_protected_inputs", default=())


@contextlib.contextmanager
def protected_inputs(paths: Iterable[PathLike | tuple[PathLike, str] | None]) -> Iterator[None]:
    """Within the block, every :func:`check_output_path` also refuses outputs that overlap ``paths``
    (each a path, or a ``(path, label)`` pair whose label, e.g. ``"--base-model"``, the message names).

    The CLI declares each command's path arguments this way, so a library function that does not
    take its inputs as an argument (or is called through several layers) is still protected.
    """
    items = []
    for p in paths:
        path, label = p if isinstance(p, tuple) else (p, None)
        if path is not None and str(path) != "":
            items.append((Path(path), label))
    token = _protected.set(_protected.get() + tuple(items))
    try:
        yield
    finally:
        _protected.reset(token)


def _real(path: Path) -> Path:
    return Path(os.path.realpath(os.path.abspath(path)))


def _inside(a: Path, b: Path) -> bool:
    """True when ``a`` (resolved) is ``b`` or lies inside it."""
    return a == b or b in a.parents


def check_not_input(path: PathLike, inputs: Iterable[PathLike | None] = ()) -> None:
    """Refuse an output that is, holds or lies inside one of ``inputs`` (or of the declared
    :func:`protected_inputs`), or that is the working folder, a parent of it or the root.

    Paths are compared after resolving symbolic links and ``.``/``..``, so a link to an input or
    ``./a/../nested`` is caught too.

    Raises:
        OutputPathError: naming the output and the input it overlaps.
    """
    out = Path(path)
    real = _real(out)
    try:
        cwd: Path | None = _real(Path.cwd())
    except OSError:  # the working folder was removed: nothing to protect there
        cwd = None
    if real == Path(real.anchor) or (cwd is not None and _inside(cwd, real)):
        what = "the working folder" if real == cwd else "the file system root" if real == Path(real.anchor) else "a parent of the working folder"
        raise OutputPathError(f"output {str(out)!r} is {what}; give a new folder for the output, e.g. ./out")
    for given, label in [*_protected.get(), *((i, None) for i in inputs)]:
        if given is None or str(given) == "":
            continue
        src = _real(Path(given))
        name = f"the input {str(given)!r}" + (f" ({label})" if label else "")
        if real == src:
            raise OutputPathError(f"output {str(out)!r} is {name}; choose another output folder")
        if _inside(src, real):
            raise OutputPathError(f"output {str(out)!r} holds {name}, which writing it would replace; choose another output folder")
        if _inside(real, src):
            raise OutputPathError(f"output {str(out)!r} lies inside {name}; choose an output folder outside it")


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255


def check_output_path(path: PathLike, force: bool = False, inputs: Iterable[PathLike | None] = ()) -> Path:
    """Return ``path`` as a :class:`Path` after checking that it may be written.

    The nearest existing ancestor folder must be a writable folder (the missing ones are created).
    The output may not overlap ``inputs`` (see :func:`check_not_input`).

    Raises:
        OutputPathError: the output is, holds or lies inside an input, is the working folder or
            a parent of it, or its name is too long.
        OutputExistsError: ``path`` exists and ``force`` is false, or it is a file; an ancestor is
            a file or not writable.
    """
    out = Path(path)
    if not out.name or out.name in (".", ".."):
        check_not_input(out, inputs)  # "." and ".." are the working folder or a parent of it
        raise OutputPathError(f"output {str(out)!r} names no new folder; give one, e.g. ./out")
    check_not_input(out, inputs)
    probe = out.absolute().parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    limit = _name_max(probe if probe.is_dir() else Path("/"))
    too_long = [part for part in out.absolute().parts[1:] if len(part.encode(errors="surrogateescape")) > limit]
    if too_long or len(out.name.encode(errors="surrogateescape")) > limit - _SUFFIX_ROOM:
        raise OutputPathError(
            f"output name {out.name[:40]!r}… is {len(out.name)} characters; the file system allows "
            f"{limit - _SUFFIX_ROOM} here: choose a shorter name"
        )
    if out.exists() or out.is_symlink():
        if not force:
            raise OutputExistsError(f"output {str(out)!r} already exists: choose another path", path=out, option="force")
        if not out.is_dir():
            raise OutputExistsError(f"output {str(out)!r} exists and is not a folder: remove it or choose another path")
    if not probe.is_dir():
        raise OutputExistsError(f"cannot create output {str(out)!r}: {str(probe)!r} is a file, not a folder; choose another path")
    if not os.access(probe, os.W_OK):
        raise OutputExistsError(f"cannot create output {str(out)!r}: folder {str(probe)!r} is not writable; choose another path")
    return out


def check_free_space(path: PathLike, needed_bytes: int, margin: float = 1.02) -> None:
    """Raise :class:`InsufficientDiskError` when the disk holding ``path`` has less than ``needed_bytes`` free."""
    probe = Path(path).absolute()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed_bytes * margin:
        raise InsufficientDiskError(
            f"not enough free disk for {str(path)!r}: need about {needed_bytes / 2**30:.2f} GiB, "
            f"{free / 2**30:.2f} GiB free on {str(probe)!r}; free some space or write elsewhere"
        )


def disk_full_error(exc: OSError, path: PathLike, needed_bytes: int | None = None) -> InsufficientDiskError | None:
    """An :class:`InsufficientDiskError` naming ``path`` (and the space needed) for an ``ENOSPC``
    or ``EDQUOT`` ``OSError``; ``None`` for any other error."""
    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    need = f"; it needs about {needed_bytes / 2**30:.2f} GiB" if needed_bytes else ""
    try:
        free = f", {shutil.disk_usage(Path(path).absolute().parent if not Path(path).exists() else path).free / 2**30:.2f} GiB free"
    except OSError:
        free = ""
    return InsufficientDiskError(f"the disk filled up while writing {str(path)!r}{need}{free}; free some space or write elsewhere")


_STALE_RE = re.compile(r"\.(?:tmp|old)-(?:(?P<pid>\d+)-[0-9a-f]{8}|[A-Za-z0-9_]+)$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True
    return True


def remove_stale_temporaries(parent: Path, name: str, *, now: float | None = None) -> list[Path]:
    """Remove ``.NAME.tmp-*`` and ``.NAME.old-*`` siblings in ``parent`` left by a killed run of
    the same output: those whose process (the pid in the name) is gone, or, for names without a
    pid, older than :data:`STALE_AGE_S`. Returns what was removed; never follows a link."""
    removed: list[Path] = []
    now = time.time() if now is None else now
    prefix = f".{name}."
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        m = _STALE_RE.fullmatch(entry.name[len(prefix) - 1:])
        if m is None:
            continue
        pid = m.group("pid")
        try:
            if pid is not None:
                if int(pid) == os.getpid() or _pid_alive(int(pid)):
                    continue
            elif now - entry.stat(follow_symlinks=False).st_mtime < STALE_AGE_S:
                continue
            path = Path(entry.path)
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
        except OSError as e:  # another run removing it too, or no permission: leave it
            logger.debug("could not remove %s: %s", entry.path, e)
    if removed:
        logger.warning("removed %d temporary folder(s) of %s left by an interrupted run", len(removed), parent / name)
    return removed


def _sibling(parent: Path, name: str, kind: str) -> Path:
    return parent / f".{name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


@contextlib.contextmanager
def atomic_output_dir(
    path: PathLike, force: bool = False, inputs: Iterable[PathLike | None] = (), needed_bytes: int | None = None
) -> Iterator[Path]:
    """Yield a temporary sibling folder of ``path``; on success, move it to ``path``.

    On any exception (including ``KeyboardInterrupt``) the temporary folder is removed and
    ``path`` is left as it was. With ``force`` an existing ``path`` is replaced only once the new
    output is complete. Stale temporary siblings of ``path`` from killed runs are removed first.
    A disk that fills up inside the block (``ENOSPC``/``EDQUOT``) becomes an
    :class:`InsufficientDiskError` naming ``path`` and ``needed_bytes`` (when given).

    Raises:
        OutputPathError, OutputExistsError: see :func:`check_output_path`; or the temporary
            folder cannot be created.
        InsufficientDiskError: the disk filled up while the output was written.
    """
    inputs = list(inputs)
    out = check_output_path(path, force, inputs)
    parent = out.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(parent, out.name)
        tmp = _sibling(parent, out.name, "tmp")
        os.mkdir(tmp)  # the mode of a plain mkdir under the umask (mkdtemp's 0700 would survive the rename)
    except OSError as e:  # a read-only mount, a race with another process...: the output is the problem
        raise OutputExistsError(f"cannot create output {str(out)!r}: {e.strerror or e}; choose another path") from e
    try:
        yield tmp
        if out.exists() or out.is_symlink():
            old = _sibling(parent, out.name, "old")
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)  # put the previous output back: nothing is lost
                raise
            if old.is_symlink() or not old.is_dir():
                old.unlink()
            else:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        logger.debug("wrote %s", out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        full = disk_full_error(e, out, needed_bytes)
        if full is not None:
            raise full from e
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


#: The largest JSON file (a config, an index, a manifest) read whole: far above any real one.
MAX_JSON_BYTES = 64 * 2**20


def check_regular_file(path: PathLike, error: type[Exception], what: str = "file") -> os.stat_result:
    """``os.stat`` of ``path`` after checking that it is a regular file (a folder, a pipe or a
    device would fail later, or block a read forever); symbolic links are followed.

    Raises:
        error: ``path`` is missing, unreadable, or not a regular file.
    """
    p = Path(path)
    try:
        st = p.stat()
    except OSError as e:
        raise error(f"{p}: cannot read the {what} ({e.strerror or e})") from e
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file (a pipe, socket or device)"
        raise error(f"{p}: the {what} is {kind}; expected a regular file")
    return st


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise _JsonFault(f"the key {key[:80]!r} appears twice")
        out[key] = value
    return out


class _JsonFault(ValueError):
    pass


def _no_constant(name: str) -> object:
    raise _JsonFault(f"{name} is not a JSON number")


def parse_json(text: str | bytes, source: str, error: type[Exception]) -> object:
    """Parse JSON text strictly: a key twice, ``NaN``/``Infinity``, an integer too long to
    convert and nesting too deep to parse are all errors of class ``error`` naming ``source``."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise error(f"{source}: not valid JSON ({e.msg} at line {e.lineno}); fix or re-create the file") from None
    except UnicodeDecodeError:
        raise error(f"{source}: not UTF-8 text; fix or re-create the file") from None
    except RecursionError:
        raise error(f"{source}: JSON nested too deeply to read; fix or re-create the file") from None
    except ValueError as e:  # _JsonFault, or an integer of thousands of digits
        raise error(f"{source}: invalid JSON ({str(e)[:120]}); fix or re-create the file") from None


def read_json(path: PathLike, error: type[Exception], what: str = "JSON file", max_bytes: int = MAX_JSON_BYTES) -> object:
    """Read a JSON file from untrusted input: a regular file of at most ``max_bytes``, parsed by
    :func:`parse_json`.

    Raises:
        error: naming ``path`` and the fault.
    """
    st = check_regular_file(path, error, what)
    if st.st_size > max_bytes:
        raise error(f"{path}: the {what} has {st.st_size} bytes, more than the {max_bytes} a JSON file of this kind may have")
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise error(f"{path}: cannot read the {what} ({e.strerror or e})") from e
    return parse_json(data, str(path), error)
