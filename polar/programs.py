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
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import NamedTuple

SKIP, KEEP, REPEAT = 0, 1, 2
OP_NAMES = {SKIP: "skip", KEEP: "keep", REPEAT: "repeat"}
MAX_SEGMENT_SIZE = 4
IGNORE_INDEX = -100  # op label at layers that do not start a segment (torch CE ignore_index)

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


def parse_program(text: str | Sequence[int], num_layers: int | None = None) -> Program:
    """Parse ``"0-11,11,12-27"``, ``"[0, 1, 2]"`` or ``"full"`` into a list of layer indices.

    Ranges are inclusive and may run downwards (``"5-3"`` is ``[5, 4, 3]``). When ``num_layers`` is
    given the result is validated against it; ``"full"`` needs it.
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
                raise ValueError(f"program {text!r} is not a valid JSON list: {err.msg}") from None
            if not isinstance(items, list):
                raise ValueError(f"program {text!r} must be a JSON list of layer indices")
            program = [_as_index(x, i) for i, x in enumerate(items)]
        else:
            program = []
            for part in stripped.split(","):
                part = part.strip()
                if not part:
                    raise ValueError(f"program {text!r} has an empty item")
                lo, sep, hi = part.partition("-")
                try:
                    a = int(lo)
                    b = int(hi) if sep else a
                except ValueError:
                    raise ValueError(
                        f"program {text!r}: {part!r} is not a layer index or a range like 3-7"
                    ) from None
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
            raise ValueError(
                f"program position {position} has layer {layer}, but the model has "
                f"{num_layers} layers (valid indices 0-{num_layers - 1})"
            )
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
    key = tuple(path)
    if any(not 0 <= x < num_layers for x in key):
        return None
    best = _parse(key, num_layers)
    return None if best is None else list(best[1])


@lru_cache(maxsize=65536)
def _parse(path: tuple[int, ...], num_layers: int):
    """Dynamic program over (layer position, path position), solved from the back.

    The cost of a parse is ``(segments, skips, -repeats, (-size, ...))``; the first three add up
    and the last concatenates, so the best parse of a suffix is part of the best parse overall.
    """
    n = len(path)
    # best[i][j]: (cost, segments) for layers [i, D) producing path[j:]
    best: list[list[tuple | None]] = [[None] * (n + 1) for _ in range(num_layers + 1)]
    best[num_layers][n] = ((0, 0, 0, ()), ())
    for i in range(num_layers - 1, -1, -1):
        for j in range(n, -1, -1):
            candidate = None
            for size in range(1, min(MAX_SEGMENT_SIZE, num_layers - i) + 1):
                block = tuple(range(i, i + size))
                for op in (SKIP, KEEP, REPEAT):
                    used = size * op
                    if j + used > n or path[j : j + used] != block * op:
                        continue
                    rest = best[i + size][j + used]
                    if rest is None:
                        continue
                    (segs, skips, neg_reps, sizes), tail = rest
                    cost = (
                        segs + 1,
                        skips + (op == SKIP),
                        neg_reps - (op == REPEAT),
                        (-size, *sizes),
                    )
                    if candidate is None or cost < candidate[0]:
                        candidate = (cost, (Segment(i, size, op), *tail))
            best[i][j] = candidate
    return best[0][0]


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
