"""Input files from untrusted places: a path checked to be a regular file before it is read."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def check_regular_file(path: str | os.PathLike[str], error: type[Exception], what: str = "file") -> os.stat_result:
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


__all__ = ["check_regular_file"]
