"""The answer checker on hostile input: every call is fast and gives a verdict, never an exception.

A model's completion is arbitrary text and gold answers are read from files, so extraction,
clean-up, the numeric shortcut and math-verify must each finish in bounded time and treat what
they cannot compare as wrong. The checker's target is 2 s per pair (its default deadline); the
tests allow :data:`BOUND` seconds so that a loaded machine does not fail them, which is still far
below the minutes the unbounded paths used to take.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polar.math import (
    ANSWER_MODES,
    MAX_ANSWER_CHARS,
    check_answers,
    clean_answer,
    extract_answer,
    extract_boxed,
    is_equivalent,
    normalize_answer,
    numbers_close,
)

BOUND = 5.0  # seconds per call allowed here; the checker's own target is 2 s
CLEANUP_BOUND = 1.0  # extraction and clean-up of 100k characters (milliseconds when linear)


def timed(fn: Callable[..., Any], *args: Any, bound: float = BOUND, **kwargs: Any) -> Any:
    """Call ``fn`` and fail the test if it took longer than ``bound`` seconds."""
    started = time.monotonic()
    result = fn(*args, **kwargs)
    seconds = time.monotonic() - started
    name = getattr(fn, "__name__", "call")
    shown = ", ".join(repr(a)[:60] for a in args)
    assert seconds < bound, f"{name}({shown}) took {seconds:.1f} s"
    return result


# --------------------------------------------------------------------------- reported cases

HUGE_DIGITS = "1" * 5000  # past Python's 4,300-digit int-string limit


@pytest.mark.parametrize(
    "pred, gold",
    [
        (r"\boxed{1e999999999}", "5"),  # ran > 100 s, could not be interrupted
        (r"\boxed{1e10000000}", "5"),  # 6.8 s
        (r"\boxed{1e400}", "5"),  # OverflowError (above float's range)
        (r"\boxed{-1e400}", "-5"),
        ("1e-999999999", "1"),
        ("5", r"\boxed{1e400}"),  # the gold side is just as untrusted
        ("\\frac{" + HUGE_DIGITS + "}{3}", "5"),  # ValueError (int-string limit)
        (HUGE_DIGITS + "/7", "5"),
        ("\\frac{1}{" + HUGE_DIGITS + "}", "1"),
        ("9" * 100_000, "5"),
        ("1e" + "9" * 100_000, "5"),  # an exponent no number type can hold
        ("1e99999999999999999999999", "2e99999999999999999999999"),
    ],
)
def test_reported_numbers_are_wrong_quickly_not_errors(pred, gold):
    assert timed(is_equivalent, pred, gold) is False


SCIENTIFIC = [
    r"\boxed{1E999999999}",  # one number token to the LaTeX grammar: sympy built 10**999999999 in C
    r"\boxed{1.5E-99999999}",
    r"\boxed{2E+9999999}",
    r"\boxed{0.1E00099999999}",
    r"\boxed{2,000E+9999999}",
    r"\boxed{1E9999999\%}",
    r"\boxed{x+1E9999999}",
]


@pytest.mark.parametrize("pred", SCIENTIFIC)
@pytest.mark.parametrize("gold", [r"\infty", "x", r"\frac{\pi}{2}"])
def test_scientific_notation_with_a_huge_exponent_against_a_symbolic_gold(pred, gold):
    # A symbolic gold sends the pair past the numeric shortcut to math-verify, whose parse of
    # these ran for minutes in C, where the deadline cannot interrupt it.
    assert timed(is_equivalent, pred, gold) is False
    assert timed(is_equivalent, gold, pred) is False


def test_scientific_notation_with_a_short_exponent_is_still_compared():
    assert is_equivalent(r"\boxed{1E3}", "10^3") is True
    assert is_equivalent(r"\boxed{2.5E-3}", r"\frac{1}{400}") is True
    assert is_equivalent("1E9999", "1E9999") is True


LONG_SHAPES = {
    "digits and spaces": "1 " * 50_000,  # the unit-word regex was quadratic here
    "digits then a letter": "1" * 99_999 + "x",  # the plain-number regex was quadratic here
    "digits": "7" * 100_000,
    "units": "\\text{a}" * 12_500,  # one regex pass per \text{}: quadratic
    "prose": "the quick brown fox 12 " * 4_350,
    "braces": "{" * 100_000,
    "nested boxes": "\\boxed{" * 14_000 + "4" + "}" * 14_000,
}


@pytest.mark.parametrize("shape", sorted(LONG_SHAPES))
def test_100k_character_answers_are_checked_quickly(shape):
    # Reported: > 120 s for a 100k-character answer, quadratic in length (20k: 9.3 s).
    text = LONG_SHAPES[shape]
    assert len(text) >= 99_000
    timed(normalize_answer, text, bound=CLEANUP_BOUND)
    for mode in ANSWER_MODES:
        timed(extract_answer, text, mode, bound=CLEANUP_BOUND)
    assert timed(is_equivalent, text, "5") is False
    assert timed(is_equivalent, "5", text) is False
    assert timed(is_equivalent, f"\\boxed{{{text}}}", "5") is False


def test_lenient_extraction_of_a_long_blank_tail_is_linear():
    # "answer is" then 100k blank lines: ``\s*:?\s*`` tried every split of the run.
    text = "The answer is" + "\n" * 100_000
    assert timed(extract_answer, text, "lenient", bound=CLEANUP_BOUND) is None
    assert timed(extract_answer, "so the answer is 12" + "\n" * 100_000, "lenient", bound=CLEANUP_BOUND) == "12"


def test_a_long_answer_equals_itself_and_nothing_else():
    # Past MAX_ANSWER_CHARS an answer is compared as written (whitespace aside), not parsed.
    long_answer = " + ".join(f"x_{{{i}}}" for i in range(MAX_ANSWER_CHARS))
    assert len(long_answer) > MAX_ANSWER_CHARS
    assert timed(is_equivalent, f"\\boxed{{{long_answer}}}", long_answer) is True
    assert timed(is_equivalent, long_answer.replace(" ", ""), long_answer) is True
    assert timed(is_equivalent, long_answer + " + 1", long_answer) is False


# --------------------------------------------------------------------------- huge numbers compared right


@pytest.mark.parametrize(
    "pred, gold, expected",
    [
        ("1e400", "1e400", True),
        ("1e400", "10e399", True),  # the same number written another way
        ("1e400", "1.0000000001e400", True),  # inside rel 1e-9
        ("1e400", "1.00001e400", False),
        ("1e400", "1e401", False),
        ("-1e400", "1e400", False),
        ("1e999999999", "0.1e1000000000", True),
        ("1e999999999", "1e999999998", False),
        ("1e-400", "0", True),  # inside abs 1e-8
        ("1e-999999999", "2e-999999999", True),
        ("\\frac{" + "2" * 5000 + "}{" + "6" * 5000 + "}", "\\frac{1}{3}", True),  # 222.../666... is 1/3
        ("\\frac{" + "2" * 5000 + "}{" + "6" * 5000 + "}", "0.3333333333333", True),
        ("\\frac{" + "2" * 5000 + "}{" + "6" * 5000 + "}", "0.33", False),
        ("2" * 5000 + "/" + "2" * 5000, "1", True),
        ("9" * 100_000, "1e100000", True),  # 10^100000 - 1, inside rel 1e-9
        ("9" * 100_000, "9e99999", False),
        ("١٢", "12", True),  # Unicode decimal digits are digits
        ("１２", "12", True),
    ],
)
def test_huge_numbers_get_the_right_verdict(pred, gold, expected):
    assert timed(is_equivalent, pred, gold) is expected
    assert timed(is_equivalent, gold, pred) is expected


def reference_close(a: Fraction, b: Fraction) -> bool:
    """SPEC 4's tolerance (rel 1e-9 / abs 1e-8, as math.isclose) in exact rational arithmetic."""
    return abs(a - b) <= max(Fraction(1, 10**9) * max(abs(a), abs(b)), Fraction(1, 10**8))


@settings(max_examples=200, derandomize=True, deadline=None)
@given(
    st.integers(-(10**25), 10**25),
    st.integers(-450, 450),
    st.integers(-(10**12), 10**12),
    st.integers(-12, 12),
)
def test_numeric_verdicts_agree_with_exact_rational_arithmetic(mantissa, exponent, nudge, nudge_exponent):
    # Exponents beyond float's range (the old OverflowError) on purpose; the reference is exact.
    a = Fraction(mantissa) * Fraction(10) ** exponent
    b = a + Fraction(nudge) * Fraction(10) ** (exponent + nudge_exponent)
    a_text = f"{mantissa}e{exponent}"
    b_text = f"{b.numerator}/{b.denominator}" if b.denominator != 1 else str(b.numerator)
    if len(b_text) > 4000:  # keep the reference's integers printable
        return
    assert is_equivalent(a_text, b_text) is reference_close(a, b)
    assert numbers_close(a, b) is reference_close(a, b)


# --------------------------------------------------------------------------- inputs that used to raise


CRASHERS = {
    "lone surrogate": "\ud800",
    "lone surrogate boxed": "\\boxed{\udfff}",
    "NUL": "\x00",
    "NUL between digits": "1\x002",
    "deep parentheses": "(" * 1500 + "1" + ")" * 1500,
    "deep braces": "{" * 900 + "1" + "}" * 900,
    "deep fractions": "\\frac{1}{" * 300 + "2" + "}" * 300,
    "deep roots": "\\sqrt{" * 300 + "2" + "}" * 300,
    "deep left-right": "\\left(" * 150 + "1" + "\\right)" * 150,
    "unbalanced braces": "\\frac{1}{2" + "}" * 3 + "{" * 5,
    "tower": "10^{10^{10^{10}}}",
    "tower of nines": "9^{9^{9^{9}}}",
    "factorial": "99999999!",
    "factorial of a tower": "(10^{10^{10}})!",
    "double factorial": "99999999!!",
    "huge power of a float": "1.5^{999999999}",
    "huge negative power": "10^{-999999999}",
    "huge root": "\\sqrt[10^{9}]{2}",
    "huge binomial": "\\binom{10000000}{5000000}",
    "huge product": "\\prod_{i=1}^{10^{6}} i",
    "huge sum": "\\sum_{i=1}^{10^{9}} i",
    "huge matrix power": "\\begin{pmatrix}2&0\\\\0&2\\end{pmatrix}^{10^{9}}",
    "division by zero": "\\frac{1}{0}",
    "zero over zero": "0/0",
    "empty fraction": "\\frac{}{}",
    "dangling power": "2^",
    "dangling command": "\\sqrt",
    "unknown environment": "\\begin{foo}1\\end{bar}",
    "only dollars": "$$$$",
    "unicode superscript": "2²",
    "zero-width space": "1\u200b2",
}


@pytest.mark.parametrize("name", sorted(CRASHERS))
def test_hostile_answers_are_wrong_not_errors(name):
    text = CRASHERS[name]
    assert timed(is_equivalent, text, "5") is False
    assert timed(is_equivalent, "(1,2)", text) is False  # as the gold
    assert timed(is_equivalent, text, "x^2+1", fast_path=False) is False
    for mode in ANSWER_MODES:
        timed(extract_answer, text, mode)
    timed(normalize_answer, text)


def test_hostile_answers_equal_themselves():
    # Identical text is equal without any parsing, however hostile.
    for text in CRASHERS.values():
        assert timed(is_equivalent, text, text) is True


def test_a_search_with_hostile_model_output_finishes_and_scores_it_wrong():
    # \boxed{1e400} used to raise OverflowError out of the scorer and end search_many.
    from polar.datasets import Question
    from polar.scoring import ProgramScorer
    from polar.search import SearchConfig, search_many

    outputs = [
        "\\boxed{1e400}",
        "\\boxed{1e999999999}",
        "\\boxed{\\frac{" + HUGE_DIGITS + "}{3}}",
        "\\boxed{" + "1 " * 20_000 + "}",
        "\\boxed{10^{10^{10}}}",
        "\\boxed{\ud800}",
    ]

    @dataclass
    class Generation:
        token_ids: list[int]
        text: str
        layers_executed: int

    class HostileRunner:
        model_name = "hostile/model"
        num_layers = 6
        tokenizer = None

        def generate(self, prompts, programs, max_new_tokens=50, **kwargs):
            return [Generation([1], outputs[(len(p) + i) % len(outputs)], len(p)) for i, p in enumerate(programs)]

    questions = [Question(id=f"q{i}", question=f"What is {i}+5?", answer=str(i + 5), source="test") for i in range(2)]
    scorer = ProgramScorer(HostileRunner(), batch_size=8)
    started = time.monotonic()
    samples = search_many(questions, scorer, 6, SearchConfig(num_simulations=4))
    assert len(samples) == 2
    assert all(not s["final_valid_transitions"] for s in samples)
    assert time.monotonic() - started < 60


# --------------------------------------------------------------------------- unit words, linear and unchanged

_OLD_UNIT_WORDS = re.compile(r"^(?P<value>.*?\d[^a-zA-Z]*?)\s+(?P<unit>[a-zA-Z][a-zA-Z ]*?)\.?$")


def old_unit_rule(s: str) -> str:
    """The regex the linear scan replaced (quadratic on long inputs; fine on short ones)."""
    unit = _OLD_UNIT_WORDS.match(s)
    if unit and not re.search(r"\\|[a-zA-Z]", unit.group("value")):
        return unit.group("value").strip()
    return s


@settings(max_examples=400, derandomize=True, deadline=None)
@given(st.text(alphabet="12 ab.\n\t\\,-x", min_size=1, max_size=14))
def test_unit_words_rule_is_the_old_regex_in_linear_time(text):
    from polar.math import _drop_unit_words

    text = text.strip()
    if text:
        assert _drop_unit_words(text) == old_unit_rule(text)


@pytest.mark.parametrize(
    "answer, expected",
    [("18 dollars", "18"), ("1.5 square cm.", "1.5"), ("5 \\text{cm}", "5"), ("3 apples and 2", "3 apples and 2")],
)
def test_unit_words_examples(answer, expected):
    assert clean_answer(answer) == expected


# --------------------------------------------------------------------------- fuzz

TOKENS = [
    "\\boxed{", "\\boxed ", "\\fbox{", "{", "}", "(", ")", "[", "]", "\\{", "\\}", "\\frac{", "\\dfrac",
    "\\sqrt{", "\\sqrt[", "^", "^{", "_", "!", "e", "E", "1e", "e-", "10", "9", "0", "7", ".", ",", "/",
    "-", "+", "=", "x", "x=", " ", "\n", "\t", "\\text{", "cm", "dollars", "\\left(", "\\right)",
    "\\left[", "\\%", "%", "$", "\\$", "\\circ", "°", "\\begin{pmatrix}", "\\end{pmatrix}", "\\\\",
    "&", "The answer is ", "answer is:", "</think>", "<think>", "\\infty", "\\pi", "\\cdot", "\\times",
    "\\binom{", "\\sum_{", "\\prod_{", "\\int", "\\lim", "\\in", "\\cup", "\\le", "\\ne", "\\,", "\\!",
    "\x00", "\ud800", "\udfff", "١", "２", "²", "\u200b", "(A)", "\\text{(B)}", "\\mathrm{", "\\operatorname{",
]
GOLDS = ["5", "-3", "\\frac{1}{2}", "0.25", "1,000", "x=5", "(C)", "2\\sqrt{2}", "(1,2)", "[-2,\\infty)",
         "\\text{Devon}", "50\\%", "1e400", "10^{6}"]

random_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=300)
token_soup = st.lists(st.sampled_from(TOKENS), max_size=200).map("".join)
huge_number = st.builds(
    lambda mantissa, exponent, form: form.format(m=mantissa, e=exponent),
    st.integers(-(10**40), 10**40),
    st.one_of(st.integers(-(10**6), 10**6), st.integers(-(10**30), 10**30)),
    st.sampled_from(["{m}e{e}", "{m}E{e}", "{m}.5e{e}", "{m}\\times10^{{{e}}}", "10^{{{e}}}", "{m}^{{{e}}}",
                     "({m})!", "{m}!!", "\\frac{{{m}}}{{{e}}}", "{m}/{e}", "2^{{2^{{{e}}}}}", "{m}^{{{m}^{{{e}}}}}"]),
)
long_text = st.builds(
    lambda token, length: (token * (length // len(token) + 1))[:length],
    st.sampled_from(TOKENS + ["1 ", "12", "a", "1,", "x+", "1/", "\\text{a}", "answer is\n"]),
    st.integers(1, 100_000),
)
NESTINGS = [("{", "}"), ("(", ")"), ("\\boxed{", "}"), ("\\frac{1}{", "}"), ("\\sqrt{", "}"),
            ("\\left(", "\\right)"), ("\\text{", "}"), ("10^{", "}"), ("[", ")"), ("-(", ")")]
deep_nesting = st.builds(
    lambda pair, depth, core, closing: pair[0] * depth + core + pair[1] * int(depth * closing),
    st.sampled_from(NESTINGS),
    st.integers(1, 30_000),
    st.sampled_from(["1", "x", "", "2^{10}", "\\boxed{3}"]),
    st.sampled_from([1.0, 0.5, 0.0, 1.5]),  # balanced, half-closed, never closed, over-closed
)
hostile = st.one_of(random_text, token_soup, huge_number, long_text, deep_nesting)
completion = st.builds(
    lambda before, body, after: before + body + after,
    st.sampled_from(["", "\\boxed{", "So the answer is \\boxed{", "<think>\\boxed{1}</think>\\boxed{", "The answer is "]),
    hostile,
    st.sampled_from(["", "}", "}.", "} Therefore the answer is 5.", "}}}"]),
)


@settings(
    max_examples=300, derandomize=True, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
@given(completion, st.sampled_from(GOLDS))
def test_fuzz_every_call_is_bounded_and_gives_a_verdict(text, gold):
    for mode in ANSWER_MODES:
        answer = timed(extract_answer, text, mode)
        assert answer is None or isinstance(answer, str)
        assert timed(is_equivalent, answer, gold) in (True, False)
    assert timed(is_equivalent, text, gold) in (True, False)
    assert timed(is_equivalent, gold, text) in (True, False)  # a hostile gold
    assert timed(check_answers, [text], [text]) == [True]
    timed(extract_boxed, text)
    assert isinstance(timed(normalize_answer, text), str)


# --------------------------------------------------------------------------- outside the main thread

THREAD_CASES = [  # pred, gold, verdict with the shortcut, verdict of math-verify alone
    (r"\boxed{1e999999999}", "5", False, False),
    (r"\boxed{1e400}", "5", False, False),
    ("\\frac{" + HUGE_DIGITS + "}{3}", "5", False, False),
    ("1 " * 50_000, "5", False, False),
    ("10^{10^{10^{10}}}", "5", False, False),
    ("(10^{10^{10}})!", "5", False, False),
    ("(" * 1500 + "1" + ")" * 1500, "5", False, False),
    ("\\frac{1}{" * 300 + "2" + "}" * 300, "5", False, False),
    ("\\binom{10000000}{5000000}", "5", False, False),
    ("\ud800", "5", False, False),
    ("\x00", "(1,2)", False, False),
    # equal, but too long for math-verify: only the numeric shortcut can tell
    ("\\frac{" + "2" * 5000 + "}{" + "6" * 5000 + "}", "\\frac{1}{3}", True, False),
    ("2\\sqrt{2}", "\\sqrt{8}", True, True),  # the helper still answers after all of the above
]


def test_hostile_answers_outside_the_main_thread():
    # Other threads send symbolic checks to a helper process; the same inputs must hold there.
    results: list[tuple[str, bool, float]] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            is_equivalent("\\frac{2}{4}", "\\frac{1}{2}", fast_path=False)  # start the helper
            for pred, gold, _, _ in THREAD_CASES:
                for fast in (True, False):
                    started = time.monotonic()
                    verdict = is_equivalent(pred, gold, fast_path=fast)
                    results.append((pred[:40], verdict, time.monotonic() - started))
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(300)
    assert not thread.is_alive() and not errors, errors
    expected = [verdict for case in THREAD_CASES for verdict in case[2:]]
    assert [verdict for _, verdict, _ in results] == expected, results
    slow = [(pred, seconds) for pred, _, seconds in results if seconds >= BOUND]
    assert not slow, slow


def test_a_deadline_inside_a_finaliser_is_not_printed_and_still_stops_the_check():
    # The alarm can fire while a finaliser runs (sympy frees objects constantly); Python cannot
    # raise there and printed "Exception ignored in ... _Deadline" (under pytest the hook itself
    # was interrupted by the next alarm and the test errored).
    import sys

    from polar.math import _alarm, _Deadline

    seen: list = []
    previous = sys.unraisablehook
    sys.unraisablehook = seen.append

    class SlowToFree:
        def __del__(self) -> None:
            until = time.monotonic() + 0.3
            while time.monotonic() < until:
                pass

    stopped = False
    try:
        with _alarm(0.05):
            SlowToFree()  # freed at once: the first alarm fires inside __del__
            until = time.monotonic() + 5
            while time.monotonic() < until:
                pass
    except _Deadline:
        stopped = True
    finally:
        sys.unraisablehook = previous
    assert stopped, "the repeating alarm did not stop the check after the finaliser"
    assert not [u for u in seen if isinstance(u.exc_value, _Deadline)], seen
