"""Check an exported model in ONNX Runtime against PyTorch, rank by rank.

The reference at rank ``k`` is docs/design.md §1 applied to the float32 base model:
``W + s(k)·B[:, :k]·A[:k, :]`` written into the weights (then restored), independent of the
wrappers that were exported. ``k = 0`` is the base model itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...adapter import NestedAdapter
from ...errors import ConfigError

if TYPE_CHECKING:
    import numpy as np
    import onnxruntime
    import torch

logger = logging.getLogger(__name__)

#: A rank passes when ``max|ort - torch| <= ATOL + RTOL * max|torch|`` (float32 logits).
ATOL = 1e-4
RTOL = 1e-4


@dataclass(frozen=True)
class RankCheck:
    """The verification of one rank: max abs difference of the logits and the tolerance used."""

    rank: int
    max_abs_diff: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "max_abs_diff": self.max_abs_diff, "tolerance": self.tolerance, "ok": self.ok}


def sample_inputs(vocab: int, batch: int = 2, seq: int = 8, seed: int = 0) -> dict[str, "np.ndarray"]:
    """Deterministic ``input_ids`` / ``attention_mask`` feeds (int64) for verification."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(min(3, vocab - 1), vocab, size=(batch, seq), dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def check_provider(provider: str) -> str:
    """Return ``provider`` if this onnxruntime build has it.

    Raises:
        ConfigError: it does not (with the install hint for CUDA).
    """
    import onnxruntime as ort

    available = ort.get_available_providers()
    if provider not in available:
        hint = " (install the GPU build: pip install '.[gpu]')" if provider == "CUDAExecutionProvider" else ""
        raise ConfigError(f"execution provider {provider!r} is not available{hint}; available: {', '.join(available)}")
    return provider


def make_session(path: str | os.PathLike[str], provider: str = "CPUExecutionProvider", threads: int | None = None) -> "onnxruntime.InferenceSession":
    """An ONNX Runtime session on ``provider``.

    Raises:
        ConfigError: ``provider`` is not available in this onnxruntime build.
    """
    import onnxruntime as ort

    check_provider(provider)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers)


def run_rank(session: "onnxruntime.InferenceSession", feeds: dict[str, "np.ndarray"], rank: int) -> "np.ndarray":
    """Logits of a dynamic-rank session at ``lora_rank = rank``."""
    import numpy as np

    return session.run(["logits"], {**feeds, "lora_rank": np.array(rank, dtype=np.int64)})[0]


def run_adapter(session: "onnxruntime.InferenceSession", feeds: dict[str, "np.ndarray"], adapter_file: str | os.PathLike[str]) -> "np.ndarray":
    """Logits of an ``adapters`` session with the ``.onnx_adapter`` file active for this run."""
    import onnxruntime as ort

    lora = ort.LoraAdapter()
    lora.Load(str(adapter_file))
    ro = ort.RunOptions()
    ro.add_active_adapter(lora)
    return session.run(["logits"], feeds, run_options=ro)[0]


@contextlib.contextmanager
def merged_at(model: "torch.nn.Module", adapter: NestedAdapter, k: int) -> Iterator["torch.nn.Module"]:
    """``model`` with ``ΔW_k`` added to its float32 weights inside the block, restored after."""
    import torch

    if k == 0:
        yield model
        return
    saved = {}
    try:
        with adapter.reader() as rd, torch.no_grad():
            for name in adapter.modules:
                w = model.get_submodule(name).weight
                saved[name] = w.detach().clone()
                w.add_(rd.delta_weight(name, k).to(w.dtype))
        yield model
    finally:
        with torch.no_grad():
            for name, w0 in saved.items():
                model.get_submodule(name).weight.copy_(w0)


def reference_logits(
    model: "torch.nn.Module", task: str, adapter: NestedAdapter, ranks: Sequence[int], feeds: dict[str, "np.ndarray"]
) -> dict[int, "np.ndarray"]:
    """PyTorch float32 logits of the base model with the rank-``k`` delta, for each ``k`` in ``ranks``."""
    import torch

    ids = torch.from_numpy(feeds["input_ids"])
    mask = torch.from_numpy(feeds["attention_mask"])
    out = {}
    for k in ranks:
        with merged_at(model, adapter, k) as m, torch.no_grad():
            kwargs = {"use_cache": False} if task == "causal-lm" else {}
            out[k] = m(input_ids=ids, attention_mask=mask, **kwargs).logits.float().numpy()
    return out


def compare(rank: int, got: "np.ndarray", ref: "np.ndarray", atol: float = ATOL, rtol: float = RTOL) -> RankCheck:
    """Max abs difference of ``got`` vs ``ref`` and the tolerance ``atol + rtol·max|ref|``."""
    import numpy as np

    if got.shape != ref.shape:
        return RankCheck(rank, float("inf"), 0.0)
    diff = float(np.max(np.abs(got.astype(np.float64) - ref.astype(np.float64)))) if got.size else 0.0
    if not np.isfinite(diff):
        diff = float("inf")
    return RankCheck(rank, diff, atol + rtol * float(np.max(np.abs(ref))) if ref.size else atol)


def check_onnx_model(path: str | os.PathLike[str], default_opset: int) -> None:
    """``onnx.checker`` on the written model (external data too).

    Raises:
        ExportError: the checker refuses it (with its first line and the opset hint).
    """
    import onnx

    from ...errors import ExportError

    try:
        onnx.checker.check_model(str(path))
    except Exception as e:  # onnx raises several types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"the exported model fails onnx.checker ({first}); try another opset (default {default_opset})", option="opset") from e


def raise_on_mismatch(checks: list[RankCheck], provider: str, what: str = "ONNX Runtime") -> None:
    """Raise :class:`ExportError` naming every rank where ``what`` disagreed with PyTorch beyond tolerance."""
    from ...errors import ExportError

    bad = [c for c in checks if not c.ok]
    if bad:
        raise ExportError(
            f"{what} disagrees with PyTorch: "
            + ", ".join(f"rank {c.rank} max abs diff {c.max_abs_diff:.3g} > {c.tolerance:.3g}" for c in bad)
            + f" ({provider}); nothing was written. Try another opset, or report this with MLORA_DEBUG=1 -vv",
            option="opset",
        )


def verify_export(
    path: str | os.PathLike[str],
    provider: str,
    ranks: Sequence[int],
    refs: dict[int, "np.ndarray"],
    run: Callable[["onnxruntime.InferenceSession", int], "np.ndarray"],
    *,
    tolerance: tuple[float, float] = (ATOL, RTOL),
    tick: Callable[[str], None] | None = None,
    what: str = "ONNX Runtime",
) -> list[RankCheck]:
    """Run the written model at each of ``ranks`` (``run(session, k)`` gives its logits) and compare
    them with PyTorch's ``refs[k]`` within ``tolerance`` (``(atol, rtol)``, :func:`compare`); log
    each rank's difference and ``tick`` after it.

    One loop for every export kind, so each verifies, reports and fails alike; the session is
    closed before the check that raises, so the output folder can be removed.

    Raises:
        ConfigError: ``provider`` is not available.
        ExportError: a rank disagrees beyond tolerance (every such rank named, see :func:`raise_on_mismatch`).
    """
    session = make_session(path, provider)
    checks = []
    for k in ranks:
        check = compare(k, run(session, k), refs[k], *tolerance)
        logger.info("rank %d: max abs diff %.3g (tolerance %.3g)", k, check.max_abs_diff, check.tolerance)
        checks.append(check)
        if tick is not None:
            tick(f"verified rank {k}")
    del session
    raise_on_mismatch(checks, provider, what)
    return checks


__all__ = [
    "ATOL", "RTOL", "RankCheck", "check_onnx_model", "check_provider", "compare", "make_session", "merged_at",
    "raise_on_mismatch", "reference_logits", "run_adapter", "run_rank", "sample_inputs", "verify_export",
]
