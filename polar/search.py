"""Monte Carlo tree search over programs of layers, many questions in lockstep (SPEC section 5).

Per question the tree's root is the full-depth program. Moves:

* from the root: skip a contiguous block of 1-``max_block`` layers, or insert one extra copy of
  such a block right after it (``[.., 5, 6, 5, 6, ..]``);
* below the root: skip one program position, or repeat one position in place.

A child is legal when no layer index occurs more than ``max_uses_per_layer`` times and its length
lies within the model's bounds (:func:`length_bounds`). The reward of a program is 1 when the
greedy answer is correct, else 0.

Two tree policies (``SearchConfig.tree_policy``):

``"release"`` (default) -- the authors' ``mcts_search``, detail for detail, so that a deterministic
scorer gives the same evaluations and the same output lists as the release
(:mod:`polar.search_release` says how). In short: ``num_simulations`` loop iterations; the node
reached by epsilon-greedy UCB selection creates ALL its legal children at once and one of them, at
random, is scored. Although the root alone has ~8·D children, this goes deep within 100
iterations: children never scored keep UCB -inf, so greedy selection only ever follows scored
children, and each walk scores one program a level below the scored node it stops at. Each question reseeds the same RNG
(``seed``, 42 as in the release), and the output is the release's order.

``"widening"`` -- polar's earlier policy, kept as an option. One *simulation* evaluates one new
program:

1. **Selection** walks down from the root. At each node that may not grow (see widening below) it
   moves to a random child with probability ``epsilon`` and otherwise to the child with the largest
   ``mean_reward - length_penalty * len / D + exploration * sqrt(ln(N_parent + 1) / n)``
   (ties go to the child created first).
2. **Expansion** happens at the first node that may grow: one of its untried moves, chosen
   uniformly at random, becomes a new child and its program is scored.
3. **Backpropagation** adds the reward to the new node and all its ancestors.

*Progressive widening.* A node with ``N`` visits may hold ``ceil(N ** widening)`` children.
Without it (``widening=None``, classic UCT: grow one child at a time while any move is untried,
every child scored when created) the root alone has ~8·D moves, so 100 simulations would never
get below the root. With the default 0.5 the root keeps ~10 children after 100 simulations and
the rest of the budget goes deeper, towards shorter programs.

In this policy the budget ``num_simulations`` counts newly evaluated programs. When an expansion
picks a program already evaluated for this question (the same program reached by another move
order), the node is still added and the cached reward backpropagated, but this does **not** count
as a simulation. A walk that ends at a node with no legal move and no children re-backpropagates
that node's reward, again without counting. Both kinds of free steps are capped
(``max_free_steps`` in a row) so a search whose reachable space is exhausted ends. Each question
draws from its own RNG seeded by ``(seed, question id)``. Output lists are sorted shortest first.

*Each program is evaluated at most once per question* under both policies.

*Lockstep.* The search of one question is a generator that yields the program it wants scored and
receives the reward (:func:`tree_search`). :func:`search_many` advances every active question
to its next evaluation per round and scores all pending programs with ONE scorer call. A question's
RNG is its own, so its result does not depend on which other questions share the batch.
"""

from __future__ import annotations

import gc
import json
import math
import random
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from polar import locks
from polar.errors import DataError
from polar.io import collection_paused, write_json_atomic
from polar.programs import full_program

Program = tuple[int, ...]

TREE_POLICIES = ("release", "widening")

# Length bounds the paper used, keyed by a lowercase fragment of the model name and the depth the
# model must have (so a same-named model of another depth falls back to the scaled rule).
PAPER_LENGTH_BOUNDS: dict[str, tuple[int, int, int]] = {
    "llama-3.2-3b": (28, 16, 32),
    "qwen2.5-3b": (36, 24, 44),
    "qwen3-8b": (36, 24, 44),
    "qwen1.5-moe": (24, 16, 28),
}


@dataclass(frozen=True)
class SearchConfig:
    """Every constant of the search; the defaults are the release's (SPEC 5)."""

    num_simulations: int = 100  # release: loop iterations; widening: newly evaluated programs
    epsilon: float = 0.1
    length_penalty: float = 5.0
    exploration: float = math.sqrt(2)
    max_block: int = 4
    max_uses_per_layer: int = 2
    min_length: int | None = None  # None: per-model default, see length_bounds()
    max_length: int | None = None
    tree_policy: str = "release"  # "release" (the authors' mcts_search) or "widening"
    widening: float | None = 0.5  # widening policy only; None: classic UCT
    max_free_steps: int = 200  # widening policy only
    seed: int = 42

    def __post_init__(self) -> None:
        if self.tree_policy not in TREE_POLICIES:
            raise ValueError(f"tree_policy must be one of {', '.join(TREE_POLICIES)}, not {self.tree_policy!r}")

    def as_dict(self) -> dict[str, Any]:
        """The settings that shape the result (recorded in outputs and resume keys): the release
        policy ignores ``widening`` and ``max_free_steps``, so they are left out for it."""
        settings = asdict(self)
        if self.tree_policy == "release":
            del settings["widening"], settings["max_free_steps"]
        return settings


def length_bounds(model_name: str | None, num_layers: int, config: SearchConfig = SearchConfig()) -> tuple[int, int]:
    """Allowed program lengths ``(min, max)``.

    The paper's models use the paper's bounds. Any other model scales Llama-3.2-3B's bounds
    (16-32 of 28 layers) by its depth: ``round(D*16/28) .. round(D*32/28)``; e.g. SmolLM2's
    30 layers give 17-34. Explicit ``min_length`` / ``max_length`` in the config win. The full
    program must stay legal, so bounds are widened to include ``D`` if needed.
    """
    lo = max(1, round(num_layers * 16 / 28))
    hi = round(num_layers * 32 / 28)
    name = (model_name or "").lower()
    for fragment, (depth, p_lo, p_hi) in PAPER_LENGTH_BOUNDS.items():
        if fragment in name and depth == num_layers:
            lo, hi = p_lo, p_hi
            break
    if config.min_length is not None:
        lo = config.min_length
    if config.max_length is not None:
        hi = config.max_length
    if lo < 1 or lo > hi:
        raise ValueError(f"program length bounds {lo}..{hi} are empty or start below 1")
    return min(lo, num_layers), max(hi, num_layers)


# --------------------------------------------------------------------------- moves


def is_legal(program: Sequence[int], bounds: tuple[int, int], max_uses: int) -> bool:
    """Length within bounds and no layer used more than ``max_uses`` times."""
    if not bounds[0] <= len(program) <= bounds[1]:
        return False
    counts: dict[int, int] = {}
    for layer in program:
        counts[layer] = counts.get(layer, 0) + 1
        if counts[layer] > max_uses:
            return False
    return True


def root_moves(program: Sequence[int], max_block: int) -> list[Program]:
    """Skip any contiguous block of 1..max_block positions, or duplicate it right after itself."""
    p = tuple(program)
    out: list[Program] = []
    for size in range(1, max_block + 1):
        for start in range(0, len(p) - size + 1):
            end = start + size
            out.append(p[:start] + p[end:])
            out.append(p[:end] + p[start:end] + p[end:])
    return out


def single_moves(program: Sequence[int]) -> list[Program]:
    """Skip one position, or repeat one position in place."""
    p = tuple(program)
    out: list[Program] = []
    for i in range(len(p)):
        out.append(p[:i] + p[i + 1 :])
        out.append(p[: i + 1] + p[i:])
    return out


def legal_children(
    program: Sequence[int], is_root: bool, bounds: tuple[int, int], config: SearchConfig
) -> list[Program]:
    """Distinct legal children in a fixed order (the order only matters for reproducibility)."""
    candidates = root_moves(program, config.max_block) if is_root else single_moves(program)
    seen: set[Program] = set()
    out: list[Program] = []
    for child in candidates:
        if child and child not in seen and is_legal(child, bounds, config.max_uses_per_layer):
            seen.add(child)
            out.append(child)
    return out


# --------------------------------------------------------------------------- tree


@dataclass(eq=False)
class Node:
    """One program in one question's tree. ``value`` is the sum of backpropagated rewards."""

    program: Program
    reward: float
    parent: "Node | None" = None
    children: list["Node"] = field(default_factory=list)
    untried: list[Program] | None = None  # legal moves not yet expanded; None = not generated
    visits: int = 0
    value: float = 0.0

    @property
    def mean(self) -> float:
        return self.value / self.visits if self.visits else 0.0


def ucb(child: Node, parent_visits: int, num_layers: int, config: SearchConfig) -> float:
    """``mean_reward - lambda*len/D + c*sqrt(ln(N_parent+1)/n)`` for a visited child."""
    return (
        child.mean
        - config.length_penalty * len(child.program) / num_layers
        + config.exploration * math.sqrt(math.log(parent_visits + 1) / child.visits)
    )


def select_child(node: Node, rng: random.Random, num_layers: int, config: SearchConfig) -> Node:
    """Epsilon-greedy over UCB: a random child with probability epsilon, else the best UCB."""
    if rng.random() < config.epsilon:
        return node.children[rng.randrange(len(node.children))]
    best = node.children[0]
    best_score = ucb(best, node.visits, num_layers, config)
    for child in node.children[1:]:
        score = ucb(child, node.visits, num_layers, config)
        if score > best_score:
            best, best_score = child, score
    return best


def may_grow(node: Node, config: SearchConfig) -> bool:
    """Whether the node may get a new child now (progressive widening)."""
    if not node.untried:
        return False
    if config.widening is None:
        return True
    return len(node.children) < max(1, math.ceil(node.visits**config.widening))


def backpropagate(node: Node | None, reward: float) -> None:
    while node is not None:
        node.visits += 1
        node.value += reward
        node = node.parent


def question_rng(seed: int, question_id: str) -> random.Random:
    """The question's own RNG: depends only on (seed, question id), never on batch neighbours."""
    return random.Random(f"polar-search:{seed}:{question_id}")


@dataclass
class SearchResult:
    """Everything one question's search found."""

    rewards: dict[Program, float]  # every evaluated program, in evaluation order
    initial_score: float
    simulations: int
    free_steps: int  # walks that evaluated nothing new
    ranked: list[Program] | None = None  # the output order; None: shortest first (sort_programs)

    @property
    def valid(self) -> list[list[int]]:
        return self._listed(lambda r: r > 0)

    @property
    def invalid(self) -> list[list[int]]:
        return self._listed(lambda r: r <= 0)

    def _listed(self, keep: Callable[[float], bool]) -> list[list[int]]:
        if self.ranked is None:
            return sort_programs([p for p, r in self.rewards.items() if keep(r)])
        return [list(p) for p in self.ranked if keep(self.rewards[p])]


def sort_programs(programs: Sequence[Sequence[int]]) -> list[list[int]]:
    """Shortest first, then lexicographic: a stable, reader-friendly order."""
    return [list(p) for p in sorted((tuple(p) for p in programs), key=lambda p: (len(p), p))]


def question_search(
    question_id: str, num_layers: int, bounds: tuple[int, int], config: SearchConfig
) -> Generator[list[int], float, SearchResult]:
    """One question's search under the ``"widening"`` tree policy, as a state machine.

    Yields a program to score, expects the reward via ``send``; returns the :class:`SearchResult`
    (as ``StopIteration.value``). The root (full depth) is always the first program yielded.
    """
    rng = question_rng(config.seed, question_id)
    root_program = tuple(full_program(num_layers))
    initial = float((yield list(root_program)))
    rewards: dict[Program, float] = {root_program: initial}
    root = Node(root_program, initial)
    backpropagate(root, initial)
    simulations = free_steps = free_in_a_row = 0

    while simulations < config.num_simulations and free_in_a_row < config.max_free_steps:
        node = root
        while True:
            if node.untried is None:
                node.untried = legal_children(node.program, node is root, bounds, config)
            if may_grow(node, config) or not node.children:
                break
            node = select_child(node, rng, num_layers, config)
        if not node.untried:  # dead end: nothing to expand here and nothing below
            backpropagate(node, node.reward)
            free_steps += 1
            free_in_a_row += 1
            continue
        program = node.untried.pop(rng.randrange(len(node.untried)))
        if program in rewards:
            reward = rewards[program]
            free_steps += 1
            free_in_a_row += 1
        else:
            reward = float((yield list(program)))
            rewards[program] = reward
            simulations += 1
            free_in_a_row = 0
        child = Node(program, reward, parent=node)
        node.children.append(child)
        backpropagate(child, reward)
    free_tree(root)
    return SearchResult(rewards, initial, simulations, free_steps)


def free_tree(root: Any) -> None:
    """Break a finished tree's parent/child cycles so reference counting frees it at once (the
    search runs with automatic cyclic collection paused, see :func:`search_many`)."""
    stack = [root]
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        node.children = []
        node.parent = None


def tree_search(
    question_id: str, num_layers: int, bounds: tuple[int, int], config: SearchConfig
) -> Generator[list[int], float, SearchResult]:
    """One question's search under ``config.tree_policy`` (the generator protocol of
    :func:`question_search`: yields programs to score, receives rewards, returns the result)."""
    if config.tree_policy == "release":
        from polar.search_release import release_question_search  # it imports this module

        return release_question_search(num_layers, bounds, config)
    return question_search(question_id, num_layers, bounds, config)


# --------------------------------------------------------------------------- lockstep driver


class Scorer(Protocol):
    """Anything that scores parallel lists of questions and programs (``ProgramScorer`` does)."""

    def score(self, questions: Sequence[Any], programs: Sequence[Sequence[int]]) -> Sequence[Any]: ...


@contextmanager
def _collection_paused() -> Iterator["_SparseCollections"]:
    """Pause Python's automatic cyclic collector during a search; the driver runs a full
    collection only now and then instead (:class:`_SparseCollections`).

    Why: a search keeps ~1,000 trees of ~1,000 nodes each alive, and automatic collection rescans
    them ever more often as they grow: measured, 60% of the tree policy's host time (1024
    questions x 16 simulations on D = 28: 5.1 s with automatic collection, 2.1 s without), all of
    it while the device idles between rounds. Finished trees are freed by reference counting
    (:func:`free_tree` breaks their cycles), so the sparse collections only bound cyclic garbage
    from elsewhere (the scorer, the model's code); the setting is restored on exit."""
    with collection_paused():
        yield _SparseCollections()


class _SparseCollections:
    """Full collections at most every ``min_interval`` seconds and at most ``max_share`` of the
    wall time (a full collection over a million live tree nodes takes ~1 s on a slow core, so a
    fixed number of rounds between them would cost more than automatic collection did)."""

    def __init__(self, min_interval: float = 120.0, max_share: float = 0.02) -> None:
        self.min_interval, self.max_share = min_interval, max_share
        self.last = time.perf_counter()
        self.duration = 0.0

    def after_round(self) -> None:
        if time.perf_counter() - self.last < max(self.min_interval, self.duration / self.max_share):
            return
        started = time.perf_counter()
        gc.collect()
        self.last = time.perf_counter()
        self.duration = self.last - started


def search_many(
    questions: Sequence[Any],
    scorer: Scorer,
    num_layers: int,
    config: SearchConfig = SearchConfig(),
    model_name: str | None = None,
    max_active: int | None = None,
    on_finished: Callable[[list[dict[str, Any]]], None] | None = None,
    on_round: Callable[[int, int], None] | None = None,
    deadline: float | None = None,
    pause_collection: bool = True,
) -> list[dict[str, Any]]:
    """Search every question; return one release-format sample per question, in input order.

    With a ``deadline`` (a ``time.perf_counter()`` value) no question starts after it; the ones
    in flight finish, and the questions never started are left out of the result.

    Up to ``max_active`` questions (default: all) search at once; a finished question's slot is
    refilled from the queue so batches stay full. Each round makes exactly one ``scorer.score``
    call holding one pending program per active question. ``on_finished(samples)`` is called after
    every round in which questions finished (the CLI saves progress there); ``on_round(finished,
    programs)`` reports progress counts. ``pause_collection=False`` leaves Python's automatic
    cyclic collector running (see :func:`_collection_paused`; the results are the same).
    """
    bounds = length_bounds(model_name, num_layers, config)
    limit = len(questions) if max_active is None else max(1, max_active)
    queue = iter(range(len(questions)))
    results: list[dict[str, Any] | None] = [None] * len(questions)
    active: dict[int, tuple[Generator, list[int], float]] = {}

    def start_next() -> bool:
        if deadline is not None and time.perf_counter() > deadline:
            return False
        for index in queue:
            gen = tree_search(str(questions[index].id), num_layers, bounds, config)
            active[index] = (gen, next(gen), time.perf_counter())
            return True
        return False

    pause = _collection_paused() if pause_collection else nullcontext(_SparseCollections(float("inf")))
    with pause as collections:
        while len(active) < limit and start_next():
            pass
        while active:
            indices = list(active)
            outcomes = scorer.score([questions[i] for i in indices], [active[i][1] for i in indices])
            finished: list[dict[str, Any]] = []
            for index, outcome in zip(indices, outcomes):
                gen, _, started = active[index]
                try:
                    active[index] = (gen, gen.send(1.0 if outcome.correct else 0.0), started)
                except StopIteration as stop:
                    del active[index]
                    seconds = time.perf_counter() - started
                    results[index] = make_sample(questions[index], stop.value, seconds, index, config.tree_policy)
                    finished.append(results[index])
            while len(active) < limit and start_next():
                pass
            if on_round is not None:
                on_round(len(finished), len(indices))
            if finished and on_finished is not None:
                on_finished(finished)
            collections.after_round()
    return [r for r in results if r is not None]


def make_sample(question: Any, result: SearchResult, seconds: float, index: int | None = None,
                tree_policy: str = "release") -> dict[str, Any]:
    """A supervision sample in the release's format plus our search metadata."""
    sample: dict[str, Any] = {
        "id": str(question.id),
        "question": question.question,
        "gt_ans": question.answer,
        "initial_score": result.initial_score,
        "final_valid_transitions": result.valid,
        "final_invalid_transitions": result.invalid,
        "search": {
            "tree_policy": tree_policy,
            "simulations": result.simulations,
            "programs_evaluated": len(result.rewards),
            "free_steps": result.free_steps,
            "seconds": round(seconds, 3),
        },
    }
    for attr in ("source", "level"):
        value = getattr(question, attr, None)
        if value is not None:
            sample[attr] = value
    if index is not None:
        sample["index"] = index
    return sample


# --------------------------------------------------------------------------- summary


def summarize(samples: Sequence[dict[str, Any]], num_layers: int) -> dict[str, Any]:
    """What a search found, in the terms of the paper's motivation (SPEC 5 / issue 4)."""
    n = len(samples)
    correct = [s for s in samples if s.get("initial_score", 0) > 0]
    wrong = [s for s in samples if s.get("initial_score", 0) <= 0]
    shortest = [min(len(p) for p in s["final_valid_transitions"]) for s in samples if s["final_valid_transitions"]]
    evaluated = sum(s.get("search", {}).get("programs_evaluated", 0) for s in samples)

    def share(k: int, total: int) -> float | None:
        return round(k / total, 4) if total else None

    return {
        "questions": n,
        "num_layers": num_layers,
        "base_accuracy": share(len(correct), n),
        "oracle_accuracy": share(sum(1 for s in samples if s["final_valid_transitions"]), n),
        "correct_with_shorter_valid": share(
            sum(1 for s in correct if any(len(p) < num_layers for p in s["final_valid_transitions"])), len(correct)
        ),
        "wrong_fixed": share(sum(1 for s in wrong if s["final_valid_transitions"]), len(wrong)),
        "mean_shortest_valid_length": round(sum(shortest) / len(shortest), 3) if shortest else None,
        "programs_evaluated": evaluated,
    }


# --------------------------------------------------------------------------- runs on disk
#
# Layout of one search task (the release's layout plus our shard files):
#   {out}/{model_dir}/{task}/merged_mcts_samples.json   all samples, release format
#   {out}/{model_dir}/{task}/summary.json               what the search found
#   {out}/{model_dir}/{task}/*.png                      program lengths, skipped/repeated layers
#   {out}/{model_dir}/{task}/shards/shard-00000-of-00004.json
# A shard file is rewritten atomically whenever questions finish, so a crash or Ctrl-C loses only
# the questions in flight, and rerunning the same command resumes where it stopped.

MERGED_NAME = "merged_mcts_samples.json"


def task_name(dataset: str, target_diff: int | None) -> str:
    """``dart-math-diff-N`` for the DART-Math / MATH question pools (what training reads);
    other datasets use their own name (plus ``-diff-N`` when a level is given)."""
    if dataset in ("dart", "math"):
        if target_diff is None:
            raise ValueError(f"--target_diff is required for dataset {dataset!r}")
        return f"dart-math-diff-{target_diff}"
    return dataset if target_diff is None else f"{dataset}-diff-{target_diff}"


def shard_path(task_dir: Path, shard: int, num_shards: int) -> Path:
    return Path(task_dir) / "shards" / f"shard-{shard:05d}-of-{num_shards:05d}.json"


def shard_of(index: int, num_shards: int) -> int:
    """Question ``index`` goes to shard ``index % num_shards`` (round-robin keeps shards even)."""
    return index % num_shards


def read_json_state(path: Path) -> Any:
    """A JSON file this module wrote, or a one-line :class:`DataError` naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err.msg}); delete it to start it over") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply; delete it to start it over") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start}); delete it to start it over") from None


def _flatten(settings: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(settings, dict):
        return {prefix: settings} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in settings.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        out.update(_flatten(value, name))
    return out


def settings_diff(saved: dict[str, Any] | None, wanted: dict[str, Any]) -> list[str]:
    """The settings that differ, as ``"search.num_simulations: 3 there, 4 now"`` (nested keys
    dotted), comparing as JSON would store them."""
    old = _flatten(saved or {})
    new = _flatten(json.loads(json.dumps(wanted)))
    missing = "(not recorded)"
    return [
        f"{key}: {json.dumps(old.get(key, missing))} there, {json.dumps(new.get(key, missing))} now"
        for key in sorted(set(old) | set(new))
        if old.get(key, missing) != new.get(key, missing)
    ]


def load_shard(path: Path, resume_key: dict[str, Any]) -> dict[str, Any] | None:
    """The saved state of a shard, or None. A shard saved with other settings is an error: mixing
    results of two configurations in one supervision file would be silently wrong."""
    path = Path(path)
    if not path.exists():
        return None
    state = read_json_state(path)
    if not isinstance(state, dict) or not isinstance(state.get("samples"), list):
        raise DataError(f"{path}: not a search shard file (no 'samples' list); delete it to start this shard over")
    diff = settings_diff(state.get("resume_key"), resume_key)
    if diff:
        raise DataError(
            f"{path} holds results made with other settings ({'; '.join(diff)}); rerun with --overwrite "
            "to replace them, or use another --out"
        )
    return state


def _merged_diff(path: Path, resume_key: dict[str, Any]) -> list[str]:
    """How the settings recorded by a merged file differ from ``resume_key`` (empty: the same).
    Older merged files record them only among ``metadata.settings``; a file that records none
    was not written by ``polar search`` and never counts as the same."""
    data = read_json_state(path)
    metadata = data.get("metadata") if isinstance(data, dict) else None
    metadata = metadata if isinstance(metadata, dict) else {}
    saved = metadata.get("resume_key")
    if not isinstance(saved, dict):
        settings = metadata.get("settings")
        if not isinstance(settings, dict):
            return ["no settings recorded: not written by polar search"]
        saved = {key: settings[key] for key in resume_key if key in settings}
    return settings_diff(saved, resume_key)


def _shard_diff(path: Path, resume_key: dict[str, Any]) -> list[str]:
    """How the settings of the shard file at ``path`` differ from ``resume_key`` (empty: the
    same, or the file is gone)."""
    if not path.exists():
        return []
    state = read_json_state(path)
    saved = state.get("resume_key") if isinstance(state, dict) else None
    return settings_diff(saved, resume_key) if isinstance(saved, dict) else ["no settings recorded"]


def conflicting_results(task_dir: Path, resume_key: dict[str, Any]) -> list[tuple[Path, list[str]]]:
    """Files under ``task_dir`` holding results made with settings other than ``resume_key``:
    shard files of any shard count, and the merged file. Each with its differing settings."""
    task_dir = Path(task_dir)
    found = [(path, _shard_diff(path, resume_key)) for paths in shard_files(task_dir).values() for path in paths]
    merged = task_dir / MERGED_NAME
    if merged.exists():
        found.append((merged, _merged_diff(merged, resume_key)))
    return [(path, diff) for path, diff in found if diff]


MERGED_COMPANIONS = ("summary.json", "valid_program_lengths.png", "layer_heatmap.png")


def clear_conflicting_results(
    task_dir: Path, resume_key: dict[str, Any], overwrite: bool, log: Callable[[str], None] = print,
    own_shard: Path | None = None,
) -> None:
    """Refuse to write beside results made with other settings, or, with ``overwrite``, delete them.

    Without ``overwrite`` the error is one line naming a file and the settings that differ. With
    it, conflicting shards are removed under their own lock (a shard another live process is
    writing is left to it) and the merged file goes with its summary and plots; the log says so.
    ``own_shard`` is the shard whose lock the caller already holds.
    """
    conflicts = conflicting_results(task_dir, resume_key)
    if not conflicts:
        return
    if not overwrite:
        path, diff = conflicts[0]
        more = f" (and {len(conflicts) - 1} more)" if len(conflicts) > 1 else ""
        raise DataError(
            f"{path} holds results made with other settings ({'; '.join(diff)}){more}; rerun with --overwrite "
            "to replace them, or use another --out"
        )
    removed: list[str] = []
    for path, _ in conflicts:
        if path.name == MERGED_NAME:
            for name in (MERGED_NAME, *MERGED_COMPANIONS):
                if (path.parent / name).exists():
                    (path.parent / name).unlink(missing_ok=True)
                    removed.append(name)
            continue
        if own_shard is not None and path == Path(own_shard):
            path.unlink(missing_ok=True)
            removed.append(str(path.relative_to(task_dir)))
            continue
        try:
            lock = locks.acquire(path, log)
        except locks.LockedError:
            continue  # its writer runs now, with the new settings or not: it decides
        try:
            if _shard_diff(path, resume_key):  # still of other settings now that it is locked
                path.unlink(missing_ok=True)
                removed.append(str(path.relative_to(task_dir)))
        finally:
            locks.release(lock)
    if removed:
        log(f"--overwrite: removed {len(removed)} files made with other settings "
            f"({'; '.join(conflicts[0][1])}): {', '.join(removed)}")


def run_shard(
    questions: Sequence[Any],
    scorer_factory: Callable[[], tuple[Scorer, int]],
    task_dir: Path,
    resume_key: dict[str, Any],
    metadata: dict[str, Any],
    config: SearchConfig,
    model_name: str | None,
    shard: int = 0,
    num_shards: int = 1,
    max_active: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    time_limit: float | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Search this shard's questions, resuming from its file; return the shard's final state.

    ``time_limit`` (seconds): start no question after it (in-flight ones finish); the shard then
    stays incomplete and a later run resumes it.

    ``questions`` is the whole ordered question list; this shard takes indices ``k`` with
    ``k % num_shards == shard``. ``scorer_factory`` returns ``(scorer, num_layers)`` and is only
    called when there is work left (loading a model is the slow part of a resume).
    ``progress(questions_finished, programs_scored)`` is called after each round.
    ``max_active`` defaults to the scorer's ``batch_size`` (one engine batch per round).

    The shard file is locked for the whole run (a second writer gets :class:`locks.LockedError`).
    Results of other settings under ``task_dir`` (shards of any count, the merged file) stop the
    run before any work, unless ``overwrite`` replaces them (:func:`clear_conflicting_results`).
    """
    path = shard_path(task_dir, shard, num_shards)
    with locks.hold(path, log):
        clear_conflicting_results(task_dir, resume_key, overwrite, log, own_shard=path)
        return _search_shard(path, questions, scorer_factory, resume_key, metadata, config, model_name,
                             shard, num_shards, max_active, progress, time_limit)


def _search_shard(
    path: Path,
    questions: Sequence[Any],
    scorer_factory: Callable[[], tuple[Scorer, int]],
    resume_key: dict[str, Any],
    metadata: dict[str, Any],
    config: SearchConfig,
    model_name: str | None,
    shard: int,
    num_shards: int,
    max_active: int | None,
    progress: Callable[[int, int], None] | None,
    time_limit: float | None,
) -> dict[str, Any]:
    """The body of :func:`run_shard`, run while holding the shard's lock."""
    mine = [k for k in range(len(questions)) if shard_of(k, num_shards) == shard]
    state = load_shard(path, resume_key) or {
        "resume_key": resume_key,
        "shard": shard,
        "num_shards": num_shards,
        "questions": len(mine),
        "num_layers": None,
        "wall_seconds": 0.0,
        "complete": False,
        "samples": [],
    }
    done = {s["index"] for s in state["samples"]}
    todo = [k for k in mine if k not in done]
    if progress is not None and done:
        progress(len(done), 0)  # a resumed run starts its progress where the last one stopped
    if not todo:
        if not state["complete"]:
            state["complete"] = True
            write_json_atomic(path, state)
        return state

    scorer, num_layers = scorer_factory()
    if max_active is None:  # one engine batch per round (the scorer may have sized it from memory)
        max_active = getattr(scorer, "batch_size", None)
    state["num_layers"] = num_layers
    state["metadata"] = metadata
    started = time.perf_counter()
    wall_before = state["wall_seconds"]

    def save(finished: list[dict[str, Any]]) -> None:
        for sample in finished:
            sample["index"] = todo[sample["index"]]  # local position -> global question index
        state["samples"].extend(finished)
        state["samples"].sort(key=lambda s: s["index"])
        state["wall_seconds"] = round(wall_before + time.perf_counter() - started, 3)
        state["complete"] = len(state["samples"]) == len(mine)
        write_json_atomic(path, state)

    search_many(
        [questions[k] for k in todo], scorer, num_layers, config, model_name=model_name,
        max_active=max_active, on_finished=save, on_round=progress,
        deadline=None if time_limit is None else started + time_limit,
    )
    return state


def shard_files(task_dir: Path) -> dict[int, list[Path]]:
    """Shard files present, grouped by the shard count they were written for."""
    found: dict[int, list[Path]] = {}
    for path in sorted((Path(task_dir) / "shards").glob("shard-*-of-*.json")):
        try:
            count = int(path.stem.rsplit("-of-", 1)[1])
        except (IndexError, ValueError):
            continue
        found.setdefault(count, []).append(path)
    return found


def merge_shards(
    task_dir: Path, num_shards: int | None = None, plots: bool = True, partial: bool = False,
    overwrite: bool = False,
) -> tuple[Path, dict[str, Any]] | None:
    """Join complete shards into ``merged_mcts_samples.json`` + ``summary.json`` + plots.

    Returns ``None`` (writing nothing) while some shard is missing or unfinished, so every shard
    may call it when it ends and the last one to finish writes the merged file. With ``partial``
    the finished questions of unfinished shards are merged too, and the metadata says so.
    An existing merged file made with other settings is an error unless ``overwrite``.
    """
    task_dir = Path(task_dir)
    groups = shard_files(task_dir)
    if num_shards is None:
        if not groups:
            raise DataError(f"{task_dir}: no shard files under shards/ to merge")
        if len(groups) > 1:
            raise DataError(f"{task_dir}: shard files for several shard counts {sorted(groups)}; pass the count")
        num_shards = next(iter(groups))
    states = []
    for shard in range(num_shards):
        path = shard_path(task_dir, shard, num_shards)
        if not path.exists():
            if partial:
                continue
            return None
        state = read_json_state(path)
        if not isinstance(state, dict) or not isinstance(state.get("samples"), list):
            raise DataError(f"{path}: not a search shard file (no 'samples' list)")
        if not state.get("complete") and not partial:
            return None
        states.append(state)
    if not states:
        return None
    resume_key = states[0].get("resume_key") or {}
    for shard_state in states[1:]:
        diff = settings_diff(shard_state.get("resume_key"), resume_key)
        if diff:
            raise DataError(f"{task_dir}: shards {states[0].get('shard')} and {shard_state.get('shard')} were "
                            f"written with different settings ({'; '.join(diff)}); cannot merge")
    merged_path = task_dir / MERGED_NAME
    if merged_path.exists() and not overwrite:
        diff = _merged_diff(merged_path, resume_key)
        if diff:
            raise DataError(f"{merged_path} holds results made with other settings ({'; '.join(diff)}); "
                            "rerun with --overwrite to replace it")
    samples = sorted((s for state in states for s in state["samples"]), key=lambda s: s["index"])
    num_layers = next((s["num_layers"] for s in states if s.get("num_layers")), None)
    if num_layers is None:  # every shard had zero questions
        num_layers = max((max(p) + 1 for s in samples for p in s["final_valid_transitions"] + s["final_invalid_transitions"]), default=0)
    metadata = next((s["metadata"] for s in states if s.get("metadata")), {})
    metadata = {**metadata, "shards": num_shards, "resume_key": resume_key}
    expected = sum(s.get("questions", 0) for s in states)
    if partial and (len(states) < num_shards or len(samples) < expected):
        metadata["partial"] = {"questions_done": len(samples), "shards_present": len(states)}
    merged = write_json_atomic(merged_path, {"metadata": metadata, "samples": samples})

    summary = summarize(samples, num_layers)
    wall = sum(s.get("wall_seconds", 0.0) for s in states)
    summary["shard_wall_seconds"] = round(wall, 3)
    summary["programs_per_second"] = round(summary["programs_evaluated"] / wall, 3) if wall > 0 else None
    write_json_atomic(task_dir / "summary.json", {"metadata": metadata, "summary": summary})
    if plots and num_layers:
        from polar.plots import plot_layer_heatmap, plot_program_lengths

        shortest = [s["final_valid_transitions"][0] for s in samples if s["final_valid_transitions"]]
        valid = [p for s in samples for p in s["final_valid_transitions"]]
        plot_program_lengths(valid, num_layers, task_dir / "valid_program_lengths.png",
                             title=f"Valid programs ({len(samples)} questions)")
        plot_layer_heatmap(shortest, num_layers, task_dir / "layer_heatmap.png",
                           title="Shortest valid program per question")
    return merged, summary
