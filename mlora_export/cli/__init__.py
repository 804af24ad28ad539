"""The ``mlora-export`` command line: a thin click layer over the library (docs/design.md §4)."""

from .main import main

__all__ = ["main"]
