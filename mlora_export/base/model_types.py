"""Whether transformers knows a ``model_type``, without importing transformers when it can.

``import transformers`` (for its ``CONFIG_MAPPING_NAMES``) also imports torch: seconds of
start-up for a command, such as ``mlora-export merge`` of a bfloat16 base, that otherwise needs
neither. transformers 5 keeps the mapping in a generated, dependency-free module
(``transformers/models/auto/auto_mappings.py``); it is run on its own, and a model type found
there is known. Any other answer (a type not listed there, an older transformers without that
module, a failure to read it) comes from the real mapping, so the result is always transformers'.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


@functools.cache
def _generated_names() -> frozenset[str]:
    """The model types of transformers' generated ``auto_mappings.py``, run as a lone module; empty if absent."""
    try:
        spec = importlib.util.find_spec("transformers")
        if spec is None or spec.origin is None:
            return frozenset()
        path = Path(spec.origin).parent / "models" / "auto" / "auto_mappings.py"
        if not path.is_file():
            return frozenset()
        lone = importlib.util.spec_from_file_location("_mlora_export_auto_mappings", path)
        if lone is None or lone.loader is None:
            return frozenset()
        module = importlib.util.module_from_spec(lone)
        lone.loader.exec_module(module)
        names = getattr(module, "CONFIG_MAPPING_NAMES", None)
        return frozenset(n for n in names if isinstance(n, str)) if isinstance(names, dict) else frozenset()
    except Exception as e:  # noqa: BLE001 - any failure means: ask transformers itself
        logger.debug("transformers' auto_mappings.py not usable on its own (%s); importing transformers", e)
        return frozenset()


def known_model_type(model_type: str) -> bool:
    """``model_type in transformers' CONFIG_MAPPING_NAMES``, importing transformers only when needed."""
    if model_type in _generated_names():
        return True
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return model_type in CONFIG_MAPPING_NAMES


__all__ = ["known_model_type"]
