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
"""

from __future__ import annotations

import atexit
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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from fractions import Fraction
from functools import lru_cache
from typing import Any

ANSWER_MODES = ("boxed", "lenient")
DEFAULT_TIMEOUT = 2.0  # seconds per check; a pathological answer costs at most this
REL_TOL = 1e-9
ABS_TOL = 1e-8
MAX_RESULT_DIGITS = 100_000  # numbers larger than this are never built
MAX_ANSWER_CHARS = 2_000  # longer "answers" are not worth a symbolic check

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


def _balanced_group(text: str, open_at: int) -> str | None:
    """Content of the ``{...}`` group opening at ``open_at``, or None when it never closes."""
    depth = 0
    for i in range(open_at, len(text)):
        char = text[i]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1: i]
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


_ANSWER_IS = re.compile(r"answer\s+is\s*:?\s*(.+)", re.IGNORECASE)
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
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|°|\\degree")
_ASSIGNMENT = re.compile(r"^[A-Za-z](?:_\{?\w+\}?)?\s*=\s*(?P<rest>[^=]+)$")
_CHOICE = re.compile(r"^\(\s*([A-Ea-e])\s*\)\.?$|^([A-E])[.)]?$")
_THOUSANDS = re.compile(r"^-?[1-9]\d{0,2}(?:,\d{3})+(?:\.\d+)?$")
_UNIT_WORDS = re.compile(r"^(?P<value>.*?\d[^a-zA-Z]*?)\s+(?P<unit>[a-zA-Z][a-zA-Z ]*?)\.?$")
_PLAIN_NUMBER = re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$")
_FRACTION = re.compile(r"^(?P<sign>-?)\\frac\{(?P<num>-?\d+)\}\{(?P<den>-?\d+)\}$|^(?P<sign2>-?)(?P<num2>\d+)/(?P<den2>\d+)$")


def _unwrap_text(match: re.Match, whole: str) -> str:
    """``\\text{cm}`` after a number is a unit and goes; ``\\text{Devon}`` alone is the answer."""
    content = match.group(1).strip()
    rest = (whole[: match.start()] + whole[match.end():]).strip()
    is_unit = re.fullmatch(r"[A-Za-z][A-Za-z .]*", content) and re.search(r"\d", rest)
    return "" if is_unit else content + (match.group(2) or "")


def clean_answer(answer: str) -> str:
    """Light LaTeX clean-up that keeps the expression parseable (spaces are kept).

    Removes what MATH/GSM8K answers carry but does not change their value: ``\\left``/``\\right``,
    spacing commands, ``\\text{units}``, ``\\%``, degrees, dollar signs, ``\\dfrac``/``\\tfrac``,
    a trailing period, ``x =`` in front of a single value, and thousands separators.
    """
    s = strip_boxed(answer).strip()
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
    unit = _UNIT_WORDS.match(s)
    if unit and not re.search(r"\\|[a-zA-Z]", unit.group("value")):
        s = unit.group("value").strip()
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


def _as_number(key: str) -> Fraction | float | None:
    """A plain number (``-12``, ``0.5``, ``1e-3``, ``3/4``, ``\\frac{3}{4}``) or None."""
    if _PLAIN_NUMBER.match(key):
        try:
            return Fraction(key)
        except (ValueError, ZeroDivisionError):
            return float(key)
    frac = _FRACTION.match(key)
    if frac:
        sign = frac.group("sign") or frac.group("sign2") or ""
        num = frac.group("num") or frac.group("num2")
        den = frac.group("den") or frac.group("den2")
        if int(den) == 0:
            return None
        value = Fraction(int(num), int(den))
        return -value if sign else value
    return None


def numbers_close(a: Fraction | float, b: Fraction | float) -> bool:
    """Exact for rationals, else rel 1e-9 / abs 1e-8 (SPEC 4)."""
    if a == b:
        return True
    return math.isclose(float(a), float(b), rel_tol=REL_TOL, abs_tol=ABS_TOL)


def _fast_verdict(pred_key: str, gold_key: str) -> bool | None:
    """Decide from the normalised strings alone when possible; None means 'ask math-verify'."""
    if pred_key == gold_key:
        return True
    if not pred_key or not gold_key:
        return False
    pred_num, gold_num = _as_number(pred_key), _as_number(gold_key)
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


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropNoTimeoutWarning())


def _raise_deadline(signum: int, frame: Any) -> None:
    raise _Deadline()


@contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    """Interrupt the block after ``seconds`` (main thread only).

    The timer repeats every 50 ms after it first fires, so code that swallows one interrupt is
    interrupted again. An outer timer that was running is restored afterwards.
    """
    old_handler = signal.signal(signal.SIGALRM, _raise_deadline)
    outer_left, _ = signal.setitimer(signal.ITIMER_REAL, seconds, 0.05)
    started = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        if outer_left > 0:
            remaining = outer_left - (time.monotonic() - started)
            signal.setitimer(signal.ITIMER_REAL, max(remaining, 1e-3))


@lru_cache(maxsize=65536)
def _parse(answer: str) -> tuple:
    """math-verify's parse of one cleaned answer (cached: golds repeat across many checks)."""
    from math_verify import parse

    return tuple(parse(f"${answer}$", parsing_timeout=None))


def _log10_bound(expr: Any) -> float:
    """Upper bound on log10 of the size of ``expr``'s numbers, ``inf`` if it could explode.

    Python computes ``10**(10**10)`` in C, where no alarm can interrupt it, so such expressions
    must be refused before sympy touches them.
    """
    if isinstance(expr, str):
        return 0.0
    if getattr(expr, "is_Integer", False):
        return max(int(expr).bit_length() * 0.30103, 1.0)
    if getattr(expr, "is_Rational", False):
        return max(_log10_bound(expr.p), _log10_bound(expr.q)) if hasattr(expr, "p") else 1.0
    if isinstance(expr, int):
        return max(expr.bit_length() * 0.30103, 1.0)
    if getattr(expr, "is_Pow", False):
        return _pow_bound(*expr.args)
    if type(expr).__name__ in ("factorial", "factorial2", "gamma", "subfactorial"):
        return _factorial_bound(expr.args[0])
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


def _is_safe(parsed: tuple) -> bool:
    return all(_log10_bound(item) <= MAX_RESULT_DIGITS for item in parsed)


def _symbolic_equal(pred: str, gold: str) -> bool:
    """math-verify on cleaned answers, with the size screen; no deadline of its own."""
    from math_verify import verify

    if len(pred) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:
        return False
    gold_parsed, pred_parsed = _parse(gold), _parse(pred)
    if not gold_parsed or not pred_parsed:
        return False
    if not (_is_safe(gold_parsed) and _is_safe(pred_parsed)):
        return False
    return bool(verify(list(gold_parsed), list(pred_parsed), timeout_seconds=None))


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
    ``timeout`` bounds the symbolic part (seconds; ``None`` disables it — only for trusted
    input). ``fast_path=False`` skips the string/number shortcuts and asks math-verify directly
    (used to measure math-verify on its own).
    """
    if pred is None or gold is None:
        return False
    pred_clean, gold_clean = clean_answer(str(pred)), clean_answer(str(gold))
    if fast_path:
        verdict = _fast_verdict(normalize_answer(pred_clean), normalize_answer(gold_clean))
        if verdict is not None:
            return verdict
    if not pred_clean or not gold_clean:
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
