#!/usr/bin/env python
"""Regenerate the real-model demo's task: ``mlora_export/demo/data/countries-{train,eval}.jsonl``.

Every country of ISO 3166-1 (from ``pycountry``, needed only to run this script: ``pip install pycountry``),
asked for its three-letter code: ``{"prompt": "What is the ISO 3166-1 alpha-3 code of Germany? Answer with the
code only.", "completion": "DEU"}``. A small instruction-tuned model knows part of them (and can guess
some from the name), so fine-tuning refines a skill that is partly there. 180 countries train, the
other 69 are held out (never trained on); the split is a fixed shuffle. ``mlora-export demo --model
smollm2`` renders the prompts with the model's chat template. From the repository root::

    python scripts/make_country_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

TRAIN = 180
QUESTION = "What is the ISO 3166-1 alpha-3 code of {name}? Answer with the code only."


def records() -> list[dict[str, str]]:
    """One record per country, in a fixed shuffled order."""
    import pycountry

    rows = [{"prompt": QUESTION.format(name=getattr(c, "common_name", c.name)), "completion": c.alpha_3}
            for c in sorted(pycountry.countries, key=lambda c: c.alpha_3)]
    random.Random(0).shuffle(rows)
    return rows


def main() -> None:
    import pycountry

    out = Path(__file__).resolve().parents[1] / "mlora_export" / "demo" / "data"
    rows = records()
    for split, part in (("train", rows[:TRAIN]), ("eval", rows[TRAIN:])):
        (out / f"countries-{split}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part), encoding="utf-8")
    print(f"{len(rows)} countries from pycountry {pycountry.__version__}: {TRAIN} train, {len(rows) - TRAIN} eval -> {out}")


if __name__ == "__main__":
    main()
