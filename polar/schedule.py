"""Merging a batch's programs into one schedule of shared layer steps.

A batch holds rows with different programs. We merge them into one *schedule*: a list of steps
``(layer, rows)``; every row whose next program position is that step's layer takes part, so the
weights of each step are read once for all its rows. Any layer sequence that contains every row's
program as a subsequence (a *common supersequence*) is a valid schedule, and decode time is
roughly proportional to its length (a decode step is memory-bound: a step serving one row costs
nearly as much as one serving all). Finding the shortest is NP-hard, so :func:`build_schedule`
takes the shortest of three heuristics:

* *greedy-min* (always run the smallest pending layer: one sweep over ``0..D-1`` plus one extra
  step per repeated layer), optimal when the rows' repeats don't overlap;
* *sweeps* (:func:`sweep_order`): repeated ascending sweeps over ``0..D-1``, a row moving to the
  next sweep at each of its descents, keeping only the (sweep, layer) steps some row uses. Linear
  time, and its length depends on the most descents of any row, not on the number of rows: 1024
  MCTS-like programs of 28 layers take ~130 steps where greedy-min takes ~250;
* a *beam search* over merge states keeping the states with the smallest lower bound (longest
  remaining program, then total remaining work), for batches of at most :data:`BEAM_MAX_ROWS`
  rows (its cost grows with rows x layers x states: seconds at 1024 rows). It lets a row wait for
  others that will need the same layer soon; on 64 programs it finds ~70-100 steps.

Each row's k-th program position maps to one fixed step for the whole generation, so KV caches
are indexed by *step*: every program position owns its state, and memory equals the unrolled
model's. Schedules are built on the host (the rows are plain index lists); the engines move all
of a schedule's index tensors to the device in one copy (:func:`rows_on_device`), because a
small host-to-device copy per step would stall the device queue once per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Step:
    """One layer run for a set of rows, in ascending row order. ``positions[i]`` is the program
    position that ``members[i]`` executes in this step."""

    layer: int
    rows: torch.Tensor  # long, indices into the batch (host tensor unless moved)
    all_rows: bool  # rows == arange(batch): no gather/scatter needed
    members: tuple[int, ...] = ()  # the same rows, on the host
    positions: tuple[int, ...] = ()


#: Beam width of the schedule search: ~50 ms of CPU for 64 rows of ~30 layers, small next to the
#: decode time it saves (each step removed saves one layer per generated token).
SCHEDULE_BEAM = 64

#: Above this many rows the beam search costs more host time than it saves (its state arrays are
#: states x layers x rows); the sweep and greedy-min heuristics remain.
BEAM_MAX_ROWS = 128

#: Above this many rows greedy-min (steps x rows of host work) is skipped: sweeps beat it there.
GREEDY_MAX_ROWS = 256


def greedy_min_order(programs: Sequence[Sequence[int]]) -> list[int]:
    """Layer order that always runs the smallest pending layer."""
    cursors = [0] * len(programs)
    order: list[int] = []
    while True:
        pending = [p[c] for p, c in zip(programs, cursors) if c < len(p)]
        if not pending:
            return order
        layer = min(pending)
        order.append(layer)
        for r, p in enumerate(programs):
            if cursors[r] < len(p) and p[cursors[r]] == layer:
                cursors[r] += 1


def sweep_order(programs: Sequence[Sequence[int]]) -> list[int]:
    """Layer order made of ascending sweeps (see module docstring): each row's position goes to
    sweep ``k`` (its number of descents so far) at its layer; steps are the used (sweep, layer)
    pairs in order, so every row's program is a subsequence."""
    used: set[tuple[int, int]] = set()
    for program in programs:
        sweep, last = 0, -1
        for layer in program:
            if layer <= last:
                sweep += 1
            used.add((sweep, layer))
            last = layer
    return [layer for _, layer in sorted(used)]


def beam_order(programs: Sequence[Sequence[int]], width: int) -> list[int]:
    """Common supersequence of ``programs`` by beam search over cursor vectors.

    A state is every row's cursor; a move runs one layer for all rows whose next layer it is.
    States are ranked by a lower bound on the steps still needed (the longest remaining program),
    then by total remaining work; duplicates (reached by different orders) are merged by a hash
    of the cursors. Vectorised over states x layers x rows so that 64 rows take tens of ms.
    """
    import numpy as np

    rows = len(programs)
    lengths, table = _program_table(programs)
    depth = max(max(p) for p in programs) + 1
    salt = np.random.default_rng(0).integers(1, 1 << 62, rows)
    cursors = np.zeros((1, rows), dtype=np.int64)
    history: list[tuple[np.ndarray, np.ndarray]] = []
    row_index, layers = np.arange(rows)[None, :], np.arange(depth)[None, :, None]
    while True:
        remaining = lengths[None, :] - cursors
        bound = remaining.max(1)
        if bound.min() == 0:
            state, order = int(np.argmin(bound)), []
            for parent, layer in reversed(history):
                order.append(int(layer[state]))
                state = int(parent[state])
            return order[::-1]
        moves = table[row_index, cursors][:, None, :] == layers  # [states, layers, rows]
        state_idx, layer_idx = np.nonzero(moves.any(-1))
        advance = moves[state_idx, layer_idx]
        left = remaining[state_idx] - advance
        rank = left.max(1) * (1 << 32) + left.sum(1)
        digest = ((cursors[state_idx] + advance) * salt).sum(1)
        ranked = np.lexsort((digest, rank))
        fresh = np.ones(len(ranked), dtype=bool)
        fresh[1:] = digest[ranked][1:] != digest[ranked][:-1]
        keep = ranked[fresh][:width]
        cursors = cursors[state_idx[keep]] + advance[keep]
        history.append((state_idx[keep], layer_idx[keep]))


def build_schedule(programs: Sequence[Sequence[int]], device: torch.device | str = "cpu") -> list[Step]:
    """Merge per-row programs into shared steps (see module docstring).

    Every row advances by one program position in each step it takes part in, so the steps a
    row takes part in, read in order, are exactly its program.
    """
    import numpy as np

    programs = [list(p) for p in programs]
    order = sweep_order(programs)
    if len(programs) <= GREEDY_MAX_ROWS:
        order = min(order, greedy_min_order(programs), key=len)
    distinct = {tuple(p) for p in programs}
    if 1 < len(distinct) and len(programs) <= BEAM_MAX_ROWS and len(order) > max(len(p) for p in programs):
        beam = beam_order(programs, SCHEDULE_BEAM)
        if len(beam) < len(order):
            order = beam
    batch = len(programs)
    _, table = _program_table(programs)
    cursors = np.zeros(batch, dtype=np.int64)
    merged: list[tuple[int, tuple[int, ...], tuple[int, ...]]] = []  # (layer, members, positions)
    every = np.arange(batch)
    for layer in order:
        rows = np.nonzero(table[every, cursors] == layer)[0]
        merged.append((layer, tuple(rows.tolist()), tuple(cursors[rows].tolist())))
        cursors[rows] += 1
    moved = index_tensors([members for _, members, _ in merged], device)
    return [Step(layer, rows, len(members) == batch, members, positions)
            for (layer, members, positions), rows in zip(merged, moved)]


def _program_table(programs: Sequence[Sequence[int]]) -> tuple[Any, Any]:
    """(lengths, table) as numpy arrays: row r holds program r, then -1 past its end (at least one
    -1 per row, so a cursor at the end reads "no layer")."""
    import numpy as np

    lengths = np.array([len(p) for p in programs], dtype=np.int64)
    table = np.full((len(programs), int(lengths.max()) + 1), -1, dtype=np.int64)
    for r, p in enumerate(programs):
        table[r, : len(p)] = p
    return lengths, table


def rows_on_device(steps: list[Step], device: torch.device | str) -> list[Step]:
    """The same steps with their row tensors on ``device``, moved in ONE host-to-device copy."""
    moved = index_tensors([s.members for s in steps], device)
    return [Step(s.layer, rows, s.all_rows, s.members, s.positions) for s, rows in zip(steps, moved)]


def index_tensors(lists: Sequence[Sequence[int]], device: torch.device | str) -> list[torch.Tensor]:
    """Long tensors of ``lists`` on ``device`` in ONE (asynchronous, pinned) host-to-device copy.

    A separate small copy per list would make the host wait for the device queue each time."""
    device = torch.device(device)
    sizes = [len(x) for x in lists]
    flat = torch.tensor([i for x in lists for i in x], dtype=torch.long)
    if device.type == "cuda":
        flat = flat.pin_memory().to(device, non_blocking=True)
    elif device.type != "cpu":
        flat = flat.to(device)
    return list(flat.split(sizes))


def plan_groups(
    lengths: Sequence[int], unit: int, cell_cost: float, group_cost: float,
    extra: int = 0, max_rows: int | None = None, max_cells: int | None = None,
) -> list[list[int]]:
    """Split rows into groups of similar length, each padded to its own longest row.

    Minimises ``sum over groups of rows * (padded width + extra) * cell_cost + group_cost``:
    padding wastes compute (prefill) or attention reads (decode), while every group pays a fixed
    cost (one more pass over the layers' weights, more launches). A dynamic programme over the
    lengths rounded up to ``unit``; a group is then split into equal parts if it has more than
    ``max_rows`` rows or ``max_cells`` (rows * width). Returns lists of row indices, each sorted by
    length.
    """
    if not lengths:
        return []
    order = sorted(range(len(lengths)), key=lambda r: (lengths[r], r))
    bins: list[int] = []  # distinct rounded widths, ascending
    counts: list[int] = []
    for r in order:
        width = -(-max(lengths[r], 1) // unit) * unit
        if bins and bins[-1] == width:
            counts[-1] += 1
        else:
            bins.append(width)
            counts.append(1)
    best = [0.0] + [float("inf")] * len(bins)
    cut = [0] * (len(bins) + 1)
    for j in range(1, len(bins) + 1):
        rows = 0
        for i in range(j, 0, -1):  # group = bins i..j (1-based)
            rows += counts[i - 1]
            cost = best[i - 1] + rows * (bins[j - 1] + extra) * cell_cost + group_cost
            if cost < best[j]:
                best[j], cut[j] = cost, i - 1
    spans, j = [], len(bins)
    while j > 0:
        spans.append((cut[j], j))
        j = cut[j]
    groups: list[list[int]] = []
    start = 0
    sizes = [sum(counts[a:b]) for a, b in reversed(spans)]
    for (a, b), size in zip(reversed(spans), sizes):
        members = order[start:start + size]
        start += size
        width = max(lengths[r] for r in members)
        limit = len(members) if max_cells is None else max(1, max_cells // max(width, 1))
        if max_rows is not None:
            limit = min(limit, max_rows)
        parts = -(-len(members) // limit)  # as even as the row limit allows
        step = -(-len(members) // parts)
        groups.extend(members[k:k + step] for k in range(0, len(members), step))
    return groups


def identity_prefix(program: Sequence[int]) -> int:
    """How many leading positions of ``program`` are the full-depth program's (``0, 1, 2, ...``):
    those positions compute exactly what the full-depth model computes on the same prompt."""
    n = 0
    for position, layer in enumerate(program):
        if layer != position:
            break
        n += 1
    return n
