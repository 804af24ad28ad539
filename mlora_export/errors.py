"""The exception hierarchy of mlora-export.

Every error a user can cause is an :class:`MloraError`. Messages speak the library's terms
(parameter names, paths, tensors, ranks), never command-line flags; the fields say what was
wrong, so a caller can act on it. The CLI maps each type to an exit code and adds its flag
hints in one table (``cli/_errors.py``). Each subclass also subclasses a builtin so that callers
can catch it idiomatically.
"""

from __future__ import annotations

import os
from typing import Any


class MloraError(Exception):
    """Base class of every error raised on purpose by mlora-export.

    Fields (each ``None`` when it does not apply): ``path`` the file or folder at fault,
    ``tensor`` a tensor name in it, ``rank`` the rank concerned, ``option`` the name of the
    library parameter whose value is wrong or that would fix it (``"ranks"``, ``"force"``…).
    """

    def __init__(
        self, message: str, *, path: str | os.PathLike[str] | None = None, tensor: str | None = None,
        rank: int | None = None, option: str | None = None, **fields: Any,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.path = None if path is None else str(path)
        self.tensor = tensor
        self.rank = rank
        self.option = option
        self.fields = fields


class InvalidAdapterError(MloraError, ValueError):
    """An adapter folder is missing files, is corrupt, or does not follow docs/design.md §2."""


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


class NonFiniteOutputError(MloraError, ValueError):
    """What a converter was about to write holds an infinity or a NaN (a scale or weights too large
    for the output dtype): refused, naming the tensor, before the output appears."""


class ExportError(MloraError, RuntimeError):
    """An export ran but its result failed verification."""


class HubError(MloraError, RuntimeError):
    """A Hub operation failed on the remote side (network, permissions, missing repo)."""


class HubInputError(HubError):
    """A Hub id, revision or token that cannot be used: the repo or revision does not exist, the
    token may not read it (401, 403, gated), or it is not cached while ``HF_HUB_OFFLINE`` is set.
    Bad input, not a failure of the Hub (the CLI exits 2). ``repo_id`` names the repo."""

    def __init__(self, message: str, *, repo_id: str | None = None, **fields: Any) -> None:
        super().__init__(message, **fields)
        self.repo_id = repo_id


class IntegrityError(MloraError, ValueError):
    """A downloaded or stored file does not match its recorded checksum."""


class RemoteIntegrityError(IntegrityError):
    """A file fetched from the Hub does not match the bundle's manifest (corrupt or changed remote copy)."""


class MissingDependencyError(MloraError, ImportError):
    """An optional package that a requested feature needs is not installed (``package`` names it)."""

    def __init__(self, message: str, *, package: str, **fields: Any) -> None:
        super().__init__(message, **fields)
        self.package = package


class MissingExtraError(MissingDependencyError):
    """An optional dependency that one of the package's extras installs is missing; ``extra``
    names it (``pip install 'mlora-export[<extra>]'``)."""

    def __init__(self, message: str, *, package: str, extra: str, **fields: Any) -> None:
        super().__init__(message, package=package, **fields)
        self.extra = extra


class UnsupportedArchitectureError(ConfigError):
    """A base architecture, or a target module of it, that the export target (llama.cpp's GGUF) cannot represent."""

    def __init__(self, message: str, *, architecture: str | None = None, modules: tuple[str, ...] = (), **fields: Any) -> None:
        super().__init__(message, **fields)
        self.architecture = architecture
        self.modules = modules
