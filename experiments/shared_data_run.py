"""The RESULTS.md experiment: SafeConf on the public safety sets in ../shared/data with the embedded model.

Train questions come from the sets' train splits, held-out questions from their dev/val splits; the data
files are read in place (never copied into the repository) and the mixed question files go to the run dir.

    .venv/bin/python experiments/shared_data_run.py --out runs/shared --train-per-set 60 --eval-per-set 30

then `python jobs/full.py` stages run on them: pipeline on the train questions, training, and evaluation
on the held-out questions.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

from safeconf import io
from safeconf.data.loaders import read_questions
from safeconf.schema import validate_record

SHARED = Path(os.environ.get("SAFECONF_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
# (train spec, held-out spec) per set
SETS = {
    "diasafety": ("diasafety:{d}/diasafety/train.json", "diasafety:{d}/diasafety/val.json"),
    "cold": ("cold:{d}/cold/train.csv", "cold:{d}/cold/dev.csv"),
}


def sample(spec: str, count: int, seed: int) -> list[dict]:
    """`count` valid questions drawn at random (seeded) from the spec, balanced over the gold answers."""
    seen, rows = set(), []
    for raw in read_questions(spec):
        if raw.record is not None:
            row, problem = validate_record(raw.record, seen)
            if problem is None:
                rows.append(row)
    rng = random.Random(seed)
    by_answer = {}
    for row in rows:
        by_answer.setdefault(row["answer"], []).append(row)
    picked = []
    for answer, group in sorted(by_answer.items(), key=lambda kv: str(kv[0])):
        picked += rng.sample(group, min(len(group), count // len(by_answer)))
    rng.shuffle(picked)
    return picked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/shared")
    parser.add_argument("--train-per-set", type=int, default=60)
    parser.add_argument("--eval-per-set", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not SHARED.exists():
        raise SystemExit(f"shared data not found at {SHARED} (set SAFECONF_SHARED_DATA)")
    out = io.normalise_uri(args.out)
    for split, index, count in (("train", 0, args.train_per_set), ("heldout", 1, args.eval_per_set)):
        rows = [row for name, specs in SETS.items() for row in sample(specs[index].format(d=SHARED), count, args.seed)]
        path = Path(out) / f"{split}_questions.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        print(f"{split}: {len(rows)} questions -> {path}")


if __name__ == "__main__":
    main()
