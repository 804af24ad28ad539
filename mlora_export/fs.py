"""Safe output folders: refuse to clobber, write into a temporary sibling, rename at the end.

Every command that writes a folder goes through :func:`atomic_output_dir`, so an error or a
Ctrl-C leaves either the previous state or the complete new output, never a half-written one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import InsufficientDiskError, OutputExistsError

logger = logging.getLogger(__name__)


def check_output_path(path: str | os.PathLike[str], force: bool = False) -> Path:
    """Return ``path`` as a :class:`Path` after checking that it may be written.

    The nearest existing ancestor folder must be a writable folder (the missing ones are created).

    Raises:
        OutputExistsError: ``path`` exists and ``force`` is false, or it is a file; an ancestor is
            a file or not writable.
    """
    out = Path(path)
    if out.exists() or out.is_symlink():
        if not force:
            raise OutputExistsError(f"output {str(out)!r} already exists: choose another path or pass --force to replace it")
        if not out.is_dir():
            raise OutputExistsError(f"output {str(out)!r} exists and is not a folder: remove it or choose another path")
    probe = out.absolute().parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise OutputExistsError(f"cannot create output {str(out)!r}: {str(probe)!r} is a file, not a folder; choose another path")
    if not os.access(probe, os.W_OK):
        raise OutputExistsError(f"cannot create output {str(out)!r}: folder {str(probe)!r} is not writable; choose another path")
    return out


def check_free_space(path: str | os.PathLike[str], needed_bytes: int, margin: float = 1.02) -> None:
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


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike[str], force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder of ``path``; on success, move it to ``path``.

    On any exception (including ``KeyboardInterrupt``) the temporary folder is removed and
    ``path`` is left as it was. With ``force`` an existing ``path`` is replaced only once the new
    output is complete.

    Raises:
        OutputExistsError: see :func:`check_output_path`, or the temporary folder cannot be created.
    """
    out = check_output_path(path, force)
    parent = out.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    except OSError as e:  # a read-only mount, a race with another process...: the output is the problem
        raise OutputExistsError(f"cannot create output {str(out)!r}: {e.strerror or e}; choose another path") from e
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        logger.debug("wrote %s", out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
