"""``mlora-export inspect``: describe a nested adapter."""

from __future__ import annotations

import click

from ._errors import handle_errors
from ._options import echo_json, echo_table, json_option


@click.command("inspect")
@click.argument("adapter", type=click.Path(path_type=str))
@json_option
@handle_errors
def inspect(adapter: str, as_json: bool) -> None:
    """Show a nested ADAPTER's method, ranks, scaling, p, targets and per-rank size (and energy).

    \b
    Example:
      mlora-export inspect ./nested --json
    """
    from ..adapter import NestedAdapter

    info = NestedAdapter.load(adapter).summary()
    if as_json:
        echo_json(info)
        return
    p = info["p"]
    p_text = "none (re-nested: the scale is in lora_B)" if info["method"] == "svd" else "sampled per step" if p is None else ", ".join(f"{x:.4g}" for x in p[:16]) + (f", … ({len(p)} values)" if len(p) > 16 else "")
    for label, value in (
        ("adapter", info["path"]),
        ("kind", "nested (MatryoshkaLoRA format)" if info["nested"] else _slice_kind(info.get("slice")) or "plain PEFT LoRA"),
        ("method", info["method"]),
        ("max rank", info["max_rank"]),
        ("train ranks", ", ".join(map(str, info["train_ranks"]))),
        ("scaling", f"{info['scaling']} (alpha {info['alpha']:g})"),
        ("p", p_text),
        ("dtype", info["dtype"]),
        ("base model", info["base_model"] or "(not recorded)"),
        ("targets", f"{len(info['target_modules'])} modules" + (" (Conv1D, fan_in_fan_out)" if info["fan_in_fan_out"] else "")),
    ):
        click.echo(f"{label:>12}: {value}")
    click.echo()
    rows = info["ranks"]
    if rows and "energy" in rows[0]:  # re-nested: the share of the sum of ||ΔW||² each rank keeps
        echo_table(["rank", "scale", "params", "bytes", "energy"],
                   [[r["rank"], f"{r['scale']:.6g}", r["params"], r["bytes"], f"{r['energy']:.6f}"] for r in rows])
        return
    echo_table(["rank", "scale", "params", "bytes"], [[r["rank"], f"{r['scale']:.6g}", r["params"], r["bytes"]] for r in rows])


def _slice_kind(sl: dict | None) -> str | None:
    """``PEFT slice at rank k (baked) of a nested-loss adapter, max rank 16, scaling sqrt, from PATH``."""
    if not sl:
        return None
    src = sl.get("source") or {}
    text = f"PEFT slice at rank {sl.get('rank')} ({sl.get('scale_mode')}, s(k) = {sl.get('scale'):.6g})" if isinstance(sl.get("scale"), (int, float)) \
        else f"PEFT slice at rank {sl.get('rank')} ({sl.get('scale_mode')})"
    if src.get("method"):
        text += f" of a {src['method']} adapter, max rank {src.get('max_rank')}, scaling {src.get('scaling')}"
    if src.get("path"):
        text += f", from {src['path']}"
    return text
