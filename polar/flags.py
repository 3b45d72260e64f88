"""Value types for command-line flags, shared by every command and ``run_polar.py``.

A number that means nothing (``--num_simulations -5``, ``--limit 0``, ``--time_limit -5``,
``--learning_rate nan``) must stop the command before any work, with one line naming the flag and
the accepted range, rather than run and write results that look real. Each function here is an
``argparse`` ``type=``: it parses the text and raises ``ArgumentTypeError``, which argparse turns
into ``error: argument --flag: ...``. :class:`Parser` prints that as one line (without the usage
block, which for these commands is dozens of lines long).

Where the authors' release gives a value a meaning (``--original_path_weight`` is clamped to
[0, 1], ``--grad_clip_norm 0`` means off, negative ``--warmup_steps`` count as 0) the flag keeps
accepting it; only values with no meaning are refused.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import NoReturn

SEED_LIMIT = 2**32  # numpy's and the release's seed range: 0 <= seed < 2**32


class Parser(argparse.ArgumentParser):
    """``ArgumentParser`` whose errors are one line: ``prog: error: message (see prog --help)``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(text: str, kind: type, what: str) -> int | float:
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def int_range(low: int | None = None, high: int | None = None, what: str | None = None) -> Callable[[str], int]:
    """An integer in ``[low, high]`` (either bound may be open)."""
    what = what or _describe("an integer", low, high)

    def parse(text: str) -> int:
        value = _number(text, int, what)
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value

    parse.__name__ = "integer"  # argparse names the type in some messages
    return parse


def float_range(
    low: float | None = None, high: float | None = None, low_open: bool = False, what: str | None = None
) -> Callable[[str], float]:
    """A finite float in ``[low, high]`` (``(low, high]`` with ``low_open``); never NaN or inf."""
    what = what or _describe("a finite number", low, high, low_open)

    def parse(text: str) -> float:
        value = _number(text, float, what)
        if low is not None and (value < low or (low_open and value == low)):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


def _describe(noun: str, low, high, low_open: bool = False) -> str:
    if low is not None and high is not None:
        return f"{noun} in {'(' if low_open else '['}{low}, {high}]"
    if low is not None:
        return f"{noun} {'>' if low_open else '>='} {low}"
    if high is not None:
        return f"{noun} <= {high}"
    return noun


positive_int = int_range(1, what="a positive integer")
non_negative_int = int_range(0, what="a non-negative integer")
seed = int_range(0, SEED_LIMIT - 1, what="a seed in [0, 2**32)")
positive_float = float_range(0.0, low_open=True, what="a positive finite number")
non_negative_float = float_range(0.0, what="a non-negative finite number")
finite_float = float_range(what="a finite number")
probability = float_range(0.0, 1.0, what="a probability in [0, 1]")


def torch_device(text: str) -> str:
    """A torch device this machine has: ``cpu``, ``cuda`` or ``cuda:N`` (N below the GPU count), or ``auto``.

    Checked when the flag is read, so a typo or a GPU the machine lacks is one line naming the
    flag rather than a traceback after the model has loaded.
    """
    import torch

    if text == "auto":  # as the Python API: cuda when available, else cpu
        return text
    try:
        parsed = torch.device(text)
    except (RuntimeError, TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}") from None
    if parsed.type == "cpu":
        return text
    if parsed.type != "cuda":
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    if not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device is available here (use --device cpu)")
    count = torch.cuda.device_count()
    if parsed.index is not None and parsed.index >= count:
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count} CUDA device(s), cuda:0-cuda:{count - 1}")
    return text
