"""Moved to :mod:`mlora_export.io.safetensors`; this name is kept for one release."""

import warnings

from .io.safetensors import *  # noqa: F403
from .io.safetensors import __all__  # noqa: F401

warnings.warn("mlora_export.safetensors_io moved to mlora_export.io.safetensors; this name goes in the next release",
              DeprecationWarning, stacklevel=2)
