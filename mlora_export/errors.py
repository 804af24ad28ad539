"""The exception hierarchy of mlora-export.

Every error a user can cause is an :class:`MloraError`; the CLI maps these to exit code 2
(bad usage or input) or 1 (remote or runtime failure) in one table (``cli/_errors.py``).
Each subclass also subclasses a builtin so that callers can catch it idiomatically.
"""

from __future__ import annotations


class MloraError(Exception):
    """Base class of every error raised on purpose by mlora-export."""

    #: Exit code the CLI uses for this error: 2 = bad input or usage, 1 = failure elsewhere.
    exit_code: int = 2


class InvalidAdapterError(MloraError, ValueError):
    """An adapter folder is missing files, is corrupt, or does not follow DESIGN.md §2."""


class RankError(MloraError, ValueError):
    """A requested or configured rank is outside what the adapter supports."""


class ConfigError(MloraError, ValueError):
    """A method, scaling or other setting has an invalid value."""


class BaseModelError(MloraError, ValueError):
    """The base model folder is missing, unreadable, or in an unsupported format."""


class BaseModelMismatchError(BaseModelError):
    """The adapter does not fit the base model (a target module missing or of another shape)."""


class DataError(MloraError, ValueError):
    """A training or evaluation data file is missing or malformed."""


class OutputExistsError(MloraError, FileExistsError):
    """The output path exists and ``force`` was not given."""


class OutputPathError(OutputExistsError):
    """The output path cannot be used: it is, holds or lies inside an input, it is the working
    folder or one of its parents, or its name is too long for the file system. (A subclass of
    :class:`OutputExistsError`, which callers already catch for an unusable output.)"""


class InsufficientDiskError(MloraError, OSError):
    """Not enough free disk space for the output."""


class ExportError(MloraError, RuntimeError):
    """An export ran but its result failed verification."""

    exit_code = 1


class HubError(MloraError, RuntimeError):
    """A Hub operation failed on the remote side (network, permissions, missing repo)."""

    exit_code = 1


class IntegrityError(MloraError, ValueError):
    """A downloaded or stored file does not match its recorded checksum."""


class RemoteIntegrityError(IntegrityError):
    """A file fetched from the Hub does not match the bundle's manifest (corrupt or changed remote copy)."""

    exit_code = 1


class UnsupportedArchitectureError(ConfigError):
    """A base architecture, or a target module of it, that the export target (llama.cpp's GGUF) cannot represent."""

    def __init__(self, message: str, *, architecture: str | None = None, modules: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.architecture = architecture
        self.modules = modules
