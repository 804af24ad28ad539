"""What every file we write says about who wrote it."""

from __future__ import annotations


def created_by() -> str:
    """The ``created_by`` value of our JSON files and cards: ``mlora-export <version>``."""
    from . import __version__

    return f"mlora-export {__version__}"
