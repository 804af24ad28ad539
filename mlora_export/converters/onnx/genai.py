"""``export_genai``: a nested adapter + its base model → a folder ONNX Runtime GenAI generates from.

The folder holds ``model.onnx`` (a decoder with a KV cache, :mod:`.genai_graph`), a
``genai_config.json`` as GenAI's model builder writes it, the base model's tokenizer files and
``export_info.json``. Two kinds:

- ``genai`` (dynamic rank): the graph input ``lora_rank`` (int64 scalar, clamped into
  ``[0, r]``, ``0`` = the base model) is fed per request with
  ``generator.set_model_input("lora_rank", np.array(k, dtype=np.int64))``. It is a required
  input: GenAI feeds only the model inputs ONNX Runtime reports as required, so a default would
  silently win over ``set_model_input``.
- ``genai-adapters``: the LoRA factors are graph inputs in Olive's naming with empty rank-0
  defaults (no adapter = the base model), plus ``adapters/r{k}.onnx_adapter`` per train rank,
  selected per request with ``og.Adapters.load`` and ``generator.set_active_adapter``.

Before anything is written, ONNX Runtime runs the graph step by step with its own cache (a
prompt, then two decoding steps) and must match the float32 PyTorch reference of docs/design.md §1 on
the whole sequence at every checked rank.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...adapter import NestedAdapter, write_json
from ...base import check_fits, check_float_targets, scan_base
from ...errors import ConfigError
from ...fs import atomic_output_dir
from ...params import merge_legacy
from ...progress import Progress, StepCounter
from .common import (
    MODEL_NAME,
    OnnxExportOptions,
    OnnxExportResult,
    check_room,
    finish_model,
    graph_size,
    open_export_inputs,
    write_export_info,
)
from .genai_graph import (
    build_decoder_top,
    export_decoder,
    input_names,
    kv_shape,
    past_names,
    present_names,
)
from .graph import TASK_CAUSAL_LM, load_export_model
from .kinds import ExportKind
from .verify import reference_logits, sample_inputs, verify_export

if TYPE_CHECKING:
    import numpy as np
    import onnxruntime

logger = logging.getLogger(__name__)

GENAI_CONFIG_NAME = "genai_config.json"
INFO_FORMAT = "mlora-onnx-genai/1"
GENAI_KINDS: tuple[str, ...] = tuple(k.value for k in ExportKind if k.decoder)
#: transformers ``model_type`` → GenAI's model ``type``: the decoders this export is tested on.
GENAI_MODEL_TYPES: dict[str, str] = {"llama": "llama", "qwen2": "qwen2"}
#: Tokenizer files of the base model folder that GenAI (onnxruntime-extensions) reads, copied when present.
TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
    "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json",
)
#: The verification run: a prompt of ``STEPS[0]`` tokens, then decoding steps of ``STEPS[1:]`` tokens.
STEPS: tuple[int, ...] = (5, 2, 1)


@dataclass
class GenaiExportResult(OnnxExportResult):
    """What a GenAI export wrote and how it verified."""

    outputs: list[str] | None = None
    model_type: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "outputs": self.outputs or ["logits"], "genai_config": GENAI_CONFIG_NAME, "model_type": self.model_type}


def genai_model_type(config: Any, base_model: str | os.PathLike[str]) -> str:
    """GenAI's ``type`` for a transformers config.

    Raises:
        ConfigError: the architecture is not one this export supports.
    """
    mt = str(getattr(config, "model_type", ""))
    if mt not in GENAI_MODEL_TYPES:
        raise ConfigError(
            f"base model {str(base_model)!r} is a {mt or 'model of unknown type'!r}; the ONNX Runtime GenAI export supports "
            f"{', '.join(sorted(GENAI_MODEL_TYPES))} decoders (use the plain ONNX export for other models)"
        )
    return GENAI_MODEL_TYPES[mt]


def _token_id(value: Any) -> Any:
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else (None if value is None else int(value))


def genai_config(config: Any, model_type: str, model_file: str = MODEL_NAME) -> dict[str, Any]:
    """``genai_config.json`` for the decoder graph of :mod:`.genai_graph`, in the model builder's layout.

    Greedy search by default (``do_sample`` false, one beam); ``max_length`` is the model's
    context length. ``past_present_share_buffer`` is false: ``present`` holds past plus new tokens.
    """
    layers, kv_heads, head = kv_shape(config)
    context = int(getattr(config, "max_position_embeddings", 0) or 2048)
    eos = _token_id(getattr(config, "eos_token_id", None))
    bos = _token_id(getattr(config, "bos_token_id", None))
    pad = _token_id(getattr(config, "pad_token_id", None))
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    return {
        "model": {
            "bos_token_id": bos if bos is not None else 1,
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": model_file,
                "head_size": head,
                "hidden_size": int(config.hidden_size),
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"},
                "num_attention_heads": int(config.num_attention_heads),
                "num_hidden_layers": layers,
                "num_key_value_heads": kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": model_type,
            "vocab_size": int(config.vocab_size),
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": context, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1, "num_return_sequences": 1,
            "past_present_share_buffer": False, "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }


def copy_tokenizer(base_dir: Path, out: Path) -> list[str]:
    """Copy the tokenizer files of ``base_dir`` that exist (regular files) into ``out``; return their names."""
    copied = []
    for name in TOKENIZER_FILES:
        src = base_dir / name
        if src.is_file() and not src.is_symlink():
            shutil.copyfile(src, out / name)
            copied.append(name)
    if "tokenizer.json" not in copied and "tokenizer.model" not in copied:
        logger.warning("%s has no tokenizer.json or tokenizer.model: og.Tokenizer will not load from the export (feed token ids)", base_dir)
    return copied


def run_steps(
    session: "onnxruntime.InferenceSession", ids: "np.ndarray", num_layers: int, kv_heads: int, head: int,
    extra: dict[str, "np.ndarray"], run_options: Any = None, steps: Sequence[int] = STEPS,
) -> "np.ndarray":
    """Logits of ``ids`` computed as GenAI does: the prompt with an empty cache, then step by step with
    the previous ``present`` fed back as ``past_key_values``; concatenated over the steps."""
    import numpy as np

    batch = ids.shape[0]
    past = {n: np.zeros((batch, kv_heads, 0, head), dtype=np.float32) for n in past_names(num_layers)}
    outputs = ["logits", *present_names(num_layers)]
    done, pieces = 0, []
    for n in steps:
        chunk = ids[:, done : done + n]
        feeds = {
            "input_ids": chunk,
            "attention_mask": np.ones((batch, done + n), dtype=np.int64),
            "position_ids": np.broadcast_to(np.arange(done, done + n, dtype=np.int64), (batch, n)).copy(),
            **past, **extra,
        }
        got = session.run(outputs, feeds, run_options=run_options)
        pieces.append(got[0])
        past = dict(zip(past_names(num_layers), got[1:]))
        done += n
    return np.concatenate(pieces, axis=1)


def _check_type_early(root: Path, base_model: str | os.PathLike[str]) -> None:
    """Refuse an unsupported architecture from ``config.json`` before the weights load (a config
    transformers cannot read is left to the loader, which reports it)."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(root)
    except Exception:  # noqa: BLE001
        return
    genai_model_type(config, base_model)


def _active(adapter_file: Path) -> tuple[Any, Any]:
    """``(run_options, adapter)`` with the ``.onnx_adapter`` file active; keep ``adapter`` alive while
    the options are used (ONNX Runtime's run options hold a bare pointer to it)."""
    import onnxruntime as ort

    lora = ort.LoraAdapter()
    lora.Load(str(adapter_file))
    ro = ort.RunOptions()
    ro.add_active_adapter(lora)
    return ro, lora


def export_genai(adapter: str | os.PathLike[str] | NestedAdapter, base_model: str | os.PathLike[str], output: str | os.PathLike[str],
                 options: OnnxExportOptions | None = None, *, force: bool = False, progress: Progress | None = None, **legacy: Any) -> GenaiExportResult:
    """Export ``adapter`` on the decoder ``base_model`` to a GenAI model folder ``output`` (module docstring).

    ``options`` (:class:`~.common.OnnxExportOptions`, ``genai`` implied): ``adapters_per_rank``
    chooses the ``genai-adapters`` kind; a fixed ``rank`` or ``merged`` is refused. The options
    passed as keywords of this function still work for one release, with a ``DeprecationWarning``.

    Raises:
        ConfigError: a fixed rank or a merged export, a bad opset, an unavailable provider, or an
            architecture GenAI export does not support.
        OutputExistsError: ``output`` exists without ``force`` or cannot be written.
        OutputPathError: ``output`` is, holds or lies inside the adapter or base model folder.
        InvalidAdapterError, BaseModelError, BaseModelMismatchError: bad inputs.
        ExportError: the exporter fails, or ONNX Runtime disagrees with PyTorch beyond tolerance.
    """
    import numpy as np

    options = dataclasses.replace(merge_legacy(options, OnnxExportOptions, legacy, "export_genai"), genai=True)
    t0 = time.perf_counter()
    kind = options.kind()
    graph_kind = ExportKind.ADAPTERS if options.adapters_per_rank else ExportKind.DYNAMIC  # how the decoder takes the LoRA
    nested, sources = open_export_inputs(adapter, base_model, output, options, force)
    adapter_ranks = list(nested.config.train_ranks) if options.adapters_per_rank else []
    verify_ranks = [0, *nested.config.train_ranks] if options.verify else []
    tick = StepCounter(4 + len(adapter_ranks) + len(verify_ranks), progress, logger, "genai export")
    base = scan_base(base_model)
    check_float_targets(base, nested.modules)  # headers only: before the model loads
    _check_type_early(base.root, base_model)
    model, task, model_type = _load_decoder(nested, base_model)
    shape = kv_shape(model.config)  # (layers, kv_heads, head)
    layers = shape[0]
    nbytes, external = graph_size(model, nested, nested.max_rank if graph_kind.rank_input else 0, options.external_data)
    tick("base model loaded")
    ids = sample_inputs(int(model.config.vocab_size), batch=2, seq=sum(STEPS))["input_ids"]
    refs = reference_logits(model, task, nested, verify_ranks, {"input_ids": ids, "attention_mask": np.ones_like(ids)}) if options.verify else {}

    check_room(output, nbytes, nested, adapter_ranks)
    with atomic_output_dir(output, force, sources) as tmp:
        top = build_decoder_top(model, nested, graph_kind)
        tick("model wrapped")
        path = tmp / MODEL_NAME
        export_decoder(top, model.config, nested, graph_kind, path, opset=options.opset, external_data=external)
        files = finish_model(path, nested, graph_kind.factor_inputs, "dynamo", adapter_ranks, tick)
        names = input_names(layers, nested, graph_kind)
        shown = names if graph_kind.rank_input else names[: 3 + 2 * layers] + ["<module>.lora_A.weight", "<module>.lora_B.weight"]
        result = GenaiExportResult(kind, Path(output), task, "dynamo", options.opset, None, shown, external,
                                   outputs=["logits", *present_names(layers)], model_type=model_type)
        result.adapter_files = files
        if options.verify:
            run = functools.partial(_run_decoder, graph_kind.rank_input, ids, shape, {k: tmp / f for k, f in files.items()})
            result.checks = verify_export(path, options.provider, verify_ranks, refs, run, tolerance=(options.atol, options.rtol), tick=tick,
                                          what="ONNX Runtime (with its KV cache)")
        write_json(tmp / GENAI_CONFIG_NAME, genai_config(model.config, model_type))
        tokenizer_files = copy_tokenizer(base.root, tmp)
        result.seconds = time.perf_counter() - t0
        write_export_info(tmp, result, nested, base_model, names, info_format=INFO_FORMAT, tokenizer_files=tokenizer_files,
                          lora_rank={"required": True, "genai": "generator.set_model_input('lora_rank', np.array(k, dtype=np.int64))"})
    return result


def _load_decoder(nested: NestedAdapter, base_model: str | os.PathLike[str]) -> tuple[Any, str, str]:
    """``(model, task, GenAI model type)``: the float32 base, refused unless it is a causal LM of a
    supported type that the adapter fits.

    Raises:
        ConfigError: not a causal LM, or an architecture this export does not support.
        BaseModelError, BaseModelMismatchError: see :func:`~mlora_export.base.check_fits`.
    """
    model, task = load_export_model(base_model)
    if task != TASK_CAUSAL_LM:
        raise ConfigError(f"base model {str(base_model)!r} is not a causal LM; ONNX Runtime GenAI generates from decoders only")
    model_type = genai_model_type(model.config, base_model)
    check_fits(nested, model, base=str(base_model))
    return model, task, model_type


def _run_decoder(
    rank_input: bool, ids: "np.ndarray", shape: tuple[int, int, int], adapter_files: dict[int, Path],
    session: "onnxruntime.InferenceSession", k: int,
) -> "np.ndarray":
    """The logits of the decoder at rank ``k``, step by step as GenAI runs it (:func:`run_steps`):
    ``lora_rank`` fed, or the rank's adapter file active (none at ``k = 0``: the base model)."""
    import numpy as np

    layers, kv_heads, head = shape
    if rank_input:
        return run_steps(session, ids, layers, kv_heads, head, {"lora_rank": np.array(k, dtype=np.int64)})
    ro, lora = _active(adapter_files[k]) if k else (None, None)
    got = run_steps(session, ids, layers, kv_heads, head, {}, ro)
    del ro, lora
    return got


__all__ = [
    "GENAI_CONFIG_NAME", "GENAI_KINDS", "GENAI_MODEL_TYPES", "GenaiExportResult", "copy_tokenizer", "export_genai", "genai_config",
    "genai_model_type", "run_steps",
]
