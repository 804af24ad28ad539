"""Regenerate the task shipped with the package: ``mlora_export/demo/data/sort-{train,eval}.jsonl``.

The task: sort the letters of a short random word (``{"prompt": "sort dcab =", "completion": " abcd"}``).
It is deterministic, needs the prompt (so a bigger adapter helps), and a tiny model learns it on a
CPU within a minute. Run ``python scripts/make_builtin_data.py`` from the repository root.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

LETTERS = "abcdefghijklmnop"
SPLITS = {"train": (4000, 1), "eval": (256, 2)}


def example(rng: random.Random) -> dict[str, str]:
    word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 7)))
    return {"prompt": f"sort {word} =", "completion": " " + "".join(sorted(word))}


def main() -> None:
    out = Path(__file__).resolve().parents[1] / "mlora_export" / "demo" / "data"
    out.mkdir(exist_ok=True)
    seen: set[str] = set()
    for split, (n, seed) in SPLITS.items():
        rng = random.Random(seed)
        rows = []
        while len(rows) < n:
            ex = example(rng)
            if ex["prompt"] in seen:  # held-out prompts never appear in training
                continue
            seen.add(ex["prompt"])
            rows.append(ex)
        (out / f"sort-{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


if __name__ == "__main__":
    main()
