"""Check an exported model in ONNX Runtime against PyTorch, rank by rank.

The reference at rank ``k`` is docs/design.md §1 applied to the base model in **float64**:
``W + s(k)·B[:, :k]·A[:k, :]``, computed as ``W·x + s(k)·B[:, :k]·(A[:k, :]·x)`` by forward hooks on
the targeted modules (the same in float64 to far below float32's rounding), independent of the
wrappers that were exported; ``k = 0`` is the base model itself. A float32 graph cannot match it
exactly, and on a deep model not even closely: rounding differences grow layer by layer (on
SmolLM2-135M's 30 layers, float32 PyTorch was measured 1e-4 to 4e-2 away from float64 on random
token ids, depending on the adapter and on the order of the operations). So
the tolerance is set by what float32 can promise on *this* model: float32 PyTorch is run too, both
with the delta merged into the weights and with it added to each module's output as the graph
computes it, and ONNX Runtime may be :data:`FLOAT32_FACTOR` times as far from float64 as the
farther of the two, plus a floor ``ATOL + RTOL·max|ref|``. A correct float32 export is within it;
a wrong graph (a wrong scale, a missing module, a wrong slice) moves the logits by the adapter's
effect, far beyond it on small models, where float32 is exact to about 1e-6.

The inputs are real text encoded by the base folder's tokenizer (:data:`VERIFY_TEXTS`), not
random token ids, which drive a pretrained model into activations no text produces and inflate
the float32 error; a folder without a usable tokenizer falls back to fixed random ids. Besides
the logits, the greedy token at every position (teacher-forced argmax) must equal the float64
reference's wherever its top two logits are further apart than twice the tolerance (near ties
are counted, not judged).
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

#: The floor of the tolerance: ``ATOL + RTOL * max|ref|`` (float32 logits of a shallow model are within ~1e-6).
ATOL = 1e-4
RTOL = 1e-4
#: ONNX Runtime may be this many times as far from the float64 reference as float32 PyTorch is.
FLOAT32_FACTOR = 4.0
#: The verification text (prose and code), encoded by the base folder's tokenizer without special tokens.
VERIFY_TEXTS: tuple[str, ...] = (
    "The capital of France is Paris. It lies on the Seine, and about two million people live in the city itself, "
    "which is known for its museums, its cafés and the Eiffel Tower.",
    "def add(a, b):\n    \"\"\"Return the sum of a and b.\"\"\"\n    return a + b\n\n\nfor i in range(3):\n    print(i, add(i, 2))\n",
)


@dataclass(frozen=True)
class Reference:
    """PyTorch at one rank: the float64 logits and how far float32 PyTorch is from them (max abs)."""

    logits: "np.ndarray"
    float32_error: float


@dataclass(frozen=True)
class RankCheck:
    """The verification of one rank.

    ``max_abs_diff``: ONNX Runtime vs the float64 reference; ``tolerance``: the floor plus
    :data:`FLOAT32_FACTOR` × ``float32_error`` (float32 PyTorch vs float64); ``argmax_equal`` of
    ``positions``: where the greedy token agrees; ``argmax_wrong``: disagreements outside near ties.
    """

    rank: int
    max_abs_diff: float
    tolerance: float
    float32_error: float = 0.0
    argmax_equal: int = 0
    positions: int = 0
    argmax_wrong: int = 0

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance and self.argmax_wrong == 0

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "max_abs_diff": self.max_abs_diff, "tolerance": self.tolerance, "ok": self.ok,
                "reference": "float64", "float32_torch_diff": self.float32_error,
                "argmax_equal": self.argmax_equal, "positions": self.positions, "argmax_wrong": self.argmax_wrong}


def sample_inputs(vocab: int, batch: int = 2, seq: int = 8, seed: int = 0) -> dict[str, "np.ndarray"]:
    """Deterministic random ``input_ids`` / ``attention_mask`` feeds (int64)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(min(3, vocab - 1), vocab, size=(batch, seq), dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def text_inputs(base_dir: str | os.PathLike[str], vocab: int, batch: int = 2, seq: int = 16) -> tuple[dict[str, "np.ndarray"], str]:
    """``(feeds, source)``: :data:`VERIFY_TEXTS` encoded by the tokenizer of ``base_dir``, ``batch``
    rows of ``seq`` tokens (a text too short is repeated), ``source == "text"``; without a usable
    tokenizer (or with ids outside the model's vocabulary), :func:`sample_inputs` and ``"random"``."""
    import numpy as np

    try:
        from ...base import load_tokenizer

        tok = load_tokenizer(base_dir)
        rows = []
        for i in range(batch):
            ids = list(tok(VERIFY_TEXTS[i % len(VERIFY_TEXTS)], add_special_tokens=False)["input_ids"])
            if not ids:
                raise ValueError("the tokenizer encodes the text to no tokens")
            rows.append((ids * (seq // len(ids) + 1))[:seq])
        arr = np.asarray(rows, dtype=np.int64)
        if arr.min() < 0 or arr.max() >= vocab:
            raise ValueError(f"token ids outside the model's vocabulary of {vocab}")
    except Exception as e:  # noqa: BLE001 - any tokenizer problem: verify on random ids instead
        logger.info("verifying on random token ids: no usable tokenizer in %s (%s)", base_dir, str(e).splitlines()[0] if str(e) else type(e).__name__)
        return sample_inputs(vocab, batch, seq), "random"
    return {"input_ids": arr, "attention_mask": np.ones_like(arr)}, "text"


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


@contextlib.contextmanager
def added_at(model: "torch.nn.Module", adapter: NestedAdapter, k: int, dtype: "torch.dtype | None" = None) -> Iterator["torch.nn.Module"]:
    """``model`` with ``s(k)·B[:, :k]·(A[:k]·x)`` added to each targeted module's output (forward
    hooks, in ``dtype``, default float32), the order in which the exported graphs compute it; the
    weights are not touched. Removed after the block."""
    import torch

    dtype = dtype or torch.float32
    handles = []
    try:
        if k > 0:
            with adapter.reader() as rd:
                for name in adapter.modules:
                    a = rd.lora_A(name, k).to(dtype)
                    b = (rd.lora_B(name, k).to(dtype) * adapter.scale(k)).contiguous()

                    def hook(mod: Any, args: tuple[Any, ...], out: "torch.Tensor", a: "torch.Tensor" = a, b: "torch.Tensor" = b) -> "torch.Tensor":
                        return out + torch.nn.functional.linear(torch.nn.functional.linear(args[0], a), b)

                    handles.append(model.get_submodule(name).register_forward_hook(hook))
        yield model
    finally:
        for h in handles:
            h.remove()


def _logits(model: "torch.nn.Module", task: str, ids: "torch.Tensor", mask: "torch.Tensor") -> "np.ndarray":
    """The model's logits as a numpy array in the model's own float dtype."""
    import torch

    kwargs = {"use_cache": False} if task == "causal-lm" else {}
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kwargs).logits.numpy()


@contextlib.contextmanager
def as_float64(model: "torch.nn.Module") -> Iterator["torch.nn.Module"]:
    """``model`` with every floating-point parameter and buffer in float64 inside the block, each
    restored to its own dtype after (float32 → float64 → float32 is exact)."""
    import torch

    tensors: list[tuple[Any, str, torch.dtype]] = []
    for mod in model.modules():
        for store in (mod._parameters, mod._buffers):
            for name, t in store.items():
                if t is not None and t.is_floating_point() and t.dtype != torch.float64:
                    tensors.append((store, name, t.dtype))
    seen: set[int] = set()
    try:
        for store, name, _ in tensors:
            t = store[name]
            if id(t) not in seen:  # a tied weight is one Parameter in two modules: convert it once
                seen.add(id(t))
                t.data = t.data.to(torch.float64)
        yield model
    finally:
        done: set[int] = set()
        for store, name, dtype in tensors:
            t = store[name]
            if id(t) not in done:
                done.add(id(t))
                t.data = t.data.to(dtype)


def reference_logits(
    model: "torch.nn.Module", task: str, adapter: NestedAdapter, ranks: Sequence[int], feeds: dict[str, "np.ndarray"]
) -> dict[int, Reference]:
    """For each ``k`` in ``ranks``: the float64 logits of the base model with the rank-``k`` delta
    (added to each targeted module's output by :func:`added_at`: in float64 the same as merging
    ``ΔW_k`` into the weights, to far below float32's rounding, and no weight is copied), and the
    max distance from them of two float32 PyTorch computations: the delta merged into the weights
    (:func:`merged_at`) and added to the outputs as the graphs compute it.

    Two, because one float32 computation is a poor estimate of float32's error on a deep model:
    on SmolLM2-135M with random token ids the two were 1.0e-4 and 1.2e-3 away from float64 at rank
    1, and ONNX Runtime 2.7e-3 (on text all three are within 2e-4).

    ``model`` is the float32 base; it is converted to float64 in place for the reference and back
    after (exact: float32 → float64 → float32 restores every bit), so this needs the model's memory
    a second time, not a third.
    """
    import numpy as np
    import torch

    ids = torch.from_numpy(feeds["input_ids"])
    mask = torch.from_numpy(feeds["attention_mask"])
    f32: dict[int, list[np.ndarray]] = {}
    for k in ranks:
        with added_at(model, adapter, k) as m:
            f32[k] = [_logits(m, task, ids, mask)]
        if k > 0:
            with merged_at(model, adapter, k) as m:
                f32[k].append(_logits(m, task, ids, mask))
    out = {}
    with as_float64(model):
        for k in ranks:
            with added_at(model, adapter, k, torch.float64) as m:
                ref = _logits(m, task, ids, mask)
            err = max(float(np.max(np.abs(x.astype(np.float64) - ref))) if ref.size else 0.0 for x in f32[k])
            out[k] = Reference(ref, err)
    return out


def compare(rank: int, got: "np.ndarray", ref: Reference, atol: float = ATOL, rtol: float = RTOL, factor: float = FLOAT32_FACTOR) -> RankCheck:
    """``got`` (ONNX Runtime) vs the float64 reference: max abs difference, the tolerance
    ``atol + rtol·max|ref| + factor·float32_error``, and the greedy token (argmax over the last axis)
    at every position, judged where the reference's top two logits differ by more than twice the tolerance."""
    import numpy as np

    want = ref.logits
    if got.shape != want.shape:
        return RankCheck(rank, float("inf"), 0.0, ref.float32_error)
    if not got.size:
        return RankCheck(rank, 0.0, atol, ref.float32_error)
    tol = atol + rtol * float(np.max(np.abs(want))) + factor * ref.float32_error
    diff = float(np.max(np.abs(got.astype(np.float64) - want)))
    if not np.isfinite(diff):
        diff = float("inf")
    if want.shape[-1] > 1:
        top2 = np.partition(want, -2, axis=-1)[..., -2:]  # [..., 1] is the largest, [..., 0] the second
        decisive = (top2[..., 1] - top2[..., 0]) > 2 * tol
    else:
        decisive = np.ones(want.shape[:-1], dtype=bool)
    same = np.argmax(got, axis=-1) == np.argmax(want, axis=-1)
    return RankCheck(rank, diff, tol, ref.float32_error, int(same.sum()), int(same.size), int((decisive & ~same).sum()))


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
        parts = []
        for c in bad:
            part = f"rank {c.rank} max abs diff {c.max_abs_diff:.3g} > {c.tolerance:.3g}" if c.max_abs_diff > c.tolerance else f"rank {c.rank}"
            if c.argmax_wrong:
                part += f" (greedy token differs at {c.argmax_wrong} of {c.positions} positions)"
            parts.append(part)
        raise ExportError(
            f"{what} disagrees with PyTorch: " + ", ".join(parts)
            + f" ({provider}; float64 reference, tolerance {FLOAT32_FACTOR:g}× float32 PyTorch's own error); nothing was written. "
            "Try another opset, or report this with MLORA_DEBUG=1 -vv",
            option="opset",
        )


def verify_export(
    path: str | os.PathLike[str],
    provider: str,
    ranks: Sequence[int],
    refs: dict[int, Reference],
    run: Callable[["onnxruntime.InferenceSession", int], "np.ndarray"],
    *,
    tolerance: tuple[float, float] = (ATOL, RTOL),
    tick: Callable[[str], None] | None = None,
    what: str = "ONNX Runtime",
) -> list[RankCheck]:
    """Run the written model at each of ``ranks`` (``run(session, k)`` gives its logits) and compare
    them with PyTorch's ``refs[k]`` within ``tolerance`` (``(atol, rtol)``, :func:`compare`); log each
    rank's check and ``tick`` after it.

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
        logger.info("rank %d: max abs diff %.3g vs float64 (tolerance %.3g; float32 PyTorch %.3g), greedy token equal at %d of %d positions",
                    k, check.max_abs_diff, check.tolerance, check.float32_error, check.argmax_equal, check.positions)
        checks.append(check)
        if tick is not None:
            tick(f"verified rank {k}")
    del session
    raise_on_mismatch(checks, provider, what)
    return checks


__all__ = [
    "ATOL", "FLOAT32_FACTOR", "RTOL", "RankCheck", "Reference", "VERIFY_TEXTS", "added_at", "as_float64", "check_onnx_model", "check_provider",
    "compare", "make_session", "merged_at", "raise_on_mismatch", "reference_logits", "run_adapter", "run_rank", "sample_inputs",
    "text_inputs", "verify_export",
]
