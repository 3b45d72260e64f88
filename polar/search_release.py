"""The release's MCTS tree policy, ``SearchConfig(tree_policy="release")`` (the default).

This is the tree policy of the authors' ``mcts_discovery/run_mcts.py`` (``mcts_search``), rebuilt
so that, for a deterministic scorer, a question evaluates exactly the programs the release
evaluates, in the same order, and writes the same two program lists in the same order. Every
detail below is there because it changes which programs get evaluated:

* **RNG.** Each question draws from ``random.Random(seed)``, the same seed for every question (the
  release calls ``random.seed(42)`` at the start of every question). The draws are the release's:
  one ``random()`` per selection step that has children to choose from, one ``choice`` over those
  children when it explores, one ``choice`` over the new children sorted by program.
* **Iterations.** ``num_simulations`` counts loop iterations, not evaluations: an iteration that
  ends on an already scored node evaluates nothing. The root is scored before the loop and not
  backpropagated.
* **Selection** descends while the node has children, among the children not fully explored: with
  probability ``epsilon`` a uniformly random one, else the *first* with the largest stored UCB.
  The UCB is stored on the node during backpropagation only (so it is stale in between), and a
  node never backpropagated has UCB -inf.
* **Expansion.** At the node reached, if it is not fully explored, every legal child not yet in
  the question's visited set is created at once (:func:`release_children`), and one of them,
  chosen uniformly from the children sorted by program, is scored. With no legal child the node
  becomes fully explored and is scored itself if it never was.
* **Backpropagation** walks from that node to the root: ``visits += 1``, ``total += score``,
  ``ucb = total/visits - length_penalty*len/D + sqrt(c2*ln(N_root + 1)/visits)`` with ``N_root``
  the root's visit count at that moment (the root is updated last) and ``c2 = exploration**2``
  (2 by default, as the release writes it), then a node is fully explored when it has children
  and all of them are. ``score`` is the release's variable: the reward just evaluated, or, when
  the iteration evaluated nothing, the reward evaluated last in this question (the root's at first).

Why it goes deep with only ~100 iterations although the root alone has ~8·D children: every
child is created at once but only one is scored; the others keep UCB -inf, so greedy selection
always follows a scored child, and after the first iteration the walk descends through the best
scored chain and expands one level further each time. Only the ``epsilon`` moves pick unscored
siblings.

A node entered by such a random move has no children yet and is expanded there: it gains children
without ever being scored, and stays out of the output. The output lists the scored programs in
breadth-first tree order (children in creation order), stable-sorted by (reward, -length)
descending, the root included.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Generator
from dataclasses import dataclass, field
from operator import attrgetter

from polar.programs import full_program
from polar.search import Program, SearchConfig, SearchResult, free_tree, is_legal


@dataclass(eq=False, slots=True)
class ReleaseNode:
    """One program in one question's tree, with the release's bookkeeping."""

    program: Program
    parent: "ReleaseNode | None" = None
    children: list["ReleaseNode"] = field(default_factory=list)
    visits: int = 0
    total: float = 0.0
    ucb: float = -math.inf  # stored by backpropagation; -inf until the node is first visited
    reward: float | None = None  # None: never scored
    fully_explored: bool = False


def release_children(
    program: Program, is_root: bool, visited: set[Program], bounds: tuple[int, int], config: SearchConfig
) -> list[Program]:
    """The release's candidate children of ``program``, in its order, added to ``visited`` as kept.

    For each position ``i``: skip 1 layer, then (root only) skip blocks of 2..``max_block``, then
    repeat the layer in place, then (root only) insert a second copy of blocks of 2..``max_block``
    right after them. A candidate is kept when it is non-empty, its length is within ``bounds``,
    no layer occurs more than ``max_uses_per_layer`` times, and it was never created before in
    this question (``visited`` holds every program of the tree, the root included).
    """
    lo, hi = bounds
    max_size = config.max_block if is_root else 1
    max_uses = config.max_uses_per_layer
    n = len(program)
    kept: list[Program] = []
    # The use-count test is done incrementally (checking every child in full dominated a search
    # round's host time): a skip only lowers counts, so it passes whenever the parent does; a
    # repeat adds the block's layers once more, so only those are checked. Lengths are checked
    # before a child is built. The order of the tests does not matter: all are pure.
    uses: dict[int, int] = {}
    for layer in program:
        uses[layer] = uses.get(layer, 0) + 1
    parent_ok = max(uses.values(), default=0) <= max_uses
    for i in range(n):
        for size in range(1, min(max_size, n - i) + 1):
            if 0 < n - size and lo <= n - size <= hi:
                child = program[:i] + program[i + size :]
                if child not in visited and (parent_ok or is_legal(child, bounds, max_uses)):
                    visited.add(child)
                    kept.append(child)
        if not parent_ok:
            continue  # a repeat only raises counts: no repeat of an over-used parent passes
        for size in range(1, min(max_size, n - i) + 1):
            if lo <= n + size <= hi:
                block = program[i : i + size]
                if size == 1:
                    fits = uses[block[0]] < max_uses
                else:
                    fits = all(uses[layer] + block.count(layer) <= max_uses for layer in block)
                if fits:
                    child = program[: i + size] + block + program[i + size :]
                    if child not in visited:
                        visited.add(child)
                        kept.append(child)
    return kept


def release_question_search(
    num_layers: int, bounds: tuple[int, int], config: SearchConfig
) -> Generator[list[int], float, SearchResult]:
    """One question's search, the release's way, as a generator (protocol of ``question_search``).

    Yields each program to score (the root first), receives its reward via ``send`` and returns
    the :class:`SearchResult`. The question's identity plays no part: the release reseeds its RNG
    identically for every question.
    """
    rng = random.Random(config.seed)
    root_program = tuple(full_program(num_layers))
    score = float((yield list(root_program)))
    initial = score
    root = ReleaseNode(root_program, reward=score)
    rewards: dict[Program, float] = {root_program: score}
    visited: set[Program] = {root_program}
    idle = 0

    for _ in range(config.num_simulations):
        node = _select(root, rng, config)
        if not node.fully_explored:
            for child in release_children(node.program, node is root, visited, bounds, config):
                node.children.append(ReleaseNode(child, parent=node))
            if node.children:
                node = rng.choice(sorted(node.children, key=_PROGRAM))
            else:
                node.fully_explored = True
        if node.reward is None:
            score = float((yield list(node.program)))
            node.reward = score
            rewards[node.program] = score
        else:
            idle += 1  # nothing evaluated: the stale ``score`` is backpropagated, as in the release
        _backpropagate(node, score, root, num_layers, config)

    ranked = release_ranking(root)
    free_tree(root)
    return SearchResult(rewards, initial, simulations=config.num_simulations, free_steps=idle, ranked=ranked)


_UCB = attrgetter("ucb")
_PROGRAM = attrgetter("program")


def _select(root: ReleaseNode, rng: random.Random, config: SearchConfig) -> ReleaseNode:
    node = root
    while node.children:
        open_children = [c for c in node.children if not c.fully_explored]
        if not open_children:
            break
        if rng.random() < config.epsilon:
            node = rng.choice(open_children)
        else:
            node = max(open_children, key=_UCB)  # max() keeps the first of equals
    return node


def _backpropagate(node: ReleaseNode | None, score: float, root: ReleaseNode, num_layers: int,
                   config: SearchConfig) -> None:
    # The release writes sqrt(2*ln(N+1)/n); squaring our constant back (rounded, so that sqrt(2)
    # gives exactly 2.0) keeps the float arithmetic, and so every tie, bit-identical to it.
    c2 = round(config.exploration**2, 12)
    while node is not None:
        node.visits += 1
        node.total += score
        node.ucb = (
            node.total / node.visits
            - config.length_penalty * len(node.program) / num_layers
            + math.sqrt(c2 * math.log(root.visits + 1) / node.visits)
        )
        if node.children and all(c.fully_explored for c in node.children):
            node.fully_explored = True
        node = node.parent


def release_ranking(root: ReleaseNode) -> list[Program]:
    """Scored programs in breadth-first order, stable-sorted by (reward, -length) descending."""
    order: list[ReleaseNode] = []
    queue = deque([root])
    while queue:
        node = queue.popleft()
        order.append(node)
        queue.extend(node.children)
    scored = [n for n in order if n.reward is not None]
    scored.sort(key=lambda n: (n.reward, -len(n.program)), reverse=True)
    return [n.program for n in scored]

