"""Build examples/data/countries.jsonl from the `countryinfo` package (MIT licence).

Task: turn a sentence about a country into a strict JSON record with fixed keys, in a fixed
order. A small instruct model half-knows the format; fine-tuning teaches it exactly.

    pip install countryinfo==1.0.1 && python examples/build_countries.py
"""

from __future__ import annotations

import glob
import json
import os
import random
from pathlib import Path

import countryinfo

TEMPLATES = [
    "{name} is a country in {subregion}. Its capital is {capital}, about {population:,} people "
    "live there, and the currency is the {currency}.",
    "With a population of roughly {population:,}, {name} ({subregion}) is governed from "
    "{capital} and uses the {currency}.",
    "The capital of {name} is {capital}. Located in {subregion}, it has {population:,} "
    "inhabitants who pay in {currency}.",
    "Currency: {currency}. {name}, in {subregion}, counts {population:,} people; its seat of "
    "government is {capital}.",
    "In {subregion} lies {name}: {population:,} residents, capital {capital}, money {currency}.",
]


def main() -> None:
    folder = os.path.join(os.path.dirname(countryinfo.__file__), "data")
    rows = []
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        with open(path, encoding="utf-8") as fh:
            c = json.load(fh)
        fields = [c.get(k) for k in ("name", "capital", "region", "subregion", "population")]
        if not all(fields) or not c.get("currencies"):
            continue
        rows.append({"name": c["name"], "capital": c["capital"], "region": c["region"],
                     "subregion": c["subregion"], "population": int(c["population"]),
                     "currency": c["currencies"][0]})
    rng = random.Random(0)
    rng.shuffle(rows)
    out = Path(__file__).resolve().parent.parent / "src" / "tunelab" / "assets" / "countries.jsonl"
    with open(out, "w", encoding="utf-8") as fh:
        for i, row in enumerate(rows):
            sentence = TEMPLATES[i % len(TEMPLATES)].format(**row)
            target = {"country": row["name"], "capital": row["capital"],
                      "region": row["region"], "population": row["population"],
                      "currency": row["currency"]}
            fh.write(json.dumps({"prompt": sentence,
                                 "completion": json.dumps(target, ensure_ascii=False)},
                                ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} examples to {out}")


if __name__ == "__main__":
    main()
