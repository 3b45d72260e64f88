"""Full-depth prompt states kept across engine calls, so programs prefill only from their first edit.

MCTS scores ~100 programs per question, one per round, and every program of a question shares the
prompt. Most programs also share a *prefix of the full-depth program*: a program that first
differs from ``0, 1, 2, ...`` at position ``p`` computes, at its first ``p`` positions, exactly what
the full-depth model computes on the same prompt (:func:`polar.schedule.identity_prefix`). So per
prompt we keep, once computed, the full-depth model's KV at every layer and its hidden state at
every layer boundary (after ``0..D`` layers), for the prompt's tokens. A program's prefill then
copies the KV of its first ``p`` positions and starts from the hidden state at boundary ``p``;
about half of a search's prefill compute goes away, and the full-depth program itself needs none.

Storage: one *pool* per width class (a power-of-two multiple of 64 tokens), holding entries
right-aligned in ``width`` columns, as the engines left-pad prompts; the tensors are
``keys/values [D, capacity, Hkv, width, d]`` and ``hidden [D + 1, capacity, width, H]``, so a
batch gathers any rows' states with one ``index_select`` per pool. Pools grow by doubling within
a byte budget; beyond it an entry idle for :data:`MAX_IDLE` or more batches is evicted, least
recently used first, and otherwise the new prompt is simply not cached (its rows prefill from
scratch). Evicting only idle entries matters for search: every round touches every question in
flight once, so plain LRU over more questions than fit would evict each entry just before its
next use and cache nothing. Results never depend on
whether a state came from here: the same layers compute the same values (up to the floating-point
effect of batch shapes on kernel choice, as for any batching).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

import torch

#: Narrowest width class, in tokens.
MIN_WIDTH = 64

#: Batches an entry must go unused before it may be evicted for a new prompt.
MAX_IDLE = 8


def width_class(length: int) -> int:
    """Smallest power-of-two multiple of :data:`MIN_WIDTH` holding ``length`` tokens."""
    width = MIN_WIDTH
    while width < length:
        width *= 2
    return width


@dataclass(eq=False)
class Pool:
    """Entries of one width class (see module docstring)."""

    width: int
    capacity: int
    keys: torch.Tensor  # [D, capacity, Hkv, width, d]
    values: torch.Tensor
    hidden: torch.Tensor  # [D + 1, capacity, width, H]
    free: list[int]


@dataclass(frozen=True)
class Entry:
    """Where one prompt's states live: slot ``slot`` of ``pool``."""

    pool: Pool
    slot: int


class PromptCache:
    """Byte-bounded store of full-depth prompt states (see module docstring)."""

    def __init__(
        self, num_layers: int, kv_heads: int, head_dim: int, hidden_size: int,
        dtype: torch.dtype, device: torch.device | str, max_bytes: int,
    ) -> None:
        self.num_layers, self.kv_heads, self.head_dim, self.hidden_size = num_layers, kv_heads, head_dim, hidden_size
        self.dtype, self.device, self.max_bytes = dtype, torch.device(device), int(max_bytes)
        self.pools: dict[int, Pool] = {}
        self._entries: OrderedDict[tuple[int, ...], Entry] = OrderedDict()  # LRU order, oldest first
        self._ready: set[tuple[int, ...]] = set()
        self._last_used: dict[tuple[int, ...], int] = {}
        self.clock = 0  # batches seen (see begin_batch)
        self.hits = self.misses = self.evictions = self.refused = 0

    # ---- sizes

    def entry_bytes(self, width: int) -> int:
        """Bytes of one entry in a pool of ``width`` columns."""
        per_column = 2 * self.num_layers * self.kv_heads * self.head_dim + (self.num_layers + 1) * self.hidden_size
        return per_column * width * torch.empty((), dtype=self.dtype).element_size()

    @property
    def bytes_allocated(self) -> int:
        return sum(p.capacity * self.entry_bytes(p.width) for p in self.pools.values())

    def __len__(self) -> int:
        return len(self._ready)

    # ---- lookup and reservation

    def begin_batch(self) -> None:
        """Count one batch (the unit of idleness for eviction)."""
        self.clock += 1

    def lookup(self, tokens: tuple[int, ...]) -> Entry | None:
        """The entry of a prompt whose states are computed, or None (counts a hit or a miss)."""
        entry = self._entries.get(tokens)
        if entry is None or tokens not in self._ready:
            self.misses += 1
            return None
        self._entries.move_to_end(tokens)
        self._last_used[tokens] = self.clock
        self.hits += 1
        return entry

    def reserve(self, tokens: tuple[int, ...], pinned: Iterable[tuple[int, ...]] = ()) -> Entry | None:
        """A slot for a prompt about to be computed (call :meth:`mark_ready` once it is), or None
        when the budget has no room even after evicting entries not in ``pinned``."""
        existing = self._entries.get(tokens)
        if existing is not None:
            return existing
        width = width_class(len(tokens))
        pool = self._pool_with_room(width, set(pinned))
        if pool is None:
            self.refused += 1
            return None
        entry = Entry(pool, pool.free.pop())
        self._entries[tokens] = entry
        self._last_used[tokens] = self.clock
        return entry

    def get(self, tokens: tuple[int, ...]) -> Entry | None:
        """The current entry of a prompt, ready or not (no statistics, no LRU update)."""
        return self._entries.get(tokens)

    def mark_ready(self, tokens: tuple[int, ...]) -> None:
        self._ready.add(tokens)

    def discard(self, tokens: tuple[int, ...]) -> None:
        """Forget a prompt (its slot becomes free)."""
        entry = self._entries.pop(tokens, None)
        self._ready.discard(tokens)
        self._last_used.pop(tokens, None)
        if entry is not None:
            entry.pool.free.append(entry.slot)

    def clear(self) -> None:
        """Drop every entry and free the pools' memory."""
        self._entries.clear()
        self._ready.clear()
        self._last_used.clear()
        self.pools.clear()

    # ---- pools

    def _pool_with_room(self, width: int, pinned: set[tuple[int, ...]]) -> Pool | None:
        pool = self.pools.get(width)
        if pool is not None and pool.free:
            return pool
        if self._grow(width):
            return self.pools[width]
        # evict the least recently used idle entry of this width (never one this batch uses)
        for tokens, entry in list(self._entries.items()):
            idle = self.clock - self._last_used.get(tokens, 0) >= MAX_IDLE
            if entry.pool.width == width and tokens not in pinned and idle:
                self.discard(tokens)
                self.evictions += 1
                return entry.pool
        return None

    def _grow(self, width: int) -> bool:
        """Double the pool of ``width`` (or create it) if the budget allows."""
        old = self.pools.get(width)
        old_capacity = old.capacity if old is not None else 0
        capacity = max(4, 2 * old_capacity)
        budget = self.max_bytes - self.bytes_allocated + old_capacity * self.entry_bytes(width)
        capacity = min(capacity, budget // self.entry_bytes(width))
        if capacity <= old_capacity:
            return False
        shape_kv = (self.num_layers, capacity, self.kv_heads, width, self.head_dim)
        shape_h = (self.num_layers + 1, capacity, width, self.hidden_size)
        make = dict(dtype=self.dtype, device=self.device)
        # zeros: columns left of a prompt are masked, but must hold finite values
        keys, values, hidden = torch.zeros(shape_kv, **make), torch.zeros(shape_kv, **make), torch.zeros(shape_h, **make)
        if old is not None:
            keys[:, :old_capacity].copy_(old.keys)
            values[:, :old_capacity].copy_(old.values)
            hidden[:, :old_capacity].copy_(old.hidden)
        new_slots = list(range(capacity - 1, old_capacity - 1, -1))
        if old is None:
            self.pools[width] = Pool(width, capacity, keys, values, hidden, new_slots)
        else:  # grown in place: entries keep pointing at this pool, whose tensors are now larger
            old.capacity, old.keys, old.values, old.hidden = capacity, keys, values, hidden
            old.free = old.free + new_slots
        return True

    def stats(self) -> dict[str, int]:
        return {"entries": len(self), "hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                "refused": self.refused, "bytes": self.bytes_allocated}
