"""Run ``mlora-export`` (or a Python script) under ``accelerate launch`` on a CPU-only host, with
two test-only adjustments; everything else is the unchanged code that runs on GPUs.

1. FSDP: accelerate (1.15) sets up FSDP only on accelerator devices. On CPU it turns an FSDP
   config into plain multi-process DDP (``DistributedType.MULTI_CPU``) and drops the FSDP plugin.
   torch itself shards on CPU with gloo, so this lifts that one gate: after accelerate has built
   its state, an FSDP plugin it was given is put back and the distributed type set to FSDP.
   accelerate's own ``fsdp2_prepare_model``/FSDP1 wrapping and the Trainer's FSDP paths then run.
2. DeepSpeed: its CPU accelerator JIT-compiles a shared-memory collective op (C++, several
   minutes on a busy 2-core machine, on the first run of each install). It is turned off, so
   DeepSpeed's collectives go through ``torch.distributed`` (gloo), as they do where the op
   cannot be built.

Usage: ``accelerate launch --config_file cfg.yaml tests/launch/cpu_accelerate.py train ...`` (the
arguments of ``mlora-export``), or ``... cpu_accelerate.py --script path.py args...``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import runpy
import sys

from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType

_init = AcceleratorState.__init__


def _init_keeping_fsdp(self, *args, **kwargs):  # type: ignore[no-untyped-def]
    plugin = kwargs.get("fsdp_plugin")
    _init(self, *args, **kwargs)
    if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = plugin


def _no_deepspeed_shm_op() -> None:
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true" or importlib.util.find_spec("deepspeed") is None:
        return
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's logger binds the stdout of its import
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


AcceleratorState.__init__ = _init_keeping_fsdp
_no_deepspeed_shm_op()

if __name__ == "__main__":
    if sys.argv[1:2] == ["--script"]:
        sys.argv = sys.argv[2:]
        runpy.run_path(sys.argv[0], run_name="__main__")
    else:
        from mlora_export.cli import main

        sys.exit(main())
