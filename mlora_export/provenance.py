"""What every file we write says about who wrote it."""

from __future__ import annotations

from ._version import __version__


def created_by() -> str:
    """The ``created_by`` value of our JSON files and cards: ``mlora-export <version>``."""
    return f"mlora-export {__version__}"
