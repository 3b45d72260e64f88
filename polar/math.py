"""Math answers: pull the final answer out of a completion and decide whether it equals the gold.

The reward of program search and every accuracy number depend on this module, so it has two
goals that pull in different directions: be *right* about equivalence (``1,000`` is ``1000``,
``x=5`` is ``5``, ``\\dfrac12`` is ``0.5``) and never *hang* (a model can write
``10^{10^{10}}`` and sympy will happily try to build that integer in C, where no signal can stop it).

The checking order is cheapest first:

1. exact / normalised string match (units, ``\\text{}``, ``\\%``, ``^\\circ``, ``\\$``, thousands
   separators, ``x=``, choice letters, ``\\dfrac`` ...);
2. plain numbers on both sides: numeric comparison with rel 1e-9 / abs 1e-8, decisive;
3. ``math-verify`` (symbolic: fractions, radicals, intervals, tuples, matrices, sets), after a
   screen that rejects expressions whose numbers would be astronomically large, under a deadline.

Deadlines: in the main thread a repeating ``SIGALRM`` timer interrupts slow Python-level sympy
work. Signals only work in the main thread, so calls from other threads are sent to a helper
process that is killed when it overruns. Either way a check that runs out of time counts as
"not equivalent".

Both sides are untrusted text (a model's output, a gold answer read from a file), so the stages
outside the deadline are kept cheap by construction: extraction and clean-up scan the text in
linear time (no regex that can backtrack quadratically), answers longer than
:data:`MAX_ANSWER_CHARS` are only compared as written, and plain numbers are compared as
:class:`~decimal.Decimal` values, which carry their exponent instead of materialising
``10**999999999``. An answer that cannot be compared (too large, unparseable, a library error) is
*wrong*; checking never raises because of what the answers contain.
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import math
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from decimal import MAX_EMAX, MAX_PREC, MIN_EMIN, Context, Decimal
from fractions import Fraction
from typing import Any

ANSWER_MODES = ("boxed", "lenient")
DEFAULT_TIMEOUT = 2.0  # seconds per check; a pathological answer costs at most this
REL_TOL = 1e-9
ABS_TOL = 1e-8
MAX_RESULT_DIGITS = 100_000  # numbers larger than this are never built
# Longer "answers" are compared only as written: not cleaned, not parsed. MATH/GSM8K golds are a
# few dozen characters; this bounds the cost of every regex and of math-verify's parser.
MAX_ANSWER_CHARS = 2_000
# math-verify's parser takes time exponential in bracket nesting (``{{{{{{{{{{1}}}}}}}}}}``: ~2 s,
# each level ~1.4x more); MATH golds nest at most 3 deep. Deeper answers are not parsed.
MAX_NESTING = 8

_BOX_COMMANDS = ("\\boxed", "\\fbox")

# --------------------------------------------------------------------------- extraction


def _strip_think(text: str) -> str:
    """The answer follows a reasoning block: keep only the text after the last ``</think>``."""
    marker = text.rfind("</think>")
    return text if marker < 0 else text[marker + len("</think>"):]


def _last_box_start(text: str) -> tuple[int, str] | None:
    best: tuple[int, str] | None = None
    for command in _BOX_COMMANDS:
        at = text.rfind(command)
        while at >= 0 and text[at + len(command): at + len(command) + 1].isalpha():
            at = text.rfind(command, 0, at)  # e.g. "\fboxsep" is another command
        if at >= 0 and (best is None or at > best[0]):
            best = (at, command)
    return best


_BRACE = re.compile(r"[{}]")


def _balanced_group(text: str, open_at: int) -> str | None:
    """Content of the ``{...}`` group opening at ``open_at``, or None when it never closes.

    One pass that visits only the braces, so a long completion costs little.
    """
    depth = 0
    for brace in _BRACE.finditer(text, open_at):
        depth += 1 if brace.group() == "{" else -1
        if depth == 0:
            return text[open_at + 1: brace.start()]
    return None


def extract_boxed(text: str | None) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``.

    This is the reference answer rule: the *last* box counts, and if its braces never close
    (e.g. generation stopped mid-answer) there is no answer. Only the text after a ``</think>``
    block is searched, so a box inside the reasoning does not count as the final answer.
    ``\\boxed 5`` (no braces, as some solutions write it) gives ``5``.
    """
    if not text:
        return None
    text = _strip_think(text)
    found = _last_box_start(text)
    if found is None:
        return None
    at, command = found
    rest_at = at + len(command)
    stripped = text[rest_at:].lstrip()
    if stripped.startswith("{"):
        group = _balanced_group(text, len(text) - len(stripped))
        return None if group is None else group.strip()
    if text[rest_at: rest_at + 1].isspace():
        token = re.match(r"[^\s$]+", stripped)
        return token.group(0) if token else None
    return None


def strip_boxed(answer: str) -> str:
    """Gold answers may come as ``\\boxed{42}`` (the release's ``gt_ans``): return ``42``."""
    answer = answer.strip()
    stripped = answer.strip("$ ")
    if stripped.startswith(_BOX_COMMANDS):
        inner = extract_boxed(stripped)
        if inner is not None:
            return inner
    return answer


# Possessive quantifiers: "answer is" followed by a long run of blank lines must fail in linear
# time (``\s*:?\s*`` would try every split of the run between the two ``\s*``).
_ANSWER_IS = re.compile(r"answer\s++is\s*+:?\s*+(.+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def _answer_phrase(text: str) -> str | None:
    matches = list(_ANSWER_IS.finditer(text))
    if not matches:
        return None
    phrase = matches[-1].group(1).split("\n")[0].strip()
    phrase = re.split(r"\.\s|\.$", phrase)[0].strip().strip("$").strip()
    return phrase or None


def _last_number(text: str) -> str | None:
    numbers = _NUMBER.findall(text)
    if not numbers:
        return None
    return numbers[-1].rstrip(",").replace(",", "") or None


def extract_answer(text: str | None, mode: str = "boxed") -> str | None:
    """The final answer of a completion, or None when there is none.

    ``boxed`` is the reference rule (no box means wrong). ``lenient`` also accepts
    "the answer is X" and, failing that, the last number in the text; it is meant for small
    models that know the answer but not the format, and is never the default.
    """
    if mode not in ANSWER_MODES:
        raise ValueError(f"answer mode must be one of {ANSWER_MODES}, got {mode!r}")
    boxed = extract_boxed(text)
    if boxed is not None or mode == "boxed" or not text:
        return boxed
    text = _strip_think(text)
    return _answer_phrase(text) or _last_number(text)


# --------------------------------------------------------------------------- normalisation

_TEXT_COMMANDS = re.compile(
    r"\\(?:text|textbf|textrm|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}(\^\{?\d\}?)?"
)
_SPACING = re.compile(r"(?<!\\)\\[,;:! ]|\\q?quad|~")
_DEGREES = re.compile(r"\^\s*+\{?\s*+\\circ\s*\}?|\\circ|°|\\degree")
_ASSIGNMENT = re.compile(r"^[A-Za-z](?:_\{?\w+\}?)?\s*=\s*(?P<rest>[^=]+)$")
_CHOICE = re.compile(r"^\(\s*([A-Ea-e])\s*\)\.?$|^([A-E])[.)]?$")
_THOUSANDS = re.compile(r"^-?[1-9]\d{0,2}(?:,\d{3})+(?:\.\d+)?$")
_ASCII_LETTER = re.compile(r"[a-zA-Z]")
_UNIT_TAIL = re.compile(r"[a-zA-Z][a-zA-Z ]*")
_DIGIT = re.compile(r"\d")
# ``\d+(?:\.\d*)?`` rather than ``\d+\.?\d*``: the latter tries every split of a long digit run
# between its two ``\d`` loops before failing, which is quadratic in the length of the run.
_PLAIN_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_FRACTION = re.compile(r"^(?P<sign>-?)\\frac\{(?P<num>-?\d+)\}\{(?P<den>-?\d+)\}$|^(?P<sign2>-?)(?P<num2>\d+)/(?P<den2>\d+)$")


def _unwrap_text(match: re.Match, whole: str) -> str:
    """``\\text{cm}`` after a number is a unit and goes; ``\\text{Devon}`` alone is the answer."""
    content = match.group(1).strip()
    rest = (whole[: match.start()] + whole[match.end():]).strip()
    is_unit = re.fullmatch(r"[A-Za-z][A-Za-z .]*", content) and re.search(r"\d", rest)
    return "" if is_unit else content + (match.group(2) or "")


def _drop_unit_words(s: str) -> str:
    """``18 dollars`` -> ``18``: a plain value followed only by words (a unit) is the value.

    Applies when ``s`` is a value without letters or backslashes that holds a digit (one before
    any line break), then whitespace, then ASCII words and spaces, then at most one period.
    Written as one left-to-right scan: the regex it replaces backtracked quadratically on long
    runs of digits and spaces.
    """
    body = s[:-1] if s.endswith(".") else s
    letter = _ASCII_LETTER.search(body)
    if letter is None or letter.start() == 0:
        return s
    value = body[: letter.start()]
    if not value[-1].isspace() or "\\" in value or not _UNIT_TAIL.fullmatch(body, letter.start()):
        return s
    digit = _DIGIT.search(value)
    if digit is None or "\n" in value[: digit.start()]:
        return s
    return value.strip()


def clean_answer(answer: str) -> str:
    """Light LaTeX clean-up that keeps the expression parseable (spaces are kept).

    Removes what MATH/GSM8K answers carry but does not change their value: ``\\left``/``\\right``,
    spacing commands, ``\\text{units}``, ``\\%``, degrees, dollar signs, ``\\dfrac``/``\\tfrac``,
    a trailing period, ``x =`` in front of a single value, and thousands separators.
    An answer longer than :data:`MAX_ANSWER_CHARS` (after unboxing) is returned as it is: it is
    not a short math answer, and leaving it alone keeps the cost linear in its length.
    """
    s = strip_boxed(answer).strip()
    if len(s) > MAX_ANSWER_CHARS:
        return s
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("\\left", "").replace("\\right", "").replace("{,}", "")
    s = _SPACING.sub(" ", s)
    while _TEXT_COMMANDS.search(s):
        s = _TEXT_COMMANDS.sub(lambda m: _unwrap_text(m, s), s, count=1)
    s = _DEGREES.sub("", s)
    s = s.replace("\\%", "").replace("%", "").replace("\\$", "").replace("$", "")
    s = s.strip().rstrip(".").strip()
    assignment = _ASSIGNMENT.match(s)
    if assignment:
        s = assignment.group("rest").strip()
    s = _drop_unit_words(s)
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    return s


def normalize_answer(answer: str) -> str:
    """Comparison key: :func:`clean_answer` without whitespace, choice letters as ``(X)``."""
    s = re.sub(r"\s+", "", clean_answer(answer))
    choice = _CHOICE.match(s)
    if choice:
        s = f"({(choice.group(1) or choice.group(2)).upper()})"
    return s


# Plain numbers are read exactly as Decimals (``_EXACT``) and compared with arithmetic rounded to
# 60 significant digits (``_NUMERIC``), far finer than the tolerance. Decimal keeps the exponent
# beside the digits, so ``1e999999999`` is as cheap as ``1`` (Fraction would build a billion-digit
# integer, float would overflow), and reading digits has no int-string limit. Exponents beyond
# the contexts' range become Infinity or 0 instead of raising (no traps).
_EXACT = Context(prec=MAX_PREC, Emax=MAX_EMAX, Emin=MIN_EMIN, traps=[])
_NUMERIC = Context(prec=60, Emax=MAX_EMAX, Emin=MIN_EMIN, traps=[])
_REL = Decimal(repr(REL_TOL))
_ABS = Decimal(repr(ABS_TOL))


def as_number(key: str) -> Decimal | None:
    """A normalised answer (:func:`normalize_answer`) that is a plain number (``-12``, ``0.5``,
    ``1e-3``, ``3/4``, ``\\frac{3}{4}``) as a Decimal, or None: the numeric shortcut's reading.

    Every step is linear in the length of ``key`` whatever its digits and exponent; a value out of
    range comes back infinite, which :func:`numbers_close` never calls close to anything.
    """
    if _PLAIN_NUMBER.fullmatch(key):
        return _EXACT.create_decimal(key)
    frac = _FRACTION.match(key)
    if frac:
        sign = frac.group("sign") or frac.group("sign2") or ""
        num = _EXACT.create_decimal(frac.group("num") or frac.group("num2"))
        den = _EXACT.create_decimal(frac.group("den") or frac.group("den2"))
        if den.is_zero():
            return None
        value = _NUMERIC.divide(num, den)
        return _NUMERIC.minus(value) if sign else value
    return None


def _to_decimal(x: Decimal | Fraction | float | int) -> Decimal:
    if isinstance(x, Decimal):
        return x
    if isinstance(x, Fraction):
        return _NUMERIC.divide(_EXACT.create_decimal(x.numerator), _EXACT.create_decimal(x.denominator))
    if isinstance(x, float):
        return _EXACT.create_decimal_from_float(x)
    return _EXACT.create_decimal(x)


def numbers_close(a: Decimal | Fraction | float | int, b: Decimal | Fraction | float | int) -> bool:
    """Equal, or within rel 1e-9 / abs 1e-8 as :func:`math.isclose` defines it (SPEC 4).

    Computed in Decimal, so no size of number overflows or takes long; NaN and infinities are
    never close (an answer too large to represent cannot be compared).
    """
    a, b = _to_decimal(a), _to_decimal(b)
    if not (a.is_finite() and b.is_finite()):
        return False
    if a == b:
        return True
    difference = _NUMERIC.abs(_NUMERIC.subtract(a, b))
    scale = _NUMERIC.max(_NUMERIC.abs(a), _NUMERIC.abs(b))
    return difference <= _NUMERIC.max(_NUMERIC.multiply(_REL, scale), _ABS)


def _fast_verdict(pred_key: str, gold_key: str) -> bool | None:
    """Decide from the normalised strings alone when possible; None means 'ask math-verify'."""
    if pred_key == gold_key:
        return True
    if not pred_key or not gold_key:
        return False
    pred_num, gold_num = as_number(pred_key), as_number(gold_key)
    if pred_num is not None and gold_num is not None:
        return numbers_close(pred_num, gold_num)
    if _CHOICE.match(pred_key) or _CHOICE.match(gold_key):
        return False  # a choice letter only equals the same letter
    return None


# --------------------------------------------------------------------------- symbolic check


class _Deadline(BaseException):
    """Raised by the alarm. A BaseException so library code's ``except Exception`` cannot eat it."""


class _DropNoTimeoutWarning(logging.Filter):
    """math-verify warns when its own timeout is off; ours is on, so the warning is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


_log = logging.getLogger(__name__)

for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropNoTimeoutWarning())


def _raise_deadline(signum: int, frame: Any) -> None:
    raise _Deadline()


def _drop_deadline(unraisable: Any, forward: Callable[[Any], None]) -> None:
    """``sys.unraisablehook`` while an alarm runs: a deadline that fires inside a finaliser or a
    garbage-collection callback cannot propagate, and Python would print it as "Exception ignored
    in ..." on the user's terminal. It is dropped (the repeating timer fires again in the check
    itself); anything else goes to the hook that was installed before."""
    if not isinstance(unraisable.exc_value, _Deadline):
        forward(unraisable)


@contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    """Interrupt the block after ``seconds`` (main thread only).

    The timer repeats every 50 ms after it first fires, so code that swallows one interrupt is
    interrupted again. An outer timer that was running is restored afterwards.
    """
    old_handler = signal.signal(signal.SIGALRM, _raise_deadline)
    old_hook = sys.unraisablehook
    sys.unraisablehook = functools.partial(_drop_deadline, forward=old_hook)
    outer_left, _ = signal.setitimer(signal.ITIMER_REAL, seconds, 0.05)
    started = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        sys.unraisablehook = old_hook
        if outer_left > 0:
            remaining = outer_left - (time.monotonic() - started)
            signal.setitimer(signal.ITIMER_REAL, max(remaining, 1e-3))


# Parses of short answers are cached (golds repeat across many checks; a short parse keeps a few
# KB). Long ones are not: a 1,500-character expression keeps ~400 KB, and a model can write
# thousands of distinct ones.
_CACHED_PARSE_CHARS = 256


def _parse(answer: str) -> tuple:
    """math-verify's parse of one cleaned answer."""
    return _parse_cached(answer) if len(answer) <= _CACHED_PARSE_CHARS else _parse_uncached(answer)


def _parse_uncached(answer: str) -> tuple:
    from math_verify import parse

    return tuple(parse(f"${answer}$", parsing_timeout=None))


_parse_cached = functools.lru_cache(maxsize=65536)(_parse_uncached)


def _log10_bound(expr: Any) -> float:
    """Upper bound on log10 of the size of ``expr``'s numbers, ``inf`` if it could explode.

    Python computes ``10**(10**10)`` in C, where no alarm can interrupt it, so such expressions
    must be refused before sympy touches them.
    """
    if isinstance(expr, str):
        return 0.0
    mpf = getattr(expr, "_mpf_", None)
    if isinstance(mpf, tuple) and len(mpf) == 4:  # sympy Float: sign, mantissa, exponent, bits
        # Turning 1e-999999999 into a Rational (as comparisons may) builds its huge denominator.
        return max((abs(mpf[2]) + abs(mpf[3])) * 0.30103, 1.0)
    if getattr(expr, "is_Integer", False):
        return max(int(expr).bit_length() * 0.30103, 1.0)
    if getattr(expr, "is_Rational", False):
        return max(_log10_bound(expr.p), _log10_bound(expr.q)) if hasattr(expr, "p") else 1.0
    if isinstance(expr, int):
        return max(expr.bit_length() * 0.30103, 1.0)
    if getattr(expr, "is_Pow", False):
        return _pow_bound(*expr.args)
    kind = type(expr).__name__
    if kind in ("factorial", "factorial2", "gamma", "subfactorial"):
        return _factorial_bound(expr.args[0])
    if kind == "Product":  # as many factors as the limits allow, each as large as the limits
        return _product_bound(expr.args[0], expr.args[1:])
    children = _children(expr)
    if not children:
        return 1.0
    bounds = [_log10_bound(child) for child in children]
    if getattr(expr, "is_Mul", False):
        return sum(bounds)
    return max(bounds) + math.log10(len(bounds))


def _children(expr: Any) -> Sequence[Any]:
    if hasattr(expr, "tolist") and hasattr(expr, "shape"):  # sympy matrix
        return [x for row in expr.tolist() for x in row]
    return getattr(expr, "args", ())


def _pow_bound(base: Any, exponent: Any) -> float:
    exponent_digits = _log10_bound(exponent)
    if exponent_digits > 6:  # |exponent| > 1e6: refuse whatever the base
        return math.inf
    return max(_log10_bound(base), 1.0) * 10.0 ** exponent_digits


def _factorial_bound(argument: Any) -> float:
    digits = _log10_bound(argument)
    if digits > 6:
        return math.inf
    n = 10.0 ** digits
    return n * math.log10(max(n, 10.0))


def _product_bound(factor: Any, limits: Sequence[Any]) -> float:
    digits = max((_log10_bound(end) for limit in limits for end in tuple(limit)[1:]), default=1.0)
    if digits * len(limits) > 6:
        return math.inf
    return 10.0 ** (digits * len(limits)) * max(_log10_bound(factor), digits)


def _is_safe(parsed: tuple) -> bool:
    return all(_log10_bound(item) <= MAX_RESULT_DIGITS for item in parsed)


_BRACKET = re.compile(r"[(\[{)\]}]")
# ``1E999999999`` is one number token to math-verify's LaTeX grammar, and sympy turns it into an
# exact Rational by building ``10**999999999`` in C, where no deadline can stop it (``1E9999999``
# already takes minutes). Exponents this long are refused before parsing; MATH and GSM8K answers
# never write scientific notation with more than a few exponent digits.
_SCIENTIFIC_EXPONENT = re.compile(r"(?<=[\d.,])[eE][-+]?0*(\d+)")
MAX_SCIENTIFIC_EXPONENT_DIGITS = 4


def _worth_parsing(answer: str) -> bool:
    """Short, shallow and small enough for math-verify (see MAX_ANSWER_CHARS, MAX_NESTING,
    MAX_SCIENTIFIC_EXPONENT_DIGITS)."""
    if len(answer) > MAX_ANSWER_CHARS:
        return False
    if any(len(m.group(1)) > MAX_SCIENTIFIC_EXPONENT_DIGITS for m in _SCIENTIFIC_EXPONENT.finditer(answer)):
        return False
    depth = deepest = 0
    for bracket in _BRACKET.findall(answer):
        depth = depth + 1 if bracket in "([{" else max(depth - 1, 0)
        deepest = max(deepest, depth)
    return deepest <= MAX_NESTING


def _symbolic_equal(pred: str, gold: str) -> bool:
    """math-verify on cleaned answers; no deadline of its own. Reached only through
    :func:`is_equivalent` (in this process or the helper), which has already applied the size
    screen (:func:`_worth_parsing`) to both answers.

    Any error on the way is a "not equivalent": parsers and sympy raise RecursionError on deep
    nesting, ValueError on integers past Python's int-string limit, MemoryError, TypeError and
    their own errors on odd input, and an answer that cannot be compared is wrong. The deadline
    (a BaseException) still gets through.
    """
    try:
        from math_verify import verify

        gold_parsed, pred_parsed = _parse(gold), _parse(pred)
        if not gold_parsed or not pred_parsed:
            return False
        if not (_is_safe(gold_parsed) and _is_safe(pred_parsed)):
            return False
        return bool(verify(list(gold_parsed), list(pred_parsed), timeout_seconds=None))
    except Exception:
        _log.debug("answer check failed; counted as not equivalent", exc_info=True)
        return False


def _symbolic_equal_with_alarm(pred: str, gold: str, timeout: float) -> bool:
    try:
        with _alarm(timeout):
            return _symbolic_equal(pred, gold)
    except _Deadline:
        return False


class _HelperProcess:
    """A child process that runs symbolic checks for non-main threads and is killed on overrun.

    It is a plain ``python -c`` subprocess speaking JSON lines, so it works wherever the caller
    runs (scripts, notebooks, stdin) without multiprocessing's re-import of ``__main__``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._lines: queue.Queue[str] = queue.Queue()

    def check(self, pred: str, gold: str, timeout: float) -> bool:
        with self._lock:
            self._start()
            try:
                self._process.stdin.write(json.dumps([pred, gold, timeout]) + "\n")
                self._process.stdin.flush()
                return bool(json.loads(self._lines.get(timeout=timeout + 0.5)))
            except (queue.Empty, OSError, ValueError):
                self._stop()
                return False

    def _start(self) -> None:
        if self._process is not None and self._process.poll() is None:
            return
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self._process = subprocess.Popen(
            [sys.executable, "-c", "from polar.math import _helper_main; _helper_main()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, env=env,
        )
        self._lines = queue.Queue()
        threading.Thread(target=_pump_lines, args=(self._process.stdout, self._lines), daemon=True).start()
        try:
            ready = self._lines.get(timeout=120)
        except queue.Empty:
            ready = None
        if ready != "ready":
            self._stop()
            raise RuntimeError("the answer-checking helper process did not start")
        atexit.register(self._stop)

    def _stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait(5)
        self._process = None


def _pump_lines(stream: Any, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line.strip())


def _helper_main() -> None:
    """Entry point of the helper process: answer ``[pred, gold, timeout]`` lines until EOF."""
    import math_verify  # noqa: F401  (import before saying ready, so checks are not timed on it)

    protocol = sys.stdout
    sys.stdout = sys.stderr  # anything a library prints must not corrupt the protocol
    print("ready", file=protocol, flush=True)
    for line in sys.stdin:
        pred, gold, timeout = json.loads(line)
        verdict = _symbolic_equal_with_alarm(pred, gold, timeout)
        print(json.dumps(verdict), file=protocol, flush=True)


_HELPER = _HelperProcess()


def _symbolic_with_deadline(pred: str, gold: str, timeout: float | None) -> bool:
    if timeout is None or timeout <= 0:
        return _symbolic_equal(pred, gold)
    if hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread():
        return _symbolic_equal_with_alarm(pred, gold, timeout)
    return _HELPER.check(pred, gold, timeout)


# --------------------------------------------------------------------------- public checks


def is_equivalent(
    pred: str | None,
    gold: str | None,
    timeout: float | None = DEFAULT_TIMEOUT,
    fast_path: bool = True,
) -> bool:
    """Is the predicted answer mathematically the gold answer?

    Both sides may be bare answers or ``\\boxed{...}``. ``None`` or empty predictions are wrong.
    ``timeout`` bounds the whole check in seconds (``None`` or 0 lifts the deadline from the
    symbolic part — only for trusted input): the clean-up and the numeric shortcut take
    milliseconds for any input, and math-verify gets what is left. An answer that cannot be
    compared in time, or at all, is not equivalent; no input makes this raise.
    ``fast_path=False`` skips the string/number shortcuts and asks math-verify directly (used to
    measure math-verify on its own).
    """
    started = time.monotonic()
    if pred is None or gold is None:
        return False
    pred_clean, gold_clean = clean_answer(str(pred)), clean_answer(str(gold))
    if fast_path:
        verdict = _fast_verdict(normalize_answer(pred_clean), normalize_answer(gold_clean))
        if verdict is not None:
            return verdict
    if not pred_clean or not gold_clean:
        return False
    if not (_worth_parsing(pred_clean) and _worth_parsing(gold_clean)):
        return False
    if timeout is not None and timeout > 0:
        timeout -= time.monotonic() - started
        if timeout <= 0:
            return False
    return _symbolic_with_deadline(pred_clean, gold_clean, timeout)


def check_answers(
    preds: Sequence[str | None],
    golds: Sequence[str | None],
    timeout: float | None = DEFAULT_TIMEOUT,
    fast_path: bool = True,
) -> list[bool]:
    """:func:`is_equivalent` over parallel lists.

    Fast for thousands of checks: most pairs are settled by the string/number shortcuts, and
    parsed answers are cached, so a gold that is checked against many predictions (search
    evaluates many programs per question) is parsed once.
    """
    if len(preds) != len(golds):
        raise ValueError(f"check_answers: {len(preds)} predictions but {len(golds)} gold answers")
    return [is_equivalent(p, g, timeout=timeout, fast_path=fast_path) for p, g in zip(preds, golds)]
