"""Build of the optional C merge kernel (everything else is in pyproject.toml).

``mlora_export/converters/_merge_ext.c`` is compiled where a C compiler is found; where it is
not, the install goes on without it and the merge uses its numpy and torch kernels
(``mlora_export.converters.merge_kernels`` says which runs).
"""

import sys

from setuptools import Extension, setup

# No -ffast-math: the kernel's rounding must be IEEE's. No FMA contraction outside the explicit ones.
_ARGS = [] if sys.platform == "win32" else ["-O3", "-ffp-contract=off"]

setup(
    ext_modules=[
        Extension(
            "mlora_export.converters._merge_ext",
            ["mlora_export/converters/_merge_ext.c"],
            extra_compile_args=_ARGS,
            optional=True,
        )
    ]
)
