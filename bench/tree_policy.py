"""Host cost of the search logic alone: ``search_many`` with an instant scorer, CPU only.

In a real search the device waits while the tree policy picks the next program of every question,
so this time sits between every two rounds. The scorer here answers at once with a deterministic
hash of (question, program), so both ways below walk exactly the same trees:

* **polar**: ``search_many`` as shipped (automatic cyclic collection paused during the search,
  sparse full collections, finished trees freed by reference counting);
* **automatic collection**: the same call with Python's collector left running, as before.

Usage: ``python bench/tree_policy.py --questions 1024 --simulations 16 --layers 28``
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from polar import search  # noqa: E402


@dataclass(frozen=True)
class _Question:
    id: str
    question: str = ""
    answer: str = ""


@dataclass(frozen=True)
class _Outcome:
    correct: bool


class HashScorer:
    """Correct for ~30% of (question, program) pairs, decided by a hash: instant and repeatable."""

    def score(self, questions, programs):
        out = []
        for q, p in zip(questions, programs):
            digest = hashlib.blake2b(f"{q.id}:{list(p)}".encode(), digest_size=2).digest()
            out.append(_Outcome(int.from_bytes(digest, "big") % 10 < 3))
        return out


def timed_search(questions, layers: int, config: search.SearchConfig, model: str | None,
                 pause_collection: bool = True) -> tuple[float, list]:
    started = time.perf_counter()
    samples = search.search_many(questions, HashScorer(), layers, config, model_name=model, max_active=len(questions),
                                 pause_collection=pause_collection)
    return time.perf_counter() - started, samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--questions", type=int, default=1024)
    parser.add_argument("--simulations", type=int, default=16)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--model", default="llama-3.2-3b", help="name for the paper's length bounds")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each way (the best counts)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    questions = [_Question(str(i)) for i in range(args.questions)]
    config = search.SearchConfig(num_simulations=args.simulations)

    ours, auto = [], []
    for _ in range(args.repeats):
        seconds, ours_samples = timed_search(questions, args.layers, config, args.model)
        ours.append(seconds)
        # the collector left running, as before
        seconds, auto_samples = timed_search(questions, args.layers, config, args.model, pause_collection=False)
        auto.append(seconds)
        assert [s["final_valid_transitions"] for s in ours_samples] == [s["final_valid_transitions"] for s in auto_samples]
    result = {"questions": args.questions, "simulations": args.simulations, "layers": args.layers,
              "polar_s": round(min(ours), 2), "automatic_collection_s": round(min(auto), 2),
              "ratio": round(min(auto) / min(ours), 2)}
    print(f"{args.questions} questions x {args.simulations} simulations, D={args.layers}: search logic "
          f"{result['polar_s']} s (polar) vs {result['automatic_collection_s']} s (automatic collection): "
          f"{result['ratio']}x; same output lists", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
