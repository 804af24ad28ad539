"""Training checkpoints without pickles: optimizer, scheduler and random states as safetensors + JSON.

``transformers.Trainer`` writes a checkpoint's optimizer, scheduler and RNG states with
``torch.save`` and reads them back with ``torch.load`` (its restricted ``weights_only`` unpickler).
The project never unpickles a user's file (docs/design.md §2), and a checkpoint folder is one, so
:class:`~.trainer.NestedTrainer` writes those states as a safetensors file of the tensors plus a JSON file
of everything else, and reads only those. The rest of a checkpoint is already pickle-free: the
LoRA factors (PEFT's ``adapter_model.safetensors``) and ``trainer_state.json``; the
``training_args.bin`` pickle that ``Trainer`` adds is removed. (The ``Trainer`` overrides that do
this are in :mod:`.trainer`.) Last, ``mlora_checkpoint.json``
records the run's settings and data fingerprint; it is written after everything else, so a folder
without it is an incomplete checkpoint.

Supported: one process and DDP (every process holds the whole optimizer state). FSDP and DeepSpeed
save engine-specific shards; :func:`~mlora_export.training.pipeline.train` refuses checkpoints under them.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError, ExportError
from ..io.jsonio import loads

logger = logging.getLogger(__name__)

#: The file :class:`~.trainer.NestedTrainer` writes last in each checkpoint (what resuming checks).
MARKER = "mlora_checkpoint.json"
FORMAT = "mlora-checkpoint/1"
OPTIMIZER = "optimizer"
SCHEDULER = "scheduler"
#: Files ``Trainer`` would write with ``torch.save`` (removed or never written here).
PICKLES = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "scaler.pt", "training_args.bin")


# -- a state (nested dicts, lists, tuples, tensors, numpy arrays, scalars) as JSON + tensors ---------
def _encode(obj: Any, tensors: dict[str, Any]) -> Any:
    import numpy as np
    import torch

    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach().to("cpu").contiguous()
        return {"__tensor__": name}
    if isinstance(obj, np.ndarray):
        name = f"t{len(tensors)}"
        tensors[name] = torch.from_numpy(obj.astype(np.int64) if obj.dtype.kind in "ui" else obj.copy())
        return {"__ndarray__": name, "dtype": obj.dtype.str}
    if isinstance(obj, np.generic):
        return _encode(obj.item(), tensors)
    if isinstance(obj, Mapping):
        return {"__dict__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise ExportError(f"a training state holds a {type(obj).__name__}, which a checkpoint cannot store without a pickle")


def _decode(obj: Any, tensors: Mapping[str, Any]) -> Any:
    import numpy as np

    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return tensors[obj["__ndarray__"]].numpy().astype(np.dtype(obj["dtype"]))
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if "__dict__" in obj:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__dict__"]}
    return obj


def save_state(state: Any, folder: str | os.PathLike[str], name: str) -> None:
    """Write ``state`` as ``name.json`` (structure and scalars) and ``name.safetensors`` (tensors).

    Raises:
        ExportError: ``state`` holds something other than dicts, lists, tuples, tensors, numpy arrays and scalars.
    """
    from safetensors.torch import save_file

    tensors: dict[str, Any] = {}
    tree = _encode(state, tensors)
    folder = Path(folder)
    save_file(tensors, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps(tree), encoding="utf-8")


def load_state(folder: str | os.PathLike[str], name: str) -> Any:
    """Read what :func:`save_state` wrote (safetensors and JSON only).

    Raises:
        ConfigError: the files are missing or unreadable.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        tensors = load_file(str(folder / f"{name}.safetensors"))
        tree = loads((folder / f"{name}.json").read_bytes())
    except (OSError, ValueError) as e:
        raise ConfigError(f"checkpoint {str(folder)!r}: cannot read its {name} state ({e}); resume from a complete checkpoint",
                          path=folder, option="resume") from e
    return _decode(tree, tensors)


# -- random states -----------------------------------------------------------------------------
def _accelerator_module() -> Any | None:
    """The ``torch.<device>`` module of this host's accelerator (``torch.cuda``…), if it has one."""
    import torch

    acc = getattr(torch, "accelerator", None)
    device = acc.current_accelerator() if acc is not None and acc.is_available() else None
    if device is None:
        return torch.cuda if torch.cuda.is_available() else None
    module = getattr(torch, device.type, None)
    return module if module is not None and hasattr(module, "get_rng_state") else None


def rng_states() -> dict[str, Any]:
    """Python's, numpy's, torch's CPU and this process's accelerator random states."""
    import numpy as np
    import torch

    states: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
    module = _accelerator_module()
    if module is not None:
        states["accelerator"] = module.get_rng_state()
    return states


def set_rng_states(states: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_states` returned."""
    import numpy as np
    import torch

    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.random.set_rng_state(states["cpu"])
    module = _accelerator_module()
    if module is not None and "accelerator" in states:
        module.set_rng_state(states["accelerator"])


def rng_name(process_index: int, world_size: int) -> str:
    return "rng_state" if world_size <= 1 else f"rng_state_{process_index}"


# -- resuming ------------------------------------------------------------------------------------
def read_checkpoint(path: str | os.PathLike[str], record: Mapping[str, Any], world_size: int | None = None) -> dict[str, Any]:
    """Check that ``path`` is a complete checkpoint of a run with the same ``record`` (settings and
    data fingerprint); return the checkpoint's marker.

    Raises:
        ConfigError: not a folder, not a checkpoint of ``mlora-export train``, incomplete, or of a
            run with other settings or data (the message names the first difference).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(f"checkpoint {str(folder)!r} is not a folder; give a checkpoint-N folder written with save_steps",
                          path=folder, option="resume")
    marker = folder / MARKER
    if not marker.is_file():
        has_trainer_state = (folder / "trainer_state.json").is_file()
        what = "an incomplete checkpoint (the run stopped while writing it)" if has_trainer_state and (folder / f"{OPTIMIZER}.json").exists() \
            else "not a checkpoint of mlora-export train"
        raise ConfigError(f"{str(folder)!r} is {what}: it has no {MARKER}; resume from a complete checkpoint-N folder", path=folder, option="resume")
    try:
        saved = loads(marker.read_bytes())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{str(marker)!r} is unreadable ({e}); resume from another checkpoint", path=folder, option="resume") from e
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise ConfigError(f"{str(marker)!r} is not a {FORMAT} record; resume from a checkpoint of this version of mlora-export", path=folder, option="resume")
    for key, mine, theirs in _differences(record, saved):
        raise ConfigError(
            f"checkpoint {str(folder)!r} was written by a run with {key} {_show(theirs)}, this run has {_show(mine)}; "
            "resume with the settings and data of the run that wrote it", path=folder, option="resume",
        )
    if world_size is not None and saved.get("world_size") != world_size:
        raise ConfigError(
            f"checkpoint {str(folder)!r} was written by {saved.get('world_size')} process(es), this run has {world_size}; "
            "resume with as many processes (each restores its own random state)", path=folder, option="resume",
        )
    missing = [f"{n}.{ext}" for n in (OPTIMIZER, SCHEDULER) for ext in ("json", "safetensors") if not (folder / f"{n}.{ext}").is_file()]
    if not (folder / "adapter_model.safetensors").is_file():
        missing.append("adapter_model.safetensors")
    if missing:
        raise ConfigError(f"checkpoint {str(folder)!r} lacks {', '.join(missing)}; resume from a complete checkpoint", path=folder, option="resume")
    return saved


def _differences(mine: Mapping[str, Any], theirs: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(name, mine, theirs)`` for every leaf of ``mine`` that ``theirs`` does not hold (settings by
    their own name, ``lr``; the rest by path, ``data sha256``)."""
    out = []
    for key, value in mine.items():
        other = theirs.get(key) if isinstance(theirs, Mapping) else None
        name = key.replace("_", " ") if prefix in ("", "settings") else f"{prefix} {key}"
        if isinstance(value, Mapping) and isinstance(other, Mapping):
            out += _differences(value, other, key)
        elif value != other:
            out.append((name, value, other))
    return out


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "…"


def checkpoints_in(folder: str | os.PathLike[str]) -> list[Path]:
    """The ``checkpoint-N`` folders in ``folder``, by step."""
    p = Path(folder)
    if not p.is_dir():
        return []
    found = [c for c in p.iterdir() if c.is_dir() and c.name.startswith("checkpoint-") and c.name[len("checkpoint-"):].isdigit()]
    return sorted(found, key=lambda c: int(c.name[len("checkpoint-"):]))


__all__ = ["FORMAT", "MARKER", "OPTIMIZER", "SCHEDULER", "checkpoints_in", "rng_name", "load_state", "read_checkpoint", "rng_states", "save_state", "set_rng_states"]
