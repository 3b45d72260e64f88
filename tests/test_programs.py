"""Programs: text form, validation, and the segmentation form the predictor learns."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from polar.programs import (
    IGNORE_INDEX,
    KEEP,
    REPEAT,
    SKIP,
    Segment,
    format_program,
    parse_program,
    path_to_segments,
    segment_targets,
    segments_from_starts,
    segments_to_path,
    validate_program,
)


def test_text_form_round_trips():
    assert parse_program("0-11,11,12-27") == list(range(12)) + [11] + list(range(12, 28))
    assert parse_program("full", 5) == [0, 1, 2, 3, 4]
    assert parse_program("[3, 1, 2]") == [3, 1, 2]
    assert parse_program("5-3") == [5, 4, 3]
    program = [0, 1, 2, 2, 3, 7, 9, 10]
    assert format_program(program) == "0-2,2-3,7,9-10"
    assert parse_program(format_program(program)) == program


@pytest.mark.parametrize(
    "text, message",
    [
        ("0-3,x", "'x' is not a layer index"),
        ("0,,1", "empty item"),
        ("[1, true]", "position 1 holds True"),
        ("[1, 2", "not a valid JSON list"),
        ("full", "needs the model depth"),
    ],
)
def test_bad_text_names_the_problem(text, message):
    with pytest.raises(ValueError, match=message):
        parse_program(text)


def test_validation_names_the_bad_index():
    with pytest.raises(ValueError, match="position 3 has layer 30, but the model has 30 layers"):
        validate_program([0, 1, 2, 30], 30)
    with pytest.raises(ValueError, match="position 0 has layer -1"):
        validate_program([-1], 30)
    with pytest.raises(ValueError, match="at least one layer"):
        validate_program([], 30)


def test_full_depth_parses_into_fewest_segments_largest_first():
    # 10 layers of "keep": fewest segments is 3 (4+4+2), sizes largest-first -> (4, 4, 2)
    assert path_to_segments(list(range(10)), 10) == [
        Segment(0, 4, KEEP), Segment(4, 4, KEEP), Segment(8, 2, KEEP)
    ]


def test_hand_worked_skip_and_repeat():
    # D = 6: skip layer 2, repeat layer 4 -> [0, 1, 3, 4, 4, 5]
    # segments must split at 2 (skip) and isolate 4 (repeat): (0,2,keep) (2,1,skip) (3,1,keep)
    # (4,1,repeat) (5,1,keep) = 5 segments; no parse with fewer exists.
    segments = path_to_segments([0, 1, 3, 4, 4, 5], 6)
    assert segments == [
        Segment(0, 2, KEEP), Segment(2, 1, SKIP), Segment(3, 1, KEEP), Segment(4, 1, REPEAT), Segment(5, 1, KEEP)
    ]


def test_tie_break_prefers_fewer_skips_then_more_repeats():
    # [0,1,0,1] over D=2: one segment (0,2,repeat) beats (0,1,..)+(1,1,..) parses
    assert path_to_segments([0, 1, 0, 1], 2) == [Segment(0, 2, REPEAT)]
    # skipping everything of D=8 except layer 0: (0,1,keep) then 7 skipped layers in 2 segments
    # (4+3), larger first
    assert path_to_segments([0], 8) == [Segment(0, 1, KEEP), Segment(1, 4, SKIP), Segment(5, 3, SKIP)]


def test_block_repeat_of_size_three():
    path = [0, 1, 2, 3, 4, 2, 3, 4, 5]  # repeat block 2-4 once
    assert path_to_segments(path, 6) == [Segment(0, 2, KEEP), Segment(2, 3, REPEAT), Segment(5, 1, KEEP)]


@pytest.mark.parametrize(
    "path",
    [
        [0, 1, 1, 1, 2],  # a layer three times
        [0, 2, 1, 3],  # out of order
        [0, 1, 2, 1, 3],  # loop that is not a contiguous repeated block
        [0, 1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 6],  # block of 5 repeated: larger than a segment
        [0, 7],  # index out of range
    ],
)
def test_paths_without_exact_parse_are_rejected(path):
    assert path_to_segments(path, 7) is None


def brute_force_best(path: list[int], num_layers: int):
    """Enumerate every segmentation and op assignment; pick by the SPEC's tie-break."""
    best = None
    for cuts in itertools.product([0, 1], repeat=num_layers - 1):
        starts = [0] + [i + 1 for i, c in enumerate(cuts) if c]
        bounds = list(zip(starts, starts[1:] + [num_layers]))
        if any(b - a > 4 for a, b in bounds):
            continue
        for ops in itertools.product([SKIP, KEEP, REPEAT], repeat=len(bounds)):
            segs = [Segment(a, b - a, op) for (a, b), op in zip(bounds, ops)]
            if segments_to_path(segs) != path:
                continue
            key = (len(segs), sum(s.op == SKIP for s in segs), -sum(s.op == REPEAT for s in segs),
                   tuple(-s.size for s in segs))
            if best is None or key < best[0]:
                best = (key, segs)
    return None if best is None else best[1]


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_dynamic_program_equals_brute_force(data):
    num_layers = data.draw(st.integers(1, 7))
    ops = data.draw(st.lists(st.sampled_from([SKIP, KEEP, KEEP, REPEAT]), min_size=num_layers, max_size=num_layers))
    path = [layer for layer, op in zip(range(num_layers), ops) for _ in range(op)]
    if data.draw(st.booleans()) and path:  # sometimes perturb it into something unparseable
        path.insert(data.draw(st.integers(0, len(path))), data.draw(st.integers(0, num_layers - 1)))
    assert path_to_segments(path, num_layers) == brute_force_best(path, num_layers)


def full_table_best(path: list[int], num_layers: int):
    """Reference for deeper models than brute force reaches: the best parse of every state
    (layer i, path position j), all D x len(path) of them, by the same cost."""
    n = len(path)
    if any(not 0 <= x < num_layers for x in path):
        return None
    best: dict[tuple[int, int], tuple] = {(num_layers, n): ((0, 0, 0, ()), [])}
    for i in range(num_layers - 1, -1, -1):
        for j in range(n, -1, -1):
            found = None
            for size in range(1, min(4, num_layers - i) + 1):
                block = list(range(i, i + size))
                for op in (SKIP, KEEP, REPEAT):
                    if path[j:j + size * op] != block * op or (i + size, j + size * op) not in best:
                        continue
                    (segs, skips, reps, sizes), tail = best[(i + size, j + size * op)]
                    key = (segs + 1, skips + (op == SKIP), reps - (op == REPEAT), (-size, *sizes))
                    if found is None or key < found[0]:
                        found = (key, [Segment(i, size, op), *tail])
            if found is not None:
                best[(i, j)] = found
    return best[(0, 0)][1] if (0, 0) in best else None


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_parse_equals_the_full_table_on_search_like_and_garbage_paths(data):
    """The parser solves only reachable states; on deep models its parses equal the full table's."""
    num_layers = data.draw(st.integers(1, 36))
    if data.draw(st.booleans()):  # garbage: random indices, some out of range
        path = data.draw(st.lists(st.integers(0, num_layers), min_size=1, max_size=2 * num_layers))
    else:  # what search writes: the full program after skips, block repeats and a stray move
        path = list(range(num_layers))
        for _ in range(data.draw(st.integers(0, 6))):
            i = data.draw(st.integers(0, max(0, len(path) - 1)))
            move = data.draw(st.sampled_from(["skip", "repeat", "swap"]))
            if move == "skip" and len(path) > 1:
                del path[i]
            elif move == "repeat":
                size = data.draw(st.integers(1, 5))
                path = path[:i + size] + path[i:i + size] + path[i + size:]
            elif path:
                j = data.draw(st.integers(0, len(path) - 1))
                path[i], path[j] = path[j], path[i]
    assert path_to_segments(path, num_layers) == full_table_best(path, num_layers)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_segments_expand_back_to_the_path(data):
    num_layers = data.draw(st.integers(1, 30))
    ops = data.draw(st.lists(st.sampled_from([SKIP, KEEP, REPEAT]), min_size=num_layers, max_size=num_layers))
    path = [layer for layer, op in zip(range(num_layers), ops) for _ in range(op)]
    segments = path_to_segments(path, num_layers)
    assert segments is not None
    assert segments_to_path(segments) == path
    assert all(1 <= s.size <= 4 for s in segments)
    assert sum(s.size for s in segments) == num_layers


def test_targets_and_their_inverse():
    segments = path_to_segments([0, 1, 3, 4, 4, 5], 6)
    starts, ops = segment_targets(segments, 6)
    assert starts == [1.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    assert ops == [KEEP, IGNORE_INDEX, SKIP, KEEP, REPEAT, KEEP]
    assert segments_from_starts([s > 0 for s in starts], ops) == segments


def test_long_runs_are_split_into_segments_of_at_most_four():
    segments = segments_from_starts([True] + [False] * 9, [KEEP] * 10)
    assert [(s.start, s.size) for s in segments] == [(0, 4), (4, 4), (8, 2)]
