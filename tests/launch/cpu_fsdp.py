"""Run ``mlora-export`` under ``accelerate launch`` with accelerate's FSDP path on a CPU-only host.

accelerate (1.15) sets up FSDP only on accelerator devices: on CPU it turns an FSDP config into
plain multi-process DDP (``DistributedType.MULTI_CPU``) and drops the FSDP plugin. torch itself
shards on CPU with gloo (FSDP2 ``fully_shard``, FSDP1), so the tests lift that one gate: after
accelerate has built its state, an FSDP plugin it was given is put back and the distributed type
set to FSDP. Everything after that (accelerate's ``fsdp2_prepare_model``/FSDP1 wrapping, the
Trainer's FSDP paths, our save) is the unchanged code that runs on GPUs.

Usage: ``accelerate launch --config_file fsdp.yaml tests/launch/cpu_fsdp.py train ...`` (the
arguments of ``mlora-export``), or ``... cpu_fsdp.py --script path.py args...`` for a Python script.
"""

from __future__ import annotations

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


AcceleratorState.__init__ = _init_keeping_fsdp

if __name__ == "__main__":
    if sys.argv[1:2] == ["--script"]:
        sys.argv = sys.argv[2:]
        runpy.run_path(sys.argv[0], run_name="__main__")
    else:
        from mlora_export.cli import main

        sys.exit(main())
