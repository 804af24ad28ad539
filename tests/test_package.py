"""The package surface: the lazy top-level API resolves, and importing it stays light."""

from __future__ import annotations

import subprocess
import sys

import mlora_export


def test_every_public_name_resolves() -> None:
    for name in mlora_export.__all__:
        assert getattr(mlora_export, name) is not None, name
    assert set(mlora_export.__all__) <= set(dir(mlora_export))


def test_import_and_cli_help_do_not_load_torch() -> None:
    """``import mlora_export`` and ``mlora-export --help`` must not pay for torch/transformers."""
    code = (
        "import sys, mlora_export, mlora_export.cli;"
        "from click.testing import CliRunner;"
        "r = CliRunner().invoke(mlora_export.cli.main, ['--help']);"
        "assert r.exit_code == 0, r.output;"
        "print(sorted(m for m in ('torch', 'transformers', 'peft', 'onnxruntime') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip()
    assert out == "[]"
