"""The option dataclasses of the wide APIs: their field metadata is the one source of the click
options and of the CLI's flag hints, and the older keyword calls still work for one release."""

from __future__ import annotations

import dataclasses
import warnings

import click
import pytest

from mlora_export.cli._errors import FLAG_HINTS
from mlora_export.cli._options import FieldOption
from mlora_export.cli.main import main
from mlora_export.converters.gguf import GgufOptions
from mlora_export.converters.hub import BundleOptions, PushOptions, RankBudget
from mlora_export.converters.onnx import OnnxExportOptions
from mlora_export.evaluation import EvalOptions, LmEvalTasks
from mlora_export.params import fields_of, flag_hints, merge_legacy, param

OPTION_CLASSES = (BundleOptions, PushOptions, RankBudget, OnnxExportOptions, EvalOptions, LmEvalTasks, GgufOptions)


@pytest.mark.parametrize("cls", OPTION_CLASSES, ids=lambda c: c.__name__)
def test_option_classes_are_frozen_and_documented(cls: type) -> None:
    assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen  # type: ignore[attr-defined]
    for name, f in fields_of(cls).items():
        assert f.metadata.get("help"), f"{cls.__name__}.{name} has no help"
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(cls(), next(iter(fields_of(cls))), None)


def test_flag_hints_come_from_the_fields() -> None:
    """Every field with a flag gives the CLI its hint (its own, or ``see <flag>``)."""
    for cls in OPTION_CLASSES:
        for name, f in fields_of(cls).items():
            if f.metadata["flag"]:
                assert FLAG_HINTS[name] == (f.metadata["hint"] or f"see {f.metadata['flag']}"), name
    # the hints the CLI gave before the fields carried them are unchanged
    assert FLAG_HINTS["tokenizer_dir"] == "or pass --tokenizer DIR" and FLAG_HINTS["license_id"] == "see --license"
    assert FLAG_HINTS["merged"] == "see --merged and --rank" and FLAG_HINTS["max_bytes"] == "see --max-bytes / --max-params"
    assert flag_hints(GgufOptions) == {"arch": "see --arch", "out_type": "see --outtype", "scale_mode": "see --scale-mode", "name": "see --name"}


def test_generated_click_options_use_the_metadata() -> None:
    """Each click option made from a field has the field's flag, help and default."""
    seen = 0
    for command in main.commands.values():
        for opt in command.params:
            if not isinstance(opt, FieldOption):
                continue
            cls, name, negate = opt.field_of
            f = fields_of(cls)[name]
            assert f.metadata["flag"] in opt.opts, (command.name, name)
            assert opt.help is not None and opt.help.startswith(f.metadata["help"]), (command.name, name)
            if not opt.is_flag and not negate:
                assert opt.default == f.default, (command.name, name)
            if f.metadata.get("choices"):
                assert isinstance(opt.type, click.Choice) and tuple(opt.type.choices) == f.metadata["choices"]
            seen += 1
    assert seen >= 25


def test_older_keyword_calls_warn_and_still_work() -> None:
    @dataclasses.dataclass(frozen=True)
    class Options:
        a: int = param(1, help="a")
        b: str = param("x", help="b")

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert merge_legacy(None, Options, {}, "f") == Options()
        assert merge_legacy(Options(a=2), Options, {}, "f") == Options(a=2)
    with pytest.warns(DeprecationWarning, match=r"f\(b=...\) is deprecated: pass Options\(b=...\)"):
        assert merge_legacy(Options(a=2), Options, {"b": "y"}, "f") == Options(a=2, b="y")
    with pytest.raises(TypeError, match="f\\(\\) got an unexpected keyword argument 'c'"):
        merge_legacy(None, Options, {"c": 3}, "f")
    with pytest.raises(TypeError, match="unknown option metadata"):
        param(1, help="x", colour="red")


def test_pull_rank_budget_in_the_older_keyword_style(tmp_path: object) -> None:
    """``pull_rank(..., max_bytes=...)`` is still read into the budget (and checked before any request)."""
    from mlora_export.converters.hub import pull_rank
    from mlora_export.errors import ConfigError

    with pytest.warns(DeprecationWarning), pytest.raises(ConfigError, match="max bytes must be a positive integer"):
        pull_rank("org/x", "auto", tmp_path / "out", max_bytes=0)  # type: ignore[operator]
    with pytest.raises(ConfigError, match="max bytes must be a positive integer"):
        pull_rank("org/x", "auto", tmp_path / "out", RankBudget(max_bytes=0))  # type: ignore[operator]
