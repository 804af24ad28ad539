"""Moved to :mod:`mlora_export.io.direct_io`; this name is kept for one release."""

import warnings

from .io.direct_io import *  # noqa: F403
from .io.direct_io import __all__  # noqa: F401

warnings.warn("mlora_export.direct_io moved to mlora_export.io.direct_io; this name goes in the next release",
              DeprecationWarning, stacklevel=2)
