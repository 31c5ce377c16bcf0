"""Split SQuAD v1.1 dev into train / dev files by article, for recorded runs on this machine.

`../shared/data` has SQuAD v1.1 dev only (the train file is missing, see its README), so the
recorded SQuAD runs in docs/results/downstream-records.md train on 40 of the 48 dev articles and evaluate on
the other 8. Whole articles go to one side, so no context is shared between train and dev.

    python bench/squad_dev_split.py ../shared/data/squad/dev-v1.1.json --out runs/squad-split
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from autotinybert.files import atomic_write_json  # noqa: E402


def split(dev_file: Path, out: Path, held_out: int, seed: int) -> dict:
    data = json.loads(dev_file.read_text(encoding="utf-8"))
    articles = data["data"]
    chosen = set(random.Random(seed).sample(range(len(articles)), held_out))
    sides = {"train": [a for i, a in enumerate(articles) if i not in chosen],
             "dev": [a for i, a in enumerate(articles) if i in chosen]}
    counts = {}
    for name, part in sides.items():
        atomic_write_json(out / f"{name}-v1.1.json", {"version": data.get("version", "1.1"), "data": part})
        counts[name] = {"articles": len(part), "questions": sum(len(p["qas"]) for a in part for p in a["paragraphs"])}
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dev_file", type=Path, help="SQuAD v1.1 dev JSON")
    parser.add_argument("--out", type=Path, required=True, help="folder for train-v1.1.json and dev-v1.1.json")
    parser.add_argument("--held-out", type=int, default=8, help="articles kept for dev (default 8 of 48)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for name, count in split(args.dev_file, args.out, args.held_out, args.seed).items():
        print(f"{args.out / f'{name}-v1.1.json'}: {count['articles']} articles, {count['questions']} questions")


if __name__ == "__main__":
    main()
