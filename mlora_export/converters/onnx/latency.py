"""Per-rank latency of a dynamic-rank ONNX export in ONNX Runtime, with the machine it ran on.

One session, one fixed input (``batch × seq`` tokens), every rank measured in turn by setting the
``lora_rank`` input: the number a team uses to choose a rank for a latency budget (``pull --rank
auto --max-latency-ms``). It is a forward pass over the whole input (a prefill), not a decoding
step, and only holds for the machine recorded beside it.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import ConfigError
from ...validate import is_int
from .verify import make_session, run_rank, sample_inputs

#: The measurement's input and repetitions (small enough to take seconds on a laptop CPU).
DEFAULT_BATCH, DEFAULT_SEQ, DEFAULT_WARMUP, DEFAULT_REPEATS = 1, 64, 3, 20


def machine_info(provider: str, threads: int | None) -> dict[str, Any]:
    """What the latency depends on: CPU model and count, OS, Python and ONNX Runtime versions, provider, threads."""
    import onnxruntime as ort

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "provider": provider,
        "threads": threads,
    }


@dataclass
class LatencyReport:
    """Median milliseconds per forward pass at each rank (rank 0: the base model), and how they were measured."""

    ms: dict[int, float]
    batch: int
    seq: int
    repeats: int
    machine: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "what": "median wall-clock of one ONNX Runtime forward pass (prefill) of batch × seq tokens, per lora_rank",
            "batch": self.batch,
            "seq": self.seq,
            "repeats": self.repeats,
            "machine": self.machine,
            "ms": {str(k): round(v, 4) for k, v in sorted(self.ms.items())},
        }


def measure_rank_latency(
    model_path: str | os.PathLike[str],
    ranks: Sequence[int],
    *,
    vocab: int | None = None,
    shape: tuple[int, int] = (DEFAULT_BATCH, DEFAULT_SEQ),
    warmup: int = DEFAULT_WARMUP,
    repeats: int = DEFAULT_REPEATS,
    provider: str = "CPUExecutionProvider",
    threads: int | None = None,
) -> LatencyReport:
    """Time ``model_path`` (a dynamic-rank export: it has a ``lora_rank`` input) at rank 0 and every rank of ``ranks``.

    The input is ``shape`` (``batch × seq``) random token ids below ``vocab`` (default: all 3, valid in any model).

    Ranks are measured interleaved (round robin over the repeats), so that a change in the
    machine's load during the measurement shifts every rank alike.

    Raises:
        ConfigError: the model has no ``lora_rank`` input, or a non-positive size or count.
    """
    batch, seq = shape
    for name, value in (("batch", batch), ("seq", seq), ("repeats", repeats)):
        if not is_int(value) or value < 1:
            raise ConfigError(f"latency {name} must be a positive integer, got {value!r}")
    session = make_session(Path(model_path), provider, threads)
    if "lora_rank" not in [i.name for i in session.get_inputs()]:
        raise ConfigError(f"{model_path}: not a dynamic-rank export (no lora_rank input); latency per rank needs one", option="onnx_base")
    # the token values do not change the time; without a vocabulary every id is 3, valid in any model
    feeds = sample_inputs(vocab if vocab is not None else 4, batch=batch, seq=seq)
    order = [0, *sorted(set(ranks))]
    for k in order:
        for _ in range(max(warmup, 0)):
            run_rank(session, feeds, k)
    times: dict[int, list[float]] = {k: [] for k in order}
    for _ in range(repeats):
        for k in order:
            t0 = time.perf_counter()
            run_rank(session, feeds, k)
            times[k].append((time.perf_counter() - t0) * 1000.0)
    return LatencyReport({k: statistics.median(v) for k, v in times.items()}, batch, seq, repeats, machine_info(provider, threads))
