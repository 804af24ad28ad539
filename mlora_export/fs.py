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

Without ``force`` the final step is a rename that cannot replace anything
(:func:`rename_noreplace`: ``renameat2(RENAME_NOREPLACE)`` on Linux, ``renamex_np(RENAME_EXCL)`` on
macOS, an ``mkdir`` claim elsewhere): an output that appeared while the command ran (a second
run into the same folder, a folder made by hand) is left as it is, and the new result is kept
beside it under a name the error gives.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import ctypes.util
import errno
import logging
import os
import re
import secrets
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import InsufficientDiskError, OutputExistsError, OutputPathError
# moved to mlora_export.io, and kept here under their old names for one release
from .io.files import check_regular_file as check_regular_file
from .io.jsonio import MAX_JSON_BYTES as MAX_JSON_BYTES
from .io.jsonio import parse_json as parse_json
from .io.jsonio import read_json as read_json
from .units import human_bytes

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
            f"not enough free disk for {str(path)!r}: need about {human_bytes(needed_bytes)}, "
            f"{human_bytes(free)} free on {str(probe)!r}; free some space or write elsewhere"
        )


#: numpy's ``tofile`` reports a short write as ``OSError("N requested and M written")``, without an errno.
_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` says the disk (or the quota) is full: ``ENOSPC``/``EDQUOT``, or numpy's short-write ``OSError``."""
    if not isinstance(exc, OSError):
        return False
    return exc.errno in (errno.ENOSPC, errno.EDQUOT) or (exc.errno is None and bool(_SHORT_WRITE.search(str(exc))))


def disk_full_error(exc: OSError, path: PathLike, needed_bytes: int | None = None) -> InsufficientDiskError | None:
    """An :class:`InsufficientDiskError` naming ``path`` (and the space needed) for an ``OSError``
    that says the disk is full (:func:`is_disk_full`); ``None`` for any other error."""
    if not is_disk_full(exc):
        return None
    need = f"; it needs about {human_bytes(needed_bytes)}" if needed_bytes else ""
    try:
        probe = Path(path).absolute()
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        free = f", {human_bytes(shutil.disk_usage(probe).free)} free"
    except OSError:
        free = ""
    return InsufficientDiskError(f"the disk filled up while writing {str(path)!r}{need}{free}; free some space or write elsewhere", path=path)


def check_written(path: PathLike, expected: int) -> None:
    """Raise an ``OSError`` when the file ``path`` is shorter than the ``expected`` bytes a writer
    says it wrote: a writer that drops what a full disk refused (numpy's ``tofile`` through a C
    ``FILE``) leaves such a file without an error. ``ENOSPC`` when the disk is (nearly) full, so it
    is reported as one; ``EIO`` otherwise.
    """
    size = os.stat(path).st_size
    if size == expected:
        return
    try:
        full = shutil.disk_usage(Path(path).parent).free < max(expected - size, 0) + 2**20
    except OSError:
        full = True
    code = errno.ENOSPC if full else errno.EIO
    raise OSError(code, f"{os.strerror(code)}: {human_bytes(size)} of {human_bytes(expected)} reached the disk", str(path))


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


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1  # linux/fs.h
_RENAME_EXCL = 0x4  # macOS sys/stdio.h


def _libc() -> object | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:
        return None


_LIBC = _libc()


def _native_noreplace(src: Path, dst: Path) -> bool:
    """Try the OS's own no-replace rename; False when it has none (or the file system refuses the
    flag), so the caller falls back. Raises ``FileExistsError`` when ``dst`` exists."""
    if _LIBC is None:
        return False
    if sys.platform.startswith("linux"):
        fn = getattr(_LIBC, "renameat2", None)
        args: tuple[object, ...] = (_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE)
    elif sys.platform == "darwin":
        fn = getattr(_LIBC, "renamex_np", None)
        args = (os.fsencode(src), os.fsencode(dst), _RENAME_EXCL)
    else:
        return False
    if fn is None:
        return False
    if fn(*args) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EEXIST, errno.ENOTEMPTY):
        raise FileExistsError(err, os.strerror(err), str(dst))
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, getattr(errno, "EOPNOTSUPP", errno.ENOTSUP)):
        return False  # an old kernel, or a file system without the flag (some network ones)
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def rename_noreplace(src: PathLike, dst: PathLike) -> None:
    """Rename ``src`` to ``dst`` only if nothing is at ``dst``, atomically where the OS allows.

    ``renameat2(RENAME_NOREPLACE)`` on Linux, ``renamex_np(RENAME_EXCL)`` on macOS; elsewhere (or
    where the file system refuses the flag) a file is hard-linked to ``dst`` (``link`` never
    replaces) and then unlinked from ``src``, and a folder claims ``dst`` with ``mkdir`` (which
    fails if anything is there; folders cannot be hard-linked) and is renamed onto that empty
    claim (a rename replaces only an empty folder).

    Raises:
        FileExistsError: something is at ``dst``; ``src`` is left as it was.
    """
    src_p, dst_p = Path(src), Path(dst)
    if _native_noreplace(src_p, dst_p):
        return
    if not src_p.is_dir() or src_p.is_symlink():
        os.link(src_p, dst_p, follow_symlinks=False)  # FileExistsError if dst exists
        os.unlink(src_p)
        return
    os.mkdir(dst_p)  # the claim: FileExistsError if dst exists
    try:
        os.rename(src_p, dst_p)  # replaces our empty claim, and nothing else
    except OSError as e:
        with contextlib.suppress(OSError):
            os.rmdir(dst_p)  # still our empty claim (a non-empty one is not ours to remove)
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise FileExistsError(e.errno, os.strerror(e.errno), str(dst_p)) from e
        raise


def _keep_new_result(tmp: Path, parent: Path, name: str) -> Path:
    """Move the finished temporary folder to a visible ``NAME.new-XXXXXXXX`` beside the output (never
    replacing anything), so that a result that could not take its place is not lost."""
    for _ in range(100):
        kept = parent / f"{name}.new-{secrets.token_hex(4)}"
        try:
            rename_noreplace(tmp, kept)
            return kept
        except FileExistsError:
            continue
    raise OutputExistsError(f"{str(parent / name)!r} appeared while this command was writing it, and no free name was found to keep the new result beside it", path=parent / name)


@contextlib.contextmanager
def atomic_output_dir(
    path: PathLike, force: bool = False, inputs: Iterable[PathLike | None] = (), needed_bytes: int | None = None
) -> Iterator[Path]:
    """Yield a temporary sibling folder of ``path``; on success, move it to ``path``.

    On any exception (including ``KeyboardInterrupt``) the temporary folder is removed and
    ``path`` is left as it was. With ``force`` an existing ``path`` is replaced only once the new
    output is complete. Without ``force`` the final rename cannot replace anything
    (:func:`rename_noreplace`): an output that appeared while the block ran is left as it is,
    and the new result is kept beside it as ``NAME.new-XXXXXXXX`` (the error's ``kept`` field).
    Stale temporary siblings of ``path`` from killed runs are removed first. A disk that fills up
    inside the block (``ENOSPC``/``EDQUOT``) becomes an :class:`InsufficientDiskError` naming
    ``path`` and ``needed_bytes`` (when given).

    Raises:
        OutputPathError, OutputExistsError: see :func:`check_output_path`; or the temporary
            folder cannot be created; or, without ``force``, ``path`` appeared while the block ran.
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
        _finish(tmp, out, parent, force)
        logger.debug("wrote %s", out)
    except OSError as e:  # (an output that appeared: the new result was moved aside, tmp is gone)
        shutil.rmtree(tmp, ignore_errors=True)
        full = disk_full_error(e, out, needed_bytes)
        if full is not None:
            raise full from e
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _appeared(out: Path, kept: Path) -> OutputExistsError:
    return OutputExistsError(
        f"output {str(out)!r} appeared while this command was writing it (another run, or made by hand) and was left as it is; "
        f"the new result is kept as {str(out.with_name(kept.name))!r}: move it into place yourself", path=out, option="force", kept=str(kept))


def _finish(tmp: Path, out: Path, parent: Path, force: bool) -> None:
    """Move the complete ``tmp`` to ``out``: without ``force`` by a rename that cannot replace
    anything; with ``force``, an existing ``out`` is moved aside first and removed once the new
    one is in place (put back if that fails).

    Raises:
        OutputExistsError: ``out`` exists (without ``force``), or appeared between the two steps of
            a forced replacement: the new result is kept beside it (:func:`_keep_new_result`).
    """
    if not force:
        try:
            rename_noreplace(tmp, out)
        except FileExistsError:
            raise _appeared(out, _keep_new_result(tmp, parent, out.name)) from None
        return
    old = None
    if out.exists() or out.is_symlink():
        old = _sibling(parent, out.name, "old")
        os.replace(out, old)
    try:
        rename_noreplace(tmp, out)
    except FileExistsError:  # something took the place between the two steps: leave it, keep ours
        if old is not None:
            _remove(old)  # the output --force was asked to replace
        raise _appeared(out, _keep_new_result(tmp, parent, out.name)) from None
    except BaseException:
        if old is not None:
            os.replace(old, out)  # put the previous output back: nothing is lost
        raise
    if old is not None:
        _remove(old)


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)
