"""Answer-checking throughput on MATH-500 golds.

Three workloads, each over all 500 gold answers:

- ``gold vs gold``: the common case in search (a correct answer written like the gold);
  settled by the string shortcut.
- ``gold vs gold, math-verify only``: the same pairs with the shortcut off, so every pair is
  parsed and compared symbolically — the cost of answers written differently from the gold.
- ``gold vs other gold``: each gold against the next problem's gold (mostly wrong answers).
- ``number vs other number``: the golds that are plain numbers, each against the next one; every
  pair is settled by the numeric shortcut (the cost of a wrong numeric answer).

Run: ``python bench/answers.py [--repeats N]``; prints a table of answers/s and agreement.
"""

from __future__ import annotations

import argparse
import time

from polar.datasets import load_questions
from polar.math import as_number, check_answers, normalize_answer


def _timed(preds: list[str], golds: list[str], fast_path: bool, repeats: int) -> tuple[float, float]:
    """(answers per second, fraction judged equivalent); the first pass is cold (empty caches)."""
    started = time.perf_counter()
    for _ in range(repeats):
        results = check_answers(preds, golds, fast_path=fast_path)
    seconds = time.perf_counter() - started
    return len(preds) * repeats / seconds, sum(results) / len(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1, help="passes over the 500 pairs")
    args = parser.parse_args()

    golds = [q.answer for q in load_questions("math500")]
    shifted = golds[1:] + golds[:1]
    numbers = [g for g in golds if as_number(normalize_answer(g)) is not None]
    rows = [
        ("gold vs gold", golds, golds, True),
        ("gold vs gold, math-verify only", golds, golds, False),
        ("gold vs other gold", shifted, golds, True),
        ("number vs other number", numbers[1:] + numbers[:1], numbers, True),
    ]
    print(f"{'workload':34} {'pairs':>6} {'answers/s':>10} {'equivalent':>10}")
    for name, preds, refs, fast in rows:
        rate, agree = _timed(preds, refs, fast, args.repeats)
        print(f"{name:34} {len(preds) * args.repeats:6d} {rate:10.0f} {agree:10.3f}")


if __name__ == "__main__":
    main()
