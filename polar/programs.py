"""Programs of layers: the data type every other module passes around.

A program (the release calls it a *path*) is a non-empty list of decoder-layer indices in
``[0, D)``. ``list(range(D))`` is the model as shipped; omitting an index skips that layer and
repeating an index loops it. Programs are validated once, where they enter the system
(:func:`validate_program`); inner code trusts them.

The predictor does not emit paths directly. It emits the *segmentation form*: ``[0, D)`` cut into
contiguous segments of 1-4 layers, each with an op (skip / keep / repeat). :func:`path_to_segments`
turns a path into that form with a deterministic tie-break, so the same path always gives the same
training target.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import NamedTuple

SKIP, KEEP, REPEAT = 0, 1, 2
OP_NAMES = {SKIP: "skip", KEEP: "keep", REPEAT: "repeat"}
MAX_SEGMENT_SIZE = 4
IGNORE_INDEX = -100  # op label at layers that do not start a segment (torch CE ignore_index)
MAX_LAYER_USES = 2  # a segment runs its layers 0, 1 or 2 times (skip, keep, repeat)
# Depth and length limits for inputs that cannot come from a real model: no released LLM has more
# than a few hundred layers, and a bigger number (a typo, or a hostile file) would make parsing
# allocate memory in proportion to it before any error could be reported.
MAX_NUM_LAYERS = 10_000
MAX_PROGRAM_LENGTH = MAX_LAYER_USES * MAX_NUM_LAYERS

Program = list[int]


class Segment(NamedTuple):
    """``size`` layers starting at ``start``, emitted 0 (skip), 1 (keep) or 2 (repeat) times."""

    start: int
    size: int
    op: int


# --------------------------------------------------------------------------- text form


def full_program(num_layers: int) -> Program:
    """The model as shipped: every layer once, in order."""
    return list(range(num_layers))


_DIGITS = re.compile(r"[0-9]+")


def parse_program(text: str | Sequence[int], num_layers: int | None = None) -> Program:
    """Parse ``"0-11,11,12-27"``, ``"[0, 1, 2]"`` or ``"full"`` into a list of layer indices.

    Ranges are inclusive and may run downwards (``"5-3"`` is ``[5, 4, 3]``). When ``num_layers`` is
    given the result is validated against it; ``"full"`` needs it. A range's ends are checked
    against the depth (or :data:`MAX_NUM_LAYERS`) before it is expanded, and the program's length
    against :data:`MAX_PROGRAM_LENGTH`, so ``"0-999999999"`` is an error at once, not a
    gigabyte list.
    """
    if not isinstance(text, str):
        program = [_as_index(x, i) for i, x in enumerate(text)]
    else:
        stripped = text.strip()
        if stripped.lower() in ("full", "all"):
            if num_layers is None:
                raise ValueError("program 'full' needs the model depth")
            return full_program(num_layers)
        if stripped.startswith("["):
            try:
                items = json.loads(stripped)
            except json.JSONDecodeError as err:
                raise ValueError(f"program {_short(text)} is not a valid JSON list: {err.msg}") from None
            except RecursionError:
                raise ValueError(f"program {_short(text)} is nested too deeply to be a list of layers") from None
            if not isinstance(items, list):
                raise ValueError(f"program {_short(text)} must be a JSON list of layer indices")
            program = [_as_index(x, i) for i, x in enumerate(items)]
        else:
            program = []
            for part in stripped.split(","):
                part = part.strip()
                if not part:
                    raise ValueError(f"program {_short(text)} has an empty item")
                lo, sep, hi = part.partition("-")
                # ASCII digits only: int() would also read "+5", "1_0" (10) and other scripts' digits;
                # more than 20 digits is no layer index, and int() refuses past 4,300 anyway
                ends = (lo.strip(), hi.strip()) if sep else (lo.strip(),)
                if not all(_DIGITS.fullmatch(end) and len(end) <= 20 for end in ends):
                    raise ValueError(
                        f"program {_short(text)}: {part[:30]!r} is not a layer index or a range like 3-7"
                    )
                a = int(ends[0])
                b = int(ends[-1])
                _check_range(a, b, len(program), num_layers, text, None if part == stripped else part)
                if len(program) + abs(b - a) + 1 > MAX_PROGRAM_LENGTH:
                    raise ValueError(f"program {_short(text)} is longer than {MAX_PROGRAM_LENGTH} layers")
                step = 1 if b >= a else -1
                program.extend(range(a, b + step, step))
    if num_layers is not None:
        validate_program(program, num_layers)
    elif not program:
        raise ValueError("a program must contain at least one layer")
    return program


def format_program(program: Sequence[int]) -> str:
    """Compact text form: ascending runs become ranges. ``parse_program`` inverts it."""
    parts: list[str] = []
    i = 0
    while i < len(program):
        j = i
        while j + 1 < len(program) and program[j + 1] == program[j] + 1:
            j += 1
        parts.append(str(program[i]) if i == j else f"{program[i]}-{program[j]}")
        i = j + 1
    return ",".join(parts)


def _short(text: str, limit: int = 60) -> str:
    """A program's text for an error message, cut so a huge input does not flood the terminal."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _bad_layer_error(position: int, layer: int, num_layers: int) -> ValueError:
    """The error for a layer index the model does not have, at a position of the expanded program."""
    return ValueError(f"program position {position} has layer {layer}, but the model has "
                      f"{num_layers} layers (valid indices 0-{num_layers - 1})")


def _check_range(a: int, b: int, position: int, num_layers: int | None, text: str, item: str | None) -> None:
    """The range ``a-b`` (inclusive, either direction; ``a == b`` for a single index), starting at
    ``position`` of the expanded program, checked before it is expanded.

    With a depth, the error names the first bad layer and the position it takes once expanded (what
    :func:`validate_program` reports for the expanded program): ``a`` itself, else the first index
    past the end the range runs towards (``D`` rising, ``-1`` falling). Without one, both ends must
    be below :data:`MAX_NUM_LAYERS`; ``text`` and ``item`` (the range's text when the program has
    several items) name it in that message.
    """
    if num_layers is not None:
        if not 0 <= a < num_layers:
            raise _bad_layer_error(position, a, num_layers)
        if not 0 <= b < num_layers:
            bad = num_layers if b > a else -1
            raise _bad_layer_error(position + abs(bad - a), bad, num_layers)
        return
    for layer in (a, b):
        if not 0 <= layer < MAX_NUM_LAYERS:
            where = f"program {_short(text)}" + ("" if item is None else f", item {item[:30]!r}")
            raise ValueError(f"{where}: layer {layer} is beyond any model (at most {MAX_NUM_LAYERS} layers)")


def _as_index(value: object, position: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"program position {position} holds {value!r}, not a layer index")
    return value


def validate_program(program: Sequence[int], num_layers: int) -> Program:
    """Raise ``ValueError`` naming the first bad entry; return the program as a list."""
    if len(program) == 0:
        raise ValueError("a program must contain at least one layer")
    for position, layer in enumerate(program):
        _as_index(layer, position)
        if not 0 <= layer < num_layers:
            raise _bad_layer_error(position, layer, num_layers)
    return list(program)


# --------------------------------------------------------------------------- segmentation form


def segments_to_path(segments: Iterable[Segment | tuple[int, int, int]]) -> Program:
    """Expand segments into the layer list they execute."""
    path: Program = []
    for start, size, op in segments:
        block = list(range(start, start + size))
        path.extend(block * op)
    return path


def path_to_segments(path: Sequence[int], num_layers: int) -> list[Segment] | None:
    """Parse a path into segments of 1-4 layers covering ``[0, num_layers)``, or ``None``.

    Among all exact parses the preferred one has, in order: fewest segments, fewest skip segments,
    most repeat segments, and then the sequence of segment sizes largest-first (lexicographically).
    Paths with no exact parse (a layer three times, a loop that is not a contiguous block,
    out-of-order layers, indices out of range) return ``None``.
    """
    if num_layers > MAX_NUM_LAYERS:
        raise ValueError(f"{num_layers} layers is beyond any model (at most {MAX_NUM_LAYERS})")
    key = tuple(path)
    if any(not 0 <= x < num_layers for x in key):
        return None
    best = _parse(key, num_layers)
    return None if best is None else list(best)


def _moves(path: tuple[int, ...], num_layers: int, i: int, j: int) -> list[tuple[int, int, int]]:
    """Segments that may start at layer ``i`` with ``path[j:]`` left to produce and can still
    finish, in the fixed order that breaks ties: ``(size, op, next_j)`` for sizes 1-4, ops skip,
    keep, repeat. A segment that leaves ``path[next_j]`` below its end cannot finish: every later
    segment emits layers at or above it."""
    n = len(path)
    run = 0  # how far path[j:] counts up from i (a keep of up to ``run`` layers matches)
    while run < MAX_SEGMENT_SIZE and j + run < n and path[j + run] == i + run:
        run += 1
    out = []
    for size in range(1, min(MAX_SEGMENT_SIZE, num_layers - i) + 1):
        end = i + size
        if j == n or path[j] >= end:
            out.append((size, SKIP, j))
        if size <= run:
            nj = j + size
            if nj == n or path[nj] >= end:
                out.append((size, KEEP, nj))
            if path[nj:nj + size] == path[j:nj] and (nj + size == n or path[nj + size] >= end):
                out.append((size, REPEAT, nj + size))
    return out


@lru_cache(maxsize=65536)
def _parse(path: tuple[int, ...], num_layers: int) -> tuple[Segment, ...] | None:
    """Dynamic program over states (layer position ``i``, path position ``j``), solved from the back.

    The cost of a parse is ``(segments, skips, -repeats, (-size, ...))``; the first three add up
    and the last concatenates, so the best parse of a suffix is part of the best parse overall.
    Suffix parses are kept as linked pairs ``(head, rest)`` so extending one costs O(1).

    Only the states that the front of the path can reach, and that can still finish, are solved
    (see :func:`_moves`): a search-sized path costs a few dozen states instead of ``D * len(path)``.
    A layer that occurs three times cannot be emitted by one segment, so such a path has no parse.
    """
    n = len(path)
    counts: dict[int, int] = {}
    for layer in path:
        counts[layer] = counts.get(layer, 0) + 1
        if counts[layer] > MAX_LAYER_USES:
            return None
    # forward: the states reachable from (0, 0), by layer position, with their moves
    reachable: list[dict[int, list[tuple[int, int, int]]]] = [{} for _ in range(num_layers + 1)]
    reachable[0][0] = []
    for i in range(num_layers):
        for j in reachable[i]:
            moves = reachable[i][j] = _moves(path, num_layers, i, j)
            for size, _op, nj in moves:
                reachable[i + size].setdefault(nj, [])
    if n not in reachable[num_layers]:
        return None
    # backward: best[(i, j)] = ((segments, skips, -repeats), sizes, parse) for layers [i, D)
    # producing path[j:]; sizes = (-size, rest) and parse = (start, size, op, rest), linked
    best: dict[tuple[int, int], tuple] = {(num_layers, n): ((0, 0, 0), None, None)}
    for i in range(num_layers - 1, -1, -1):
        for j, moves in reachable[i].items():
            candidate = None
            for size, op, nj in moves:
                rest = best.get((i + size, nj))
                if rest is None:
                    continue
                (segs, skips, neg_reps), sizes, parse = rest
                cost = (segs + 1, skips + (op == SKIP), neg_reps - (op == REPEAT))
                new = (cost, (-size, sizes), (i, size, op, parse))
                if candidate is None or _cheaper(new, candidate):
                    candidate = new
            if candidate is not None:
                best[(i, j)] = candidate
    found = best.get((0, 0))
    if found is None:
        return None
    segments, link = [], found[2]
    while link is not None:
        segments.append(Segment(*link[:3]))
        link = link[3]
    return tuple(segments)


def _cheaper(a: tuple, b: tuple) -> bool:
    """``a`` costs less than ``b``: by (segments, skips, -repeats), then by the sizes read front
    to back (equal counts mean equally long size lists)."""
    if a[0] != b[0]:
        return a[0] < b[0]
    x, y = a[1], b[1]
    while x is not None and y is not None:
        if x[0] != y[0]:
            return x[0] < y[0]
        x, y = x[1], y[1]
    return False


def segment_targets(segments: Sequence[Segment], num_layers: int) -> tuple[list[float], list[int]]:
    """Training targets of one parse: segment-start flags and op labels, one entry per layer.

    ``starts[i] = 1`` where a segment begins (``starts[0]`` is always 1 and is not trained on);
    ``ops[i]`` is that segment's op, and :data:`IGNORE_INDEX` at layers inside a segment.
    """
    starts = [0.0] * num_layers
    ops = [IGNORE_INDEX] * num_layers
    for start, _size, op in segments:
        starts[start] = 1.0
        ops[start] = op
    return starts, ops


def segments_from_starts(starts: Sequence[bool], ops: Sequence[int]) -> list[Segment]:
    """Rebuild segments from per-layer start flags and ops; layer 0 always starts one and any
    run longer than :data:`MAX_SEGMENT_SIZE` is split. ``ops`` is read at segment starts."""
    num_layers = len(starts)
    begins = [i for i in range(num_layers) if i == 0 or starts[i]]
    segments: list[Segment] = []
    for k, begin in enumerate(begins):
        end = begins[k + 1] if k + 1 < len(begins) else num_layers
        for sub in range(begin, end, MAX_SEGMENT_SIZE):
            op = int(ops[sub]) if ops[sub] in (SKIP, KEEP, REPEAT) else int(ops[begin])
            segments.append(Segment(sub, min(MAX_SEGMENT_SIZE, end - sub), op))
    return segments


def count_changes(program: Sequence[int], num_layers: int) -> tuple[list[int], list[int]]:
    """Per layer: how many times it is skipped (0/1) and how many extra times it runs."""
    counts = [0] * num_layers
    for layer in program:
        counts[layer] += 1
    skipped = [1 if c == 0 else 0 for c in counts]
    repeated = [max(0, c - 1) for c in counts]
    return skipped, repeated
