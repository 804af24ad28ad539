"""The model card (``README.md``) of a variant bundle: Hub metadata, a table of ranks, snippets.

The YAML front matter is built with :class:`huggingface_hub.ModelCardData` and the whole card is
re-parsed with :class:`huggingface_hub.ModelCard` before it is written, so a card that the Hub
would reject is caught locally (:func:`validate_card`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from ...errors import ConfigError, ExportError
from ...units import human_bytes

logger = logging.getLogger(__name__)

REQUIRED_TAGS = ("lora", "matryoshka-lora", "peft")
#: PEFT ``task_type`` → Hub ``pipeline_tag``.
PIPELINE_TAGS = {
    "CAUSAL_LM": "text-generation",
    "SEQ_2_SEQ_LM": "text2text-generation",
    "SEQ_CLS": "text-classification",
    "TOKEN_CLS": "token-classification",
    "QUESTION_ANS": "question-answering",
    "FEATURE_EXTRACTION": "feature-extraction",
}
#: PEFT ``task_type`` → the transformers auto class that loads the base model for it.
AUTO_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
}
#: Ranks vLLM accepts for ``--max-lora-rank``.
VLLM_MAX_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
PLACEHOLDER_REPO = "<namespace>/<repo>"


def hub_base_model(name: str | None) -> str | None:
    """``name`` when it is a valid Hub repo id (``org/name`` or ``name``), else ``None`` (a local path)."""
    if not name:
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


#: The license ids the Hub accepts in a model card's ``license`` field (its documented list; use
#: ``other`` with a license file for anything else).
HUB_LICENSES = frozenset("""
apache-2.0 mit openrail bigscience-openrail-m creativeml-openrail-m bigscience-bloom-rail-1.0 bigcode-openrail-m
afl-3.0 artistic-2.0 bsl-1.0 bsd bsd-2-clause bsd-3-clause bsd-3-clause-clear c-uda cc cc0-1.0 cc-by-2.0 cc-by-2.5
cc-by-3.0 cc-by-4.0 cc-by-sa-3.0 cc-by-sa-4.0 cc-by-nc-2.0 cc-by-nc-3.0 cc-by-nc-4.0 cc-by-nd-4.0 cc-by-nc-nd-3.0
cc-by-nc-nd-4.0 cc-by-nc-sa-2.0 cc-by-nc-sa-3.0 cc-by-nc-sa-4.0 cdla-sharing-1.0 cdla-permissive-1.0
cdla-permissive-2.0 wtfpl ecl-2.0 epl-1.0 epl-2.0 etalab-2.0 eupl-1.1 eupl-1.2 agpl-3.0 gfdl gpl gpl-2.0 gpl-3.0
lgpl lgpl-2.1 lgpl-3.0 isc h-research intel-research lppl-1.3c ms-pl apple-ascl apple-amlr mpl-2.0 odc-by odbl
openrail++ osl-3.0 postgresql ofl-1.1 ncsa unlicense zlib pddl lgpl-lr deepfloyd-if-license
fair-noncommercial-research-license llama2 llama3 llama3.1 llama3.2 llama3.3 llama4 gemma unknown other
""".split())


def check_license(license_id: str | None) -> str | None:
    """Validate a ``--license`` value: one of the Hub's license ids (:data:`HUB_LICENSES`), such as ``apache-2.0``.

    Raises:
        ConfigError: not a license id the Hub accepts.
    """
    if license_id is None:
        return None
    if license_id not in HUB_LICENSES:
        raise ConfigError(
            f"license {license_id[:60]!r} is not a Hub license id; use one such as apache-2.0, mit or llama3.1, "
            "or 'other' for a license the Hub does not list",
            option="license_id",
        )
    return license_id



def vllm_max_lora_rank(k: int) -> int:
    """The smallest ``--max-lora-rank`` value vLLM accepts that fits rank ``k``."""
    for v in VLLM_MAX_LORA_RANKS:
        if v >= k:
            return v
    return k


def render_card(manifest: Mapping[str, Any], *, repo_id: str | None = None, license_id: str | None = None) -> str:
    """The ``README.md`` text for a bundle described by ``manifest`` (see :mod:`.bundle`).

    Raises:
        ExportError: the card does not parse as a Hub model card (a bug, not a user error).
    """
    repo = repo_id or PLACEHOLDER_REPO
    lines = [
        "---",
        _front_matter(manifest, license_id),
        "---",
        "",
        *_intro(manifest, repo),
        *_rank_table(manifest),
        *_aurac_lines(manifest),
        *_snippets(manifest, repo),
        *_file_list(manifest),
    ]
    text = "\n".join(lines)
    validate_card(text)
    return text


def _front_matter(manifest: Mapping[str, Any], license_id: str | None) -> str:
    """The card's YAML metadata (built with :class:`huggingface_hub.ModelCardData`): the base as an
    adapter relation, the tags PEFT's own ``save_pretrained`` writes, then ours and one per rank."""
    from huggingface_hub import ModelCardData

    base = manifest.get("base_model")
    tags = ([f"base_model:adapter:{base}"] if base else []) + ["transformers", *REQUIRED_TAGS] + [f"rank-{r['rank']}" for r in manifest["ranks"]]
    data = ModelCardData(
        base_model=base,
        base_model_relation="adapter" if base else None,
        library_name="peft",
        tags=tags,
        pipeline_tag=PIPELINE_TAGS.get(str(manifest.get("task_type"))),
        license=license_id,
    )
    return data.to_yaml()


def _intro(manifest: Mapping[str, Any], repo: str) -> list[str]:
    """The title and the paragraph that says what the bundle is: its base, method and ranks."""
    base = manifest.get("base_model")
    cfg = manifest["config"]
    base_text = f"[`{base}`](https://huggingface.co/{base})" if base else "its base model (not recorded as a Hub id)"
    return [
        f"# {repo.split('/')[-1]}: MatryoshkaLoRA variant bundle",
        "",
        f"One nested LoRA adapter for {base_text}, trained with **{cfg['method']}** "
        f"(scaling `{cfg['scaling']}`, alpha {cfg['alpha']:g}, train ranks {', '.join(map(str, cfg['train_ranks']))}), "
        f"published as one standard PEFT adapter per rank. Every rank is a prefix of the same factors: "
        f"`ΔW_k = s(k) · B[:, :k] · A[:k, :]`. Pick the rank that fits your memory and latency budget.",
        "",
    ]


def _rank_table(manifest: Mapping[str, Any]) -> list[str]:
    """The table of ranks: folder, parameters, size and one column per recorded metric; the nested adapter last."""
    ranks: Sequence[Mapping[str, Any]] = manifest["ranks"]
    metrics = sorted({m for r in ranks for m in (r.get("metrics") or {})})
    lines = [
        "| rank | folder | parameters | size |" + "".join(f" {m} |" for m in metrics),
        "|---:|---|---:|---:|" + "---:|" * len(metrics),
    ]
    for r in ranks:
        row = f"| {r['rank']} | `{r['path']}/` | {r['params']:,} | {human_bytes(r['bytes'])} |"
        for m in metrics:
            v = (r.get("metrics") or {}).get(m)
            row += f" {v:.4g} |" if isinstance(v, (int, float)) else " – |"
        lines.append(row)
    nested = manifest["nested"]
    lines += [
        f"| {manifest['config']['max_rank']} (nested) | `{nested['path']}/` | {nested['params']:,} | {human_bytes(nested['bytes'])} |" + " |" * len(metrics),
        "",
    ]
    return lines


def _aurac_lines(manifest: Mapping[str, Any]) -> list[str]:
    """One ``AURAC (metric): v1 …, v2 …`` line per recorded evaluation that has them."""
    lines = []
    for name, ev in (manifest.get("evaluation") or {}).items():
        aurac = ev.get("aurac") or {}
        if aurac:
            lines.append(f"AURAC ({name}): " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(aurac.items()) if isinstance(v, (int, float))))
            lines.append("")
    return lines


def _snippets(manifest: Mapping[str, Any], repo: str) -> list[str]:
    """How to use the bundle: load a rank with PEFT, pull one rank, serve it with vLLM (for the middle
    rank of the bundle, and the default rank at the root when there is one)."""
    ranks: Sequence[Mapping[str, Any]] = manifest["ranks"]
    max_rank = manifest["config"]["max_rank"]
    default = manifest.get("default_rank") or {}
    d = default.get("rank")
    k = ranks[len(ranks) // 2]["rank"] if ranks else max_rank
    top = max((r["rank"] for r in ranks), default=max_rank)
    base_arg = manifest.get("base_model") or "<base-model>"
    task = manifest.get("task_type")
    auto_class = AUTO_CLASSES.get(str(task), "AutoModelForCausalLM" if task is None else "AutoModel")
    return [
        "## Load a rank with PEFT",
        "",
        "```python",
        "from peft import PeftModel",
        f"from transformers import {auto_class}",
        "",
        f'base = {auto_class}.from_pretrained("{base_arg}")',
        *([f'model = PeftModel.from_pretrained(base, "{repo}")                 # the default rank, r{d}'] if d else []),
        f'model = PeftModel.from_pretrained(base, "{repo}", subfolder="r{k}")   # any rank by its folder',
        "```",
        "",
        *([f"The repo's root holds rank {d} ({default.get('chosen_by', 'default')}), so tools that take a repo id and no "
           "subfolder load it as they would any LoRA adapter.", ""] if d else []),
        "## Pull only one rank, sha256-verified",
        "",
        "```bash",
        "pip install mlora-export",
        f"mlora-export pull {repo} --rank {k} --output ./r{k}",
        f"mlora-export pull {repo} --rank auto --max-bytes 50MB --output ./adapter   # the largest rank that fits",
        "```",
        "",
        "## Serve with vLLM",
        "",
        "```bash",
        f"mlora-export pull {repo} --rank {k} --output ./r{k}",
        f"vllm serve {base_arg} --enable-lora --max-lora-rank {vllm_max_lora_rank(top)} --lora-modules r{k}=./r{k}",
        "```",
        "",
    ]


def _file_list(manifest: Mapping[str, Any]) -> list[str]:
    """The "Files" section: what each file and folder of the bundle is; then the ``created_by`` line."""
    d = (manifest.get("default_rank") or {}).get("rank")
    nested = manifest["nested"]
    if manifest.get("scale_mode", "baked") == "native":
        slice_text = "the exact prefix of the factors, `s(k)` expressed through `lora_alpha = s(k)·k`"
    else:
        slice_text = "`s(k)` folded into `lora_B`, so every runtime reads it alike"
    lines = [
        "## Files",
        "",
        "- `manifest.json`: every file's path, size and sha256; every rank's folder, parameter count and size.",
        "- `matryoshka_config.json`: the nested adapter's method, ranks and scaling.",
        *([f"- `adapter_config.json`, `adapter_model.safetensors`: the default rank, a copy of `r{d}/`."] if d else []),
        f"- `{nested['path']}/`: the full nested adapter (any rank up to {manifest['config']['max_rank']} can still be cut from it with `mlora-export slice`).",
        f"- `r{{k}}/`: one plain PEFT LoRA adapter per rank ({slice_text}).",
    ]
    if manifest.get("onnx"):
        lines.append("- `onnx/`: ONNX export(s) of the adapter.")
    return lines + ["", f"Made with mlora-export ({manifest.get('created_by', 'mlora-export')}).", ""]


def validate_card(text: str) -> dict[str, Any]:
    """Parse ``text`` as the Hub does and check our required metadata; return the metadata.

    Raises:
        ExportError: the YAML front matter is missing or invalid, or lacks ``library_name: peft``,
            ``base_model_relation: adapter`` (when ``base_model`` is set) or the required tags.
    """
    from huggingface_hub import ModelCard

    try:
        card = ModelCard(text, ignore_metadata_errors=False)
    except Exception as e:  # the card class raises ValueError or yaml errors
        raise ExportError(f"model card: invalid YAML front matter ({e})") from e
    meta = card.data.to_dict()
    if meta.get("library_name") != "peft":
        raise ExportError("model card: library_name must be 'peft'")
    tags = meta.get("tags") or []
    missing = [t for t in REQUIRED_TAGS if t not in tags]
    if missing:
        raise ExportError(f"model card: tags lack {', '.join(missing)}")
    if meta.get("base_model") and meta.get("base_model_relation") != "adapter":
        raise ExportError("model card: base_model_relation must be 'adapter'")
    return meta
