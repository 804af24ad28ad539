"""The nested adapter on disk (docs/design.md §2): its files, configs, loading, reading and saving.

- :mod:`.files`: file names, PEFT tensor names, locating an adapter folder's files;
- :mod:`.config`: ``matryoshka_config.json`` (:class:`MatryoshkaConfig`);
- :mod:`.peft_config`: ``adapter_config.json`` checks, PEFT's scaling, writing one;
- :mod:`.folder`: :class:`NestedAdapter` (open and validate) and :func:`save_nested`;
- :mod:`.reader`: :class:`AdapterReader`, rank-``k`` prefixes straight from the mapped file;
- :mod:`.rounding`: scaling a factor with one rounding, in numpy, into reusable scratch.
"""

from __future__ import annotations

from .config import REQUIRED_FIELDS, MatryoshkaConfig
from .files import (
    BUNDLE_MANIFEST_NAME,
    BUNDLE_NESTED_DIR,
    CONFIG_NAME,
    FLOAT_DTYPES,
    KEY_PREFIX,
    NESTED_FORMAT,
    PEFT_CONFIG_NAME,
    PICKLE_WEIGHTS_NAME,
    SLICE_FORMAT,
    TENSOR_HINTS,
    WEIGHTS_NAME,
    LoraModule,
    adapter_files,
    lora_tensor_pairs,
    read_json,
)
from .folder import NestedAdapter, record_in_config, record_many_in_config, save_nested, write_json
from .peft_config import MAX_LORA_RANK, build_peft_config, peft_scaling
from .reader import AdapterReader, orient_delta
from .rounding import scratch_bytes

__all__ = [
    "BUNDLE_MANIFEST_NAME", "BUNDLE_NESTED_DIR", "CONFIG_NAME", "FLOAT_DTYPES", "KEY_PREFIX", "MAX_LORA_RANK",
    "NESTED_FORMAT", "PEFT_CONFIG_NAME", "PICKLE_WEIGHTS_NAME", "REQUIRED_FIELDS", "SLICE_FORMAT", "TENSOR_HINTS",
    "WEIGHTS_NAME", "AdapterReader", "LoraModule", "MatryoshkaConfig", "NestedAdapter", "adapter_files",
    "build_peft_config", "lora_tensor_pairs", "orient_delta", "peft_scaling", "read_json", "record_in_config", "record_many_in_config", "save_nested",
    "scratch_bytes", "write_json",
]
