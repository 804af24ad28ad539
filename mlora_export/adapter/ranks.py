"""Which ranks of an adapter a converter writes, and the two ways a written rank expresses ``s(k)``.

Every converter that writes ranks (slices, bundles, GGUF files) takes the ranks and the scale mode
through here, so that ``"all"``, range checks and the warning about untrained ranks are the same.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Literal

from ..errors import ConfigError, RankError
from ..validate import is_int

if TYPE_CHECKING:
    from .folder import NestedAdapter

logger = logging.getLogger(__name__)

#: ``baked``: ``s(k)`` multiplied into ``B`` and ``lora_alpha = k``; ``native``: the exact prefix and
#: ``lora_alpha = s(k)·k`` (docs/design.md §2).
ScaleMode = Literal["baked", "native"]
SCALE_MODES: tuple[str, ...] = ("baked", "native")


def check_scale_mode(scale_mode: str) -> None:
    """Raise :class:`ConfigError` unless ``scale_mode`` is one of :data:`SCALE_MODES`."""
    if scale_mode not in SCALE_MODES:
        raise ConfigError(f"unknown scale mode {scale_mode!r}: expected one of {', '.join(SCALE_MODES)}", option="scale_mode")


def check_ranks_in_range(adapter: NestedAdapter, ranks: Iterable[object]) -> None:
    """Raise :class:`RankError` naming every rank outside ``[1, r]`` of ``adapter``."""
    bad = [k for k in ranks if not (isinstance(k, int) and is_int(k) and 1 <= k <= adapter.max_rank)]
    if bad:
        raise RankError(
            f"rank(s) {bad} are outside [1, {adapter.max_rank}] for adapter {str(adapter.path)!r}; "
            f"its train ranks are {list(adapter.config.train_ranks)}"
        )


def resolve_ranks(adapter: NestedAdapter, ranks: Sequence[int] | str) -> tuple[int, ...]:
    """Turn ``"all"`` into the train ranks and validate explicit ranks against ``[1, r]``.

    Raises:
        RankError: a rank is outside ``[1, r]``, or none is given.
    """
    if isinstance(ranks, str):
        if ranks != "all":
            raise RankError(f"ranks must be a list of integers or 'all', got {ranks!r}")
        return tuple(adapter.config.train_ranks)
    out = tuple(sorted(set(ranks)))
    if not out:
        raise RankError("no ranks requested: give e.g. 8,16 or 'all'", option="ranks")
    check_ranks_in_range(adapter, out)
    untrained = [k for k in out if k not in adapter.config.train_ranks]
    if untrained:
        logger.warning(
            "rank(s) %s were not trained and may be weaker; the trained ranks are %s", untrained, list(adapter.config.train_ranks)
        )
    return out
