"""Where our answer checker and the release's may disagree: run ours on the cases.

The release grades with the DART-Math evaluator (``dart_math/eval.py``, ``EvaluatorMathBatch``)
after cutting the text at the last "Answer:" and requiring "oxed{" in it; polar grades with
``polar.math`` (last ``\\boxed{}``, normalisation, math-verify). ``docs/fidelity.md`` lists the
release's verdicts on the same cases, traced from its code.

Run: ``python bench/checker_cases.py``; prints one line per case with our verdict and its time.
"""

from __future__ import annotations

import time

from polar.math import is_equivalent
from polar.scoring import judge_texts

# (prediction as written inside the box, gold answer)
ANSWER_PAIRS = [
    ("50", "0.5"), ("0.5", "50"), ("25", "0.25"),
    ("50\\%", "50"), ("50%", "50"), ("50\\%", "0.5"),
    ("1,000", "1000"), ("1000", "1,000"), ("1,000,000", "1000000"),
]

# (completion after the plain prompt's final "Answer:", gold answer)
COMPLETIONS = [
    (" \\boxed{5}. Therefore, the answer is 5.", "5"),
    (" \\boxed{5}\nTherefore, we need 3 more apples.", "5"),
    (" \\boxed{5} Therefore $x=7$.", "5"),
    (" \\boxed{12}\n\nTherefore, the total cost is $12.", "12"),
    (" \\boxed 5", "5"),
    (" \\fbox{5}", "5"),
    (" \\boxed{5}\nAnswer: 5", "5"),
]


def main() -> None:
    for pred, gold in ANSWER_PAIRS:
        started = time.perf_counter()
        verdict = is_equivalent(pred, gold)
        print(f"is_equivalent({pred!r}, {gold!r}) = {verdict}  [{time.perf_counter() - started:.3f} s]")
    for text, gold in COMPLETIONS:
        started = time.perf_counter()
        answer, verdict = judge_texts([text], [gold], "plain", "boxed")[0]  # the scorer's check
        print(f"completion {text!r}, gold {gold!r}: answer {answer!r} -> {verdict}  "
              f"[{time.perf_counter() - started:.3f} s]")


if __name__ == "__main__":
    main()
