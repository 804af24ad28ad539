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


def test_verbosity_works_before_and_after_the_command(tmp_path) -> None:
    """``-v`` is accepted after the command name too, with the same effect as before it."""
    from click.testing import CliRunner

    from mlora_export.cli import main
    from tests.common import build_model, random_nested

    nested = random_nested(build_model("llama"), tmp_path / "nested", arch="llama").path
    quiet = CliRunner().invoke(main, ["slice", str(nested), "--ranks", "2", "--output", str(tmp_path / "a")])
    before = CliRunner().invoke(main, ["-v", "slice", str(nested), "--ranks", "2", "--output", str(tmp_path / "b")])
    after = CliRunner().invoke(main, ["slice", str(nested), "--ranks", "2", "--output", str(tmp_path / "c"), "-v"])
    assert quiet.exit_code == before.exit_code == after.exit_code == 0, (quiet.output, before.output, after.output)
    assert "info:" not in quiet.stderr
    assert "info:" in before.stderr and "info:" in after.stderr
    assert sorted(line.split(":")[0] for line in after.stderr.splitlines()) == sorted(line.split(":")[0] for line in before.stderr.splitlines())


def test_library_errors_speak_library_terms_and_the_cli_adds_the_flag(tmp_path) -> None:
    """A library error names the parameter (``option``), not a flag; the CLI's table adds the flag and the exit code."""
    import pytest
    from click.testing import CliRunner

    from mlora_export.cli import main
    from mlora_export.cli._errors import EXIT_CODES, exit_code_for
    from mlora_export.converters.slice import slice_adapter
    from mlora_export.errors import ExportError, HubError, MloraError, OutputExistsError
    from tests.common import build_model, random_nested

    nested = random_nested(build_model("llama"), tmp_path / "nested", arch="llama").path
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputExistsError) as e:
        slice_adapter(nested, [2], tmp_path / "out")
    assert e.value.option == "force" and e.value.path == str(tmp_path / "out") and "--" not in str(e.value)
    res = CliRunner().invoke(main, ["slice", str(nested), "--ranks", "2", "--output", str(tmp_path / "out")])
    assert res.exit_code == 2 and "pass --force to replace it" in res.stderr
    assert exit_code_for(ExportError("x")) == exit_code_for(HubError("x")) == 1 and exit_code_for(MloraError("x")) == 2
    assert all(not hasattr(cls, "exit_code") for cls, _ in EXIT_CODES)  # the codes live in the CLI's table only


def test_errors_carry_the_path_tensor_and_rank(tmp_path) -> None:
    """The fields say what the message says, for code that acts on an error."""
    import pytest

    from mlora_export.adapter import NestedAdapter
    from mlora_export.errors import InvalidAdapterError, RankError
    from tests.common import build_model, poison_weights, random_nested

    nested = random_nested(build_model("llama"), tmp_path / "nested", arch="llama")
    with pytest.raises(RankError) as r:
        nested.check_rank(99)
    assert r.value.rank == 99 and r.value.path == str(nested.path)
    key = next(iter(nested.header.tensors))
    poison_weights(nested.weights_path, {key: float("nan")})
    with pytest.raises(InvalidAdapterError) as e:
        NestedAdapter.load(nested.path)
    assert e.value.path == str(nested.weights_path) and e.value.tensor == key and key in str(e.value)
