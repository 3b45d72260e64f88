"""The release's tree policy (the default): same evaluations and output as the authors' mcts_search.

The reference below re-implements the release's ``mcts_search`` loop (``mcts_discovery/run_mcts.py``)
on its own terms: list paths, ``-inf`` sentinels, the release's candidate loop with its explicit
block sizes and its ``max(Counter(..)) <= 2`` check, breadth-first ``pop(0)`` listing. Polar's
batched search must evaluate, per question, exactly the programs this loop evaluates, in the same
order, and write the same two lists in the same order.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import random
from collections import Counter

import pytest
from test_search import O, HashScorer, questions

from polar.errors import DataError
from polar.search import SearchConfig, length_bounds, merge_shards, run_shard, search_many, shard_path
from polar.search_release import release_children

INF = float("inf")


# --------------------------------------------------------------------------- reference


class RefNode:
    def __init__(self, path: list[int], parent: "RefNode | None" = None) -> None:
        self.path = path
        self.parent = parent
        self.children: list[RefNode] = []
        self.visits = 0
        self.total_score = 0.0
        self.ucb = -INF
        self.score = -INF
        self.fully_explored = False


def ref_candidates(path: list[int], visited: set, is_root: bool, lo: int, hi: int) -> list[list[int]]:
    """The release's candidates: per position skip 1 [root: 2, 3, 4], repeat 1 [root: blocks 2, 3, 4]."""
    found = []

    def consider(candidate: list[int], limit_uses: bool = False) -> None:
        if limit_uses and max(Counter(candidate).values()) > 2:
            return
        if tuple(candidate) in visited:
            return
        if candidate and lo <= len(candidate) <= hi:
            found.append(candidate)
            visited.add(tuple(candidate))

    n = len(path)
    for i in range(n):
        consider(path[:i] + path[i + 1:])
        if is_root:
            for k in (2, 3, 4):
                if i + k - 1 < n:
                    consider(path[:i] + path[i + k:])
        consider(path[:i] + [path[i]] + path[i:], limit_uses=True)
        if is_root:
            for k in (2, 3, 4):
                if i + k - 1 < n:
                    consider(path[:i] + path[i:i + k] + path[i:])
    return found


def reference_mcts(depth: int, lo: int, hi: int, reward, simulations: int, events: Counter | None = None):
    """Returns (programs evaluated in order, final_valid_transitions, final_invalid_transitions)."""
    events = Counter() if events is None else events
    rng = random.Random(42)
    evaluated: list[tuple[int, ...]] = []

    def evaluate(path: list[int]) -> float:
        evaluated.append(tuple(path))
        return 1.0 if reward(path) else 0.0

    root = RefNode(list(range(depth)))
    score = evaluate(root.path)
    root.score = score
    visited = {tuple(root.path)}

    for _ in range(simulations):
        node = root
        while node.children:
            unexplored = [child for child in node.children if not child.fully_explored]
            if not unexplored:
                break
            if rng.random() < 0.1:
                node = rng.choice(unexplored)
                events["random move"] += 1
            else:
                node = max(unexplored, key=lambda child: child.ucb)

        if not node.fully_explored:
            if node.score == -INF:
                events["expanded an unscored node"] += 1
            for path in ref_candidates(node.path, visited, node is root, lo, hi):
                node.children.append(RefNode(path, parent=node))
            if node.children:
                node = rng.choice(sorted(node.children, key=lambda child: child.path))
            else:
                node.fully_explored = True
                events["no legal child"] += 1

        if node.score == -INF:
            score = evaluate(node.path)
            node.score = score
        else:
            events["nothing evaluated"] += 1
            if score != node.score:
                events["stale score differs from the node's"] += 1

        while node:
            node.visits += 1
            node.total_score += score
            node.ucb = (
                node.total_score / node.visits
                - 5 * len(node.path) / depth
                + math.sqrt(2 * math.log(root.visits + 1) / node.visits)
            )
            if node.children and all(child.fully_explored for child in node.children):
                node.fully_explored = True
            node = node.parent

    all_nodes, queue = [], [root]
    while queue:
        node = queue.pop(0)
        all_nodes.append(node)
        queue.extend(node.children)
    scored = [node for node in all_nodes if node.score != -INF]
    ranked = sorted(scored, key=lambda node: (node.score, -len(node.path)), reverse=True)
    valid = [node.path for node in ranked if node.score == 1.0]
    invalid = [node.path for node in ranked if node.score == 0.0]
    return evaluated, valid, invalid


# --------------------------------------------------------------------------- scorers


def _byte(question_id: str, program) -> int:
    return hashlib.sha256(f"{question_id}|{list(program)}".encode()).digest()[0]


def rule(kind: str, depth: int):
    """A deterministic reward rule ``(question_id, program) -> bool``."""
    if kind == "all wrong":
        return lambda qid, p: False
    if kind == "all right":
        return lambda qid, p: True
    if kind == "shorter right":
        return lambda qid, p: len(p) <= depth - 2
    if kind == "hash, varied rates":  # q0 rarely right, later questions more often
        return lambda qid, p: _byte(qid, p) < 20 + 47 * (int(qid[1:]) % 5)
    if kind == "hash, shorter likelier":
        return lambda qid, p: _byte(qid, p) < 40 + 25 * max(0, depth - len(p))
    raise ValueError(kind)


class RuleScorer:
    """Scores by a rule; records every call (one list of (question id, program) per call)."""

    def __init__(self, correct) -> None:
        self.correct = correct
        self.calls: list[list[tuple[str, tuple[int, ...]]]] = []

    def score(self, questions, programs):
        self.calls.append([(q.id, tuple(p)) for q, p in zip(questions, programs)])
        return [O(self.correct(q.id, p)) for q, p in zip(questions, programs)]

    def asked(self, question_id: str) -> list[tuple[int, ...]]:
        return [p for call in self.calls for qid, p in call if qid == question_id]


def strip_timing(samples):
    out = copy.deepcopy(samples)
    for s in out:
        s["search"].pop("seconds", None)
        s.pop("index", None)
    return out


# --------------------------------------------------------------------------- equivalence


KINDS = ("hash, varied rates", "hash, shorter likelier", "shorter right", "all wrong", "all right")
MODELS = {24: "Qwen/Qwen1.5-MoE-A2.7B-Chat", 28: "meta-llama/Llama-3.2-3B-Instruct", 36: "Qwen/Qwen3-8B"}


def _cases() -> list[tuple[int, int, str]]:
    rng = random.Random(2024)
    cases = [(24, 30, "all wrong"), (36, 100, "all right"), (28, 100, "shorter right"), (36, 30, "hash, varied rates")]
    for kind in KINDS:
        cases.append((rng.randint(24, 36), rng.randint(30, 100), kind))
    return cases


def _assert_same_as_reference(depth, sims, kind, n_questions, max_active, config=None, model=None,
                              events=None) -> list[dict]:
    config = config or SearchConfig(num_simulations=sims)
    model = model or MODELS.get(depth, "some-model")
    lo, hi = length_bounds(model, depth, config)
    correct = rule(kind, depth)
    scorer = RuleScorer(correct)
    qs = questions(n_questions)
    samples = search_many(qs, scorer, depth, config, model_name=model, max_active=max_active)
    assert [s["id"] for s in samples] == [q.id for q in qs]
    assert max(len(call) for call in scorer.calls) <= max_active
    for q, sample in zip(qs, samples):
        evaluated, valid, invalid = reference_mcts(depth, lo, hi, lambda p: correct(q.id, p), sims, events)
        assert scorer.asked(q.id) == evaluated, f"{q.id}: evaluation order differs from the release"
        assert sample["final_valid_transitions"] == valid, f"{q.id}: valid list differs"
        assert sample["final_invalid_transitions"] == invalid, f"{q.id}: invalid list differs"
        assert sample["initial_score"] == (1.0 if correct(q.id, list(range(depth))) else 0.0)
        assert sample["search"]["programs_evaluated"] == len(evaluated)
        assert sample["search"]["simulations"] == sims
        assert sample["search"]["free_steps"] == sims + 1 - len(evaluated)
        assert sample["search"]["tree_policy"] == "release"
    return samples


@pytest.mark.parametrize("depth,sims,kind", _cases())
def test_batched_search_evaluates_and_writes_exactly_what_the_release_does(depth, sims, kind):
    events = Counter()
    samples = _assert_same_as_reference(depth, sims, kind, n_questions=7, max_active=3, events=events)
    assert events["random move"] > 0  # the epsilon branch is exercised
    # the release goes deep: some program is several edits away from the full depth
    programs = [p for s in samples for p in s["final_valid_transitions"] + s["final_invalid_transitions"]]
    assert min(len(p) for p in programs) <= depth - 4 or kind in ("all right", "all wrong")


def test_small_spaces_hit_dead_ends_and_the_stale_score():
    """Tight bounds exhaust subtrees: nodes without legal children, walks that evaluate nothing and
    backpropagate the last evaluated reward -- all as the release does."""
    events = Counter()
    for depth, lo, hi, sims in ((4, 3, 5, 60), (5, 3, 6, 80), (6, 5, 7, 100), (3, 2, 3, 30), (4, 4, 4, 10)):
        config = SearchConfig(num_simulations=sims, min_length=lo, max_length=hi)
        for kind in KINDS:
            _assert_same_as_reference(depth, sims, kind, n_questions=5, max_active=2, config=config, events=events)
    for event in ("no legal child", "nothing evaluated", "stale score differs from the node's",
                  "expanded an unscored node", "random move"):
        assert events[event] > 0, event


def test_root_candidates_by_hand_in_the_release_order():
    """The candidate order decides which child the RNG picks: check it on its own, by hand."""
    visited = {(0, 1, 2)}
    kids = release_children((0, 1, 2), True, visited, (1, 6), SearchConfig())
    # position 0: skip 1, skip 2, (skip 3 is empty), repeat 1, repeat blocks of 2 and 3;
    # position 1: skip 1, skip 2, repeat 1, repeat block of 2; position 2: skip 1, repeat 1
    assert kids == [(1, 2), (2,), (0, 0, 1, 2), (0, 1, 0, 1, 2), (0, 1, 2, 0, 1, 2),
                    (0, 2), (0,), (0, 1, 1, 2), (0, 1, 2, 1, 2),
                    (0, 1), (0, 1, 2, 2)]
    assert visited == {(0, 1, 2), *kids}
    # nothing already in the tree comes back, and a layer never runs three times
    assert release_children((0, 0, 1), False, visited | {(0, 1)}, (1, 6), SearchConfig()) == [(0, 0), (0, 0, 1, 1)]


def test_a_question_does_not_depend_on_its_batch_neighbours():
    config = SearchConfig(num_simulations=40)
    qs = questions(6)
    correct = rule("hash, varied rates", 28)
    batched = search_many(qs, RuleScorer(correct), 28, config, model_name=MODELS[28], max_active=4)
    alone = [search_many([q], RuleScorer(correct), 28, config, model_name=MODELS[28])[0] for q in qs]
    assert strip_timing(batched) == strip_timing(alone)
    # the same reward rule gives every question the same tree: the release reseeds per question
    same = search_many(qs[:3], RuleScorer(lambda qid, p: len(p) < 26), 28, config, model_name=MODELS[28])
    assert same[0]["final_valid_transitions"] == same[1]["final_valid_transitions"] == same[2]["final_valid_transitions"]


def test_seed_is_the_release_s_42_and_changes_the_search():
    correct = rule("hash, shorter likelier", 30)
    default = search_many(questions(2), RuleScorer(correct), 30, SearchConfig(num_simulations=30))
    explicit = search_many(questions(2), RuleScorer(correct), 30, SearchConfig(num_simulations=30, seed=42))
    other = search_many(questions(2), RuleScorer(correct), 30, SearchConfig(num_simulations=30, seed=7))
    assert SearchConfig().seed == 42 and SearchConfig().tree_policy == "release"
    assert strip_timing(default) == strip_timing(explicit) != strip_timing(other)


def test_unknown_tree_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="tree_policy must be one of release, widening"):
        SearchConfig(tree_policy="uct")


# --------------------------------------------------------------------------- widening unchanged


def test_widening_policy_writes_what_it_wrote_before_tree_policy_existed():
    """Pinned digests of the widening search (evaluations, output lists, counters), computed before
    the release policy was added; the widening policy must stay bit-for-bit the same."""
    def digest(depth, model, sims, seed, n, max_active, **extra):
        config = SearchConfig(num_simulations=sims, seed=seed, tree_policy="widening", **extra)
        scorer = HashScorer()
        out = search_many(questions(n), scorer, depth, config, model_name=model, max_active=max_active)
        rows = [[s["id"], s["initial_score"], s["final_valid_transitions"], s["final_invalid_transitions"],
                 s["search"]["simulations"], s["search"]["programs_evaluated"], s["search"]["free_steps"]]
                for s in out]
        return hashlib.sha256(json.dumps([rows, scorer.calls]).encode()).hexdigest()[:16]

    assert digest(12, "x", 25, 0, 5, 2) == "8d72087510158cdf"
    assert digest(30, "HuggingFaceTB/SmolLM2-135M-Instruct", 40, 7, 4, 3) == "c6b6eab099cb42e1"
    assert digest(8, "x", 60, 3, 3, 2, widening=None) == "fb7c23eb565ad985"
    assert digest(3, "x", 50, 0, 2, 1, min_length=2, max_length=3, max_uses_per_layer=1) == "8a7e58677afa0b38"


# --------------------------------------------------------------------------- on disk


D = 28
RELEASE = SearchConfig(num_simulations=30)
WIDENING = SearchConfig(num_simulations=30, tree_policy="widening")


class CrashingScorer(RuleScorer):
    def __init__(self, correct, fail_after_calls: int) -> None:
        super().__init__(correct)
        self.fail_after_calls = fail_after_calls

    def score(self, questions_, programs):
        if len(self.calls) >= self.fail_after_calls:
            raise RuntimeError("injected crash")
        return super().score(questions_, programs)


def _run(task_dir, qs, scorer, config=RELEASE, shard=0, num_shards=1):
    key = {"model_path": "fake", "search": config.as_dict()}
    return run_shard(qs, lambda: (scorer, D), task_dir, key, {"settings": key}, config, MODELS[D],
                     shard=shard, num_shards=num_shards, max_active=2)


def test_release_search_resumes_after_a_crash_and_shards_merge_to_the_same_file(tmp_path):
    qs = questions(5)
    correct = rule("hash, varied rates", D)
    reference = _run(tmp_path / "ref", qs, RuleScorer(correct))["samples"]

    with pytest.raises(RuntimeError, match="injected"):
        _run(tmp_path / "run", qs, CrashingScorer(correct, fail_after_calls=40))
    saved = json.loads(shard_path(tmp_path / "run", 0, 1).read_text())
    assert 0 < len(saved["samples"]) < 5 and not saved["complete"]
    resumed = RuleScorer(correct)
    state = _run(tmp_path / "run", qs, resumed)
    assert state["complete"]
    assert {qid for call in resumed.calls for qid, _ in call}.isdisjoint(s["id"] for s in saved["samples"])
    assert strip_timing(state["samples"]) == strip_timing(reference)

    for shard in (1, 0):
        _run(tmp_path / "two", qs, RuleScorer(correct), shard=shard, num_shards=2)
    merged_one, _ = merge_shards(tmp_path / "ref", plots=False)
    merged_two, _ = merge_shards(tmp_path / "two", plots=False)
    one, two = json.loads(merged_one.read_text()), json.loads(merged_two.read_text())
    assert strip_timing(two["samples"]) == strip_timing(one["samples"])
    assert one["metadata"]["settings"]["search"]["tree_policy"] == "release"


def test_results_of_two_tree_policies_never_mix_in_one_shard(tmp_path):
    qs = questions(2)
    correct = rule("hash, varied rates", D)
    _run(tmp_path, qs, RuleScorer(correct), config=RELEASE)
    with pytest.raises(DataError, match="other settings.*search.tree_policy"):
        _run(tmp_path, qs, RuleScorer(correct), config=WIDENING)
    assert RELEASE.as_dict()["tree_policy"] == "release" and WIDENING.as_dict()["tree_policy"] == "widening"
    # the release policy has no widening: its recorded settings do not pretend otherwise
    assert "widening" not in RELEASE.as_dict() and WIDENING.as_dict()["widening"] == 0.5


# --------------------------------------------------------------------------- CLI


def _cli(*argv) -> int:
    from polar.cli import main

    return main(["search", *map(str, argv)])


def _args(model, out, *extra):
    return ("--model_path", model, "--dataset", "math", "--target_diff", 1, "--limit", 2,
            "--num_simulations", 3, "--max_new_tokens", 2, "--prompt_style", "plain", "--device", "cpu",
            "--no_progress", "--out", out, *extra)


def test_cli_tree_policy_flag_is_recorded_and_guarded(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert _cli(*_args(tiny_model_dir, out)) == 0
    merged = json.loads((out / "tiny-llama" / "dart-math-diff-1" / "merged_mcts_samples.json").read_text())
    search = merged["metadata"]["settings"]["search"]
    assert (search["tree_policy"], search["seed"]) == ("release", 42)
    assert all(s["search"]["tree_policy"] == "release" for s in merged["samples"])

    capsys.readouterr()
    assert _cli(*_args(tiny_model_dir, out, "--tree_policy", "widening")) == 2  # same --out, other policy
    assert "other settings (search." in capsys.readouterr().err
    assert _cli(*_args(tiny_model_dir, tmp_path / "w", "--widening", "0.3")) == 2
    assert "--widening applies only to --tree_policy widening" in capsys.readouterr().err
    assert _cli(*_args(tiny_model_dir, tmp_path / "w", "--tree_policy", "widening", "--widening", "0")) == 0
    merged = json.loads((tmp_path / "w" / "tiny-llama" / "dart-math-diff-1" / "merged_mcts_samples.json").read_text())
    assert merged["metadata"]["settings"]["search"]["tree_policy"] == "widening"
    assert merged["metadata"]["settings"]["search"]["widening"] is None


# --------------------------------------------------------------------------- host cost of the tree policy


def _children_by_full_check(program, is_root, visited, bounds, config):
    """Candidates in the release's order, every one checked in full (what the incremental use
    counts of ``release_children`` must reproduce)."""
    lo, hi = bounds
    sizes = range(1, (config.max_block if is_root else 1) + 1)
    kept = []
    for i in range(len(program)):
        candidates = [program[:i] + program[i + s:] for s in sizes if i + s <= len(program)]
        candidates += [program[:i + s] + program[i:i + s] + program[i + s:] for s in sizes if i + s <= len(program)]
        for child in candidates:
            fits = not child or max(Counter(child).values()) <= config.max_uses_per_layer
            if child and lo <= len(child) <= hi and child not in visited and fits:
                visited.add(child)
                kept.append(child)
    return kept


def test_incremental_use_counts_keep_exactly_the_fully_checked_children():
    rng = random.Random()
    for _ in range(300):
        depth = rng.randrange(1, 12)
        program = list(range(depth))
        for _ in range(rng.randrange(0, 4)):  # repeats, possibly beyond the use limit
            i = rng.randrange(len(program))
            program.insert(i, program[i])
        program = tuple(program)
        config = SearchConfig(max_uses_per_layer=rng.choice([1, 2, 3]), max_block=rng.choice([1, 2, 4]))
        lo = rng.randrange(0, len(program) + 1)
        bounds = (lo, lo + rng.randrange(0, 8))
        visited = {program} | {tuple(rng.sample(program, rng.randrange(len(program) + 1))) for _ in range(5)}
        is_root = rng.random() < 0.5
        expected = _children_by_full_check(program, is_root, set(visited), bounds, config)
        assert release_children(program, is_root, set(visited), bounds, config) == expected, (program, config, bounds)


def test_search_pauses_automatic_collection_only_while_it_runs():
    import gc

    for enabled in (True, False):
        (gc.enable if enabled else gc.disable)()
        try:
            seen = []

            class Probe(HashScorer):
                def score(self, qs, programs):
                    seen.append(gc.isenabled())
                    return super().score(qs, programs)

            search_many(questions(3), Probe(), 6, SearchConfig(num_simulations=4))
            assert seen and not any(seen), "collection is paused inside the search"
            assert gc.isenabled() == enabled, "and restored afterwards"
        finally:
            gc.enable()


def test_collection_left_on_gives_the_same_search():
    import gc

    seen = []

    class Probe(HashScorer):
        def score(self, qs, programs):
            seen.append(gc.isenabled())
            return super().score(qs, programs)

    config = SearchConfig(num_simulations=12)
    paused = search_many(questions(5), HashScorer(), 8, config)
    running = search_many(questions(5), Probe(), 8, config, pause_collection=False)
    assert seen and all(seen), "the collector runs inside the search"
    assert [s["final_valid_transitions"] for s in running] == [s["final_valid_transitions"] for s in paused]
    assert [s["final_invalid_transitions"] for s in running] == [s["final_invalid_transitions"] for s in paused]


def test_sparse_collections_bound_the_time_spent_collecting(monkeypatch):
    import gc

    from polar import search

    calls = []
    monkeypatch.setattr(gc, "collect", lambda *a: calls.append(1))
    clock = [0.0]
    monkeypatch.setattr(search.time, "perf_counter", lambda: clock[0])
    sparse = search._SparseCollections(min_interval=10.0, max_share=0.5)
    for t in (1.0, 9.0):
        clock[0] = t
        sparse.after_round()
    assert not calls, "no collection before min_interval"
    clock[0] = 10.0
    sparse.after_round()
    assert len(calls) == 1
    sparse.duration = 8.0  # a slow collection: the next waits duration / max_share = 16 s
    for t in (21.0, 25.0):
        clock[0] = t
        sparse.after_round()
    assert len(calls) == 1
    clock[0] = 26.0
    sparse.after_round()
    assert len(calls) == 2
