"""The base model folder: a Hub id resolved to a local snapshot (:mod:`.hub`), scanned once
(:mod:`.folder`), loaded (:mod:`.load`), and checked against an adapter (:mod:`.fits`). Only
config, tokenizer and safetensors files are downloaded, and no pickle file is ever loaded."""

from __future__ import annotations

from .fits import check_fits, check_fits_weights, expected_weight_shape, module_shape
from .folder import (
    FLOAT_WEIGHT_DTYPES,
    PICKLE_SUFFIXES,
    SAFE_INDEX,
    SAFE_SINGLE,
    WEIGHT_SUFFIXES,
    BaseFolder,
    Shard,
    check_base_config,
    check_base_model_dir,
    check_float_targets,
    convert_hint,
    scan_base,
)
from .hub import download_base, resolve_base_model
from .load import (
    DTYPES,
    TASK_CAUSAL_LM,
    TASK_SEQ_CLS,
    TOKENIZER_FILES,
    Task,
    base_task,
    check_device,
    check_dtype,
    load_base_model,
    load_tokenizer,
)

__all__ = [
    "DTYPES", "FLOAT_WEIGHT_DTYPES", "PICKLE_SUFFIXES", "SAFE_INDEX", "SAFE_SINGLE", "TASK_CAUSAL_LM", "TASK_SEQ_CLS",
    "TOKENIZER_FILES", "WEIGHT_SUFFIXES", "BaseFolder", "Shard", "Task", "base_task", "check_base_config",
    "check_base_model_dir", "check_device", "check_dtype", "check_fits", "check_fits_weights", "check_float_targets",
    "convert_hint", "download_base", "expected_weight_shape", "load_base_model", "load_tokenizer", "module_shape", "resolve_base_model", "scan_base",
]
