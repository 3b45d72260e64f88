"""Prompt prefill for a batch whose rows run different programs (used by both engines).

Prefill is compute-bound, so it is organised to compute as little as possible:

* **Length groups.** Rows are processed in groups of similar prompt length
  (:func:`polar.schedule.plan_groups`), each padded only to its own longest prompt: one long
  prompt no longer makes every row of the batch pay for its length.
* **Full-depth prefixes from the prompt cache.** With a :class:`polar.prompt_cache.PromptCache`, a
  row whose program starts with the full-depth program's first ``p`` positions copies their KV and
  starts from the cached hidden state after layer ``p - 1``; a prompt seen for the first time is
  first run at full depth once, recording those states.
* **Shared first pass.** Rows with the same prompt and the same cached start hold identical states
  until their programs diverge; each step computes one representative per such group and copies
  its result and KV to the others (the programs of one question in one batch, e.g. evaluation's
  top-k programs, share their first layers).
* **No host stalls.** The index tensors of a length group are planned on the host and moved to the
  device in a few batched copies before its layers run, so the host never waits for the device
  inside the layer loop.
* **No per-shape attention plans.** Every step of every length group has its own (rows, width)
  shape; cuDNN's fused attention builds an execution plan per new shape (tens of milliseconds
  each, hundreds per search round at first), so prefill uses the memory-efficient and flash
  kernels (:func:`attention_backends`).

Whatever the KV goes into (the generic engine's per-step cache, the CUDA decoder's slots) is a
:class:`KVSink`: prompt columns are right-aligned at column ``width`` (the batch's longest prompt),
as with left padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from polar.prompt_cache import Entry, PromptCache
from polar.schedule import Step, identity_prefix, index_tensors, plan_groups

if TYPE_CHECKING:  # pragma: no cover
    from polar.engine import ProgramRunner

#: Prompt lengths are grouped in multiples of this many tokens.
GROUP_UNIT = 16


class KVSink(Protocol):
    """Receives prefill KV: ``key``/``value`` ``[n, Hkv, w, d]`` for the step's rows at positions
    ``members`` (indices into ``Step.members``), at columns ``offset .. offset + w``."""

    def store(self, step: int, members: torch.Tensor, key: torch.Tensor, value: torch.Tensor, offset: int) -> None: ...


class NullSink:
    """A sink that keeps nothing (logits without a cache)."""

    def store(self, step: int, members: torch.Tensor, key: torch.Tensor, value: torch.Tensor, offset: int) -> None:
        return None


class _SinkWriter:
    """The cache object a layer sees during prefill: k/v go to the sink (expanded to every row the
    representatives stand for); attention uses only the k/v just computed (an empty past)."""

    def __init__(self, sink: KVSink, step: int, members: torch.Tensor, expand: torch.Tensor | None, offset: int):
        self.sink, self.step, self.members, self.expand, self.offset = sink, step, members, expand, offset

    def update(self, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any):
        if self.expand is None:
            self.sink.store(self.step, self.members, key, value, self.offset)
        else:
            self.sink.store(self.step, self.members, key[self.expand], value[self.expand], self.offset)
        return key, value

    def get_seq_length(self, *args: Any) -> int:
        return 0


class _Recorder:
    """Cache object of a full-depth recording pass: k/v of layer ``layer`` go into the cache's pools."""

    def __init__(self, targets: list[tuple[Any, torch.Tensor, torch.Tensor]], layer: int, width: int):
        self.targets, self.layer, self.width = targets, layer, width

    def update(self, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any):
        for pool, local, slots in self.targets:
            w = min(self.width, pool.width)
            pool.keys[self.layer, :, :, pool.width - w:].index_copy_(0, slots, key[local][:, :, -w:])
            pool.values[self.layer, :, :, pool.width - w:].index_copy_(0, slots, value[local][:, :, -w:])
        return key, value

    def get_seq_length(self, *args: Any) -> int:
        return 0


@dataclass
class _StepWork:
    """What one step does for one length group (host plan; device indices filled in later)."""

    step: int
    compute_local: list[int] = field(default_factory=list)  # group-local rows that run the layer
    compute_members: list[int] = field(default_factory=list)  # their positions in Step.members
    reps: list[int] | None = None  # group-local representatives, when rows share states
    expand: list[int] | None = None  # per computing row: index into reps
    cached: list[tuple[Any, list[int], list[int]]] = field(default_factory=list)  # (pool, members, slots)
    tensors: dict[str, Any] = field(default_factory=dict)


class _ShareTracker:
    """Which rows still hold identical states: same prompt, same cached start, same steps so far."""

    def __init__(self, ids: list[int]):
        self.ids = list(ids)
        self._intern: dict[tuple[int, int], int] = {}

    def advance(self, rows: list[int], step: int) -> tuple[list[int], list[int]]:
        first: dict[int, int] = {}
        reps: list[int] = []
        expand: list[int] = []
        for r in rows:
            group = self.ids[r]
            if group not in first:
                first[group] = len(reps)
                reps.append(r)
            expand.append(first[group])
        for r in rows:
            self.ids[r] = self._intern.setdefault((self.ids[r], step), len(self._intern) + len(self.ids))
        return reps, expand


def attention_backends():
    """A context that keeps SDPA off cuDNN's per-shape-planned kernel during prefill."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH])


def _call_layer(runner: "ProgramRunner", layer: int, h, mask, pos, pe, cache) -> torch.Tensor:
    out = runner._layers[layer](h, attention_mask=mask, position_ids=pos, position_embeddings=pe,
                                **{runner._cache_kwarg: cache}, use_cache=True)
    return out[0] if isinstance(out, tuple) else out


def _group_inputs(runner: "ProgramRunner", tokens: list[list[int]]):
    """Left-padded ids, masks per window, positions and rotary angles of one length group."""
    ids, valid = runner._pad_left(tokens)
    positions = runner._positions(valid)
    hidden = runner._backbone.embed_tokens(ids)
    masks = runner._attention_masks(valid, ids.shape[1])
    cos, sin = runner._backbone.rotary_emb(hidden, positions)
    return hidden, masks, positions, (cos, sin)


def _group_cost(runner: "ProgramRunner") -> tuple[float, float]:
    """(cost of one padded row-token, fixed cost of one more group) for :func:`plan_groups`, in
    row-tokens: a group costs about one pass of launches over the schedule, worth a few thousand
    row-tokens of compute on a GPU and little on a CPU (``runner.prefill_group_tokens``)."""
    fixed = runner.prefill_group_tokens
    if fixed is None:
        fixed = 4096 if runner.device.type == "cuda" else 64
    return 1.0, float(fixed)


def record_full_depth(runner: "ProgramRunner", cache: PromptCache, tokens: list[list[int]], entries: list[Entry]) -> None:
    """Run prompts at full depth, storing every layer's KV and every boundary's hidden state."""
    cell, fixed = _group_cost(runner)
    for group in plan_groups([len(t) for t in tokens], GROUP_UNIT, cell, fixed, max_cells=runner.prefill_max_tokens):
        with attention_backends():
            _record_group(runner, tokens, entries, group)
    for t in tokens:
        cache.mark_ready(tuple(t))


def _record_group(runner: "ProgramRunner", tokens: list[list[int]], entries: list[Entry], group: list[int]) -> None:
    """One length group of :func:`record_full_depth`."""
    hidden, masks, positions, pe = _group_inputs(runner, [tokens[i] for i in group])
    width = hidden.shape[1]
    by_pool: dict[int, tuple[Any, list[int], list[int]]] = {}
    for local, i in enumerate(group):
        pool, slot = entries[i].pool, entries[i].slot
        by_pool.setdefault(id(pool), (pool, [], []))[1].append(local)
        by_pool[id(pool)][2].append(slot)
    lists = [x for pool, local, slots in by_pool.values() for x in (local, slots)]
    moved = index_tensors(lists, runner.device)
    targets = [(pool, moved[2 * k], moved[2 * k + 1]) for k, (pool, _, _) in enumerate(by_pool.values())]

    def keep(boundary: int, h: torch.Tensor) -> None:
        for pool, local, slots in targets:
            w = min(width, pool.width)
            pool.hidden[boundary, :, pool.width - w:].index_copy_(0, slots, h[local][:, -w:])

    keep(0, hidden)
    for layer in range(runner.num_layers):
        mask = masks[runner._sliding.get(layer)]
        hidden = _call_layer(runner, layer, hidden, mask, positions, pe, _Recorder(targets, layer, width))
        keep(layer + 1, hidden)


def cached_entries(runner: "ProgramRunner", cache: PromptCache, token_lists: Sequence[Sequence[int]]) -> list[Entry | None]:
    """Each row's prompt-cache entry, computing the prompts not yet cached (None: no room)."""
    keys = [tuple(t) for t in token_lists]
    distinct = list(dict.fromkeys(keys))
    cache.begin_batch()
    todo: list[tuple[int, ...]] = []
    for key in distinct:
        if cache.lookup(key) is None and cache.reserve(key, pinned=distinct) is not None:
            todo.append(key)
    found = {key: cache.get(key) for key in distinct}
    if todo:
        record_full_depth(runner, cache, [list(k) for k in todo], [found[k] for k in todo])  # type: ignore[misc]
    return [found[k] for k in keys]


def prefill(
    runner: "ProgramRunner",
    token_lists: Sequence[Sequence[int]],
    programs: Sequence[Sequence[int]],
    steps: Sequence[Step],
    sink: KVSink,
    cache: PromptCache | None = None,
    keep_all: bool = False,
) -> torch.Tensor:
    """Prefill every row's prompt under its program; KV goes to ``sink``. Returns the hidden state
    of each row's last prompt token after its whole program, ``[B, 1, H]`` (before the final norm),
    or with ``keep_all`` every token's, ``[B, W, H]`` right-aligned (W: the longest prompt)."""
    batch = len(token_lists)
    lengths = [len(t) for t in token_lists]
    width = max(lengths)
    entries: list[Entry | None] = [None] * batch
    if cache is not None:
        entries = cached_entries(runner, cache, token_lists)
    starts = [identity_prefix(p) if e is not None else 0 for p, e in zip(programs, entries)]
    prompt_ids = {key: k for k, key in enumerate(dict.fromkeys(tuple(t) for t in token_lists))}
    cell, fixed = _group_cost(runner)
    groups = plan_groups(lengths, GROUP_UNIT, cell, fixed, max_cells=runner.prefill_max_tokens)
    hidden_size = runner._backbone.embed_tokens.weight.shape[1]
    last = torch.zeros(batch, width if keep_all else 1, hidden_size, device=runner.device, dtype=runner.dtype)
    with attention_backends():
        for group in groups:
            _prefill_group(runner, sorted(group), token_lists, steps, sink, width, entries, starts, prompt_ids, last)
    return last


def _plan_group(
    group: list[int], steps: Sequence[Step], entries: list[Entry | None], starts: list[int],
    share_ids: list[int],
) -> list[_StepWork]:
    """Host plan of one length group: per step, which rows compute and which copy cached KV."""
    local_of = {r: k for k, r in enumerate(group)}
    tracker = _ShareTracker(share_ids)
    work: list[_StepWork] = []
    for s, step in enumerate(steps):
        item = _StepWork(s)
        cached: dict[int, tuple[Any, list[int], list[int]]] = {}
        for j, (r, position) in enumerate(zip(step.members, step.positions)):
            local = local_of.get(r)
            if local is None:
                continue
            if position < starts[r]:
                entry = entries[r]
                slot = cached.setdefault(id(entry.pool), (entry.pool, [], []))
                slot[1].append(j)
                slot[2].append(entry.slot)
            else:
                item.compute_local.append(local)
                item.compute_members.append(j)
        item.cached = list(cached.values())
        if item.compute_local:
            reps, expand = tracker.advance(item.compute_local, s)
            if len(reps) < len(item.compute_local):
                item.reps, item.expand = reps, expand
        if item.compute_local or item.cached:
            work.append(item)
    return work


def _upload(work: list[_StepWork], device: torch.device) -> None:
    """Move every index list of the plan to the device in one copy."""
    lists: list[list[int]] = []
    names: list[tuple[_StepWork, str]] = []
    for item in work:
        for name, values in (("local", item.compute_local), ("members", item.compute_members),
                             ("reps", item.reps), ("expand", item.expand)):
            if values is not None and values:
                lists.append(values)
                names.append((item, name))
        for k, (_, members, slots) in enumerate(item.cached):
            lists += [members, slots]
            names += [(item, f"cached_members{k}"), (item, f"cached_slots{k}")]
    for (item, name), tensor in zip(names, index_tensors(lists, device)):
        item.tensors[name] = tensor


def _prefill_group(
    runner: "ProgramRunner", group: list[int], token_lists: Sequence[Sequence[int]], steps: Sequence[Step],
    sink: KVSink, width: int, entries: list[Entry | None], starts: list[int], prompt_ids: dict,
    last: torch.Tensor,
) -> None:
    interned: dict[tuple[int, int], int] = {}  # rows with one prompt and one cached start share states
    share_ids = [interned.setdefault((prompt_ids[tuple(token_lists[r])], starts[r]), len(interned)) for r in group]
    work = _plan_group(group, steps, entries, starts, share_ids)
    # rows that start from a cached boundary: (pool -> group-local rows, flat hidden indices)
    start_lists: dict[int, tuple[Any, list[int], list[int]]] = {}
    for local, r in enumerate(group):
        entry = entries[r]
        if entry is not None and starts[r] > 0:
            item = start_lists.setdefault(id(entry.pool), (entry.pool, [], []))
            item[1].append(local)
            item[2].append(starts[r] * entry.pool.capacity + entry.slot)
    start_pools = list(start_lists.values())
    moved = index_tensors([x for _, local, flat in start_pools for x in (local, flat)], runner.device)
    _upload(work, runner.device)

    hidden, masks, positions, pe = _group_inputs(runner, [list(token_lists[r]) for r in group])
    group_width = hidden.shape[1]
    for k, (pool, _, _) in enumerate(start_pools):
        w = min(group_width, pool.width)
        flat = pool.hidden.view(-1, pool.width, pool.hidden.shape[-1])
        states = flat.index_select(0, moved[2 * k + 1])[:, pool.width - w:]
        hidden[:, group_width - w:].index_copy_(0, moved[2 * k], states)
    n = len(group)
    for item in work:
        step = steps[item.step]
        for k, (pool, _, _) in enumerate(item.cached):
            w = min(group_width, pool.width)
            slots = item.tensors[f"cached_slots{k}"] + step.layer * pool.capacity
            kv_shape = (-1, *pool.keys.shape[2:])
            key = pool.keys.view(kv_shape).index_select(0, slots)[:, :, pool.width - w:]
            value = pool.values.view(kv_shape).index_select(0, slots)[:, :, pool.width - w:]
            sink.store(item.step, item.tensors[f"cached_members{k}"], key, value, width - w)
        if not item.compute_local:
            continue
        whole = item.reps is None and len(item.compute_local) == n  # group-local rows ascend: all of them
        rows = None if whole else item.tensors["reps" if item.reps is not None else "local"]
        mask = masks[runner._sliding.get(step.layer)]
        if rows is None:
            h, m, pos, rope = hidden, mask, positions, pe
        else:
            h, m, pos, rope = hidden[rows], mask[rows], positions[rows], (pe[0][rows], pe[1][rows])
        expand = item.tensors.get("expand")
        writer = _SinkWriter(sink, item.step, item.tensors["members"], expand, width - group_width)
        out = _call_layer(runner, step.layer, h, m, pos, rope, writer)
        if expand is not None:
            out = out[expand]
        if rows is None:
            hidden = out
        else:
            hidden.index_copy_(0, item.tensors["local"], out)
    rows_of_group = index_tensors([group], runner.device)[0]
    if last.shape[1] == 1:
        last.index_copy_(0, rows_of_group, hidden[:, -1:])
    else:
        last[:, last.shape[1] - group_width:].index_copy_(0, rows_of_group, hidden)
