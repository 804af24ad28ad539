"""The package's version, in a module of its own: what records it (``created_by``, ``--version``)
imports this, never the package root (which imports everything lazily above it)."""

__version__ = "0.1.0"
