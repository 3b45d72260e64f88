"""MCTS program search: moves, selection, lockstep batching, resume, shards (SPEC 5)."""

from __future__ import annotations

import copy
import hashlib
import json
import time
import math
import random
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from polar.errors import DataError
from polar.data import model_dir_name
from polar.search import (
    MERGED_NAME,
    Node,
    SearchConfig,
    backpropagate,
    is_legal,
    legal_children,
    length_bounds,
    merge_shards,
    question_search,
    run_shard,
    search_many,
    select_child,
    shard_path,
    sort_programs,
    summarize,
    task_name,
    ucb,
)


@dataclass
class Q:
    id: str
    question: str
    answer: str


@dataclass
class O:
    correct: bool


def hash_correct(question_id: str, program) -> bool:
    """Deterministic pseudo-correctness; shorter programs are a bit more often right."""
    h = hashlib.sha256(f"{question_id}|{list(program)}".encode()).digest()[0]
    return h < 70 + 6 * max(0, 12 - len(program))


class HashScorer:
    """Fake scorer: correctness is a hash of (question, program). Records every call."""

    def __init__(self, fail_after_calls: int | None = None) -> None:
        self.calls: list[list[tuple[str, tuple[int, ...]]]] = []
        self.fail_after_calls = fail_after_calls

    def score(self, questions, programs):
        if self.fail_after_calls is not None and len(self.calls) >= self.fail_after_calls:
            raise RuntimeError("injected crash")
        self.calls.append([(q.id, tuple(p)) for q, p in zip(questions, programs)])
        return [O(hash_correct(q.id, p)) for q, p in zip(questions, programs)]

    @property
    def pairs(self) -> int:
        return sum(len(c) for c in self.calls)


def questions(n: int) -> list[Q]:
    return [Q(f"q{i}", f"What is {i}+{i}?", str(2 * i)) for i in range(n)]


def strip_timing(samples):
    out = copy.deepcopy(samples)
    for s in out:
        s["search"].pop("seconds", None)
    return out


D = 12
SMALL = SearchConfig(num_simulations=15)  # the release's tree policy (the default)
SMALL_WIDENING = SearchConfig(num_simulations=15, tree_policy="widening")


# --------------------------------------------------------------------------- bounds


def test_paper_models_use_paper_bounds_and_others_scale_from_llama():
    assert length_bounds("meta-llama/Llama-3.2-3B-Instruct", 28) == (16, 32)
    assert length_bounds("Qwen/Qwen2.5-3B-Instruct", 36) == (24, 44)
    assert length_bounds("Qwen/Qwen3-8B", 36) == (24, 44)
    assert length_bounds("Qwen/Qwen1.5-MoE-A2.7B-Chat", 24) == (16, 28)
    # SmolLM2: 30 layers -> round(30*16/28)=17, round(30*32/28)=34
    assert length_bounds("HuggingFaceTB/SmolLM2-135M-Instruct", 30) == (17, 34)
    # a Llama-3.2-3B name with another depth is not the paper model
    assert length_bounds("my-llama-3.2-3b-pruned", 20) == (11, 23)
    assert length_bounds("x", 30, SearchConfig(min_length=20, max_length=31)) == (20, 31)
    with pytest.raises(ValueError):
        length_bounds("x", 30, SearchConfig(min_length=10, max_length=5))


# --------------------------------------------------------------------------- moves


def test_root_children_of_a_five_layer_model_by_hand():
    kids = legal_children(range(5), True, (1, 20), SearchConfig())
    # skips: 5 + 4 + 3 + 2 blocks, duplications: the same count; all distinct
    assert len(kids) == 28
    assert (0, 3, 4) in kids  # skip block [1,2]
    assert (0, 1, 2, 1, 2, 3, 4) in kids  # duplicate block [1,2]
    assert (4,) in kids and (0,) in kids  # skip block [0..3] / [1..4]
    assert min(map(len, kids)) == 1 and max(map(len, kids)) == 9  # blocks of 4 at most


def test_deeper_children_by_hand():
    kids = set(legal_children((0, 1, 1, 2), False, (1, 10), SearchConfig()))
    # [0,1,1,1,2] would run layer 1 three times; skipping either copy of 1 gives the same program
    assert kids == {(1, 1, 2), (0, 1, 2), (0, 1, 1), (0, 0, 1, 1, 2), (0, 1, 1, 2, 2)}


def test_length_bounds_prune_children():
    kids = legal_children(range(6), True, (5, 7), SearchConfig())
    assert {len(k) for k in kids} == {5, 7}


def _random_walk(data, num_layers: int, bounds, config) -> tuple[int, ...]:
    program = tuple(range(num_layers))
    depth = data.draw(st.integers(0, 6))
    for level in range(depth):
        kids = legal_children(program, level == 0, bounds, config)
        if not kids:
            break
        program = kids[data.draw(st.integers(0, len(kids) - 1))]
    return program


@settings(max_examples=150, deadline=None)
@given(st.data(), st.integers(2, 20), st.integers(1, 4), st.integers(1, 3))
def test_every_child_obeys_every_constraint(data, num_layers, max_block, max_uses):
    lo = data.draw(st.integers(1, num_layers))
    hi = data.draw(st.integers(num_layers, 2 * num_layers))
    config = SearchConfig(max_block=max_block, max_uses_per_layer=max_uses)
    parent = _random_walk(data, num_layers, (lo, hi), config)
    is_root = parent == tuple(range(num_layers)) and data.draw(st.booleans())
    kids = legal_children(parent, is_root, (lo, hi), config)
    assert len(kids) == len(set(kids))
    for kid in kids:
        assert lo <= len(kid) <= hi
        assert all(kid.count(layer) <= max_uses for layer in set(kid))
        assert all(0 <= layer < num_layers for layer in kid)
        if is_root:
            # exactly one contiguous block of 1..max_block positions removed or copied after itself
            assert _is_block_skip(parent, kid, max_block) or _is_block_copy(parent, kid, max_block)
        else:
            assert abs(len(kid) - len(parent)) == 1
            assert _is_block_skip(parent, kid, 1) or _is_block_copy(parent, kid, 1)


def _is_block_skip(parent, kid, max_block) -> bool:
    k = len(parent) - len(kid)
    return 1 <= k <= max_block and any(parent[:i] + parent[i + k:] == kid for i in range(len(parent) - k + 1))


def _is_block_copy(parent, kid, max_block) -> bool:
    k = len(kid) - len(parent)
    return 1 <= k <= max_block and any(
        parent[: i + k] + parent[i : i + k] + parent[i + k :] == kid for i in range(len(parent) - k + 1)
    )


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), st.integers(4, 16), st.integers(0, 40), st.sampled_from(("release", "widening")))
def test_search_evaluates_each_program_once_and_only_legal_ones(seed, num_layers, sims, policy):
    config = SearchConfig(num_simulations=sims, seed=seed, tree_policy=policy)
    bounds = length_bounds("x", num_layers, config)
    scorer = HashScorer()
    [sample] = search_many([Q("a", "?", "1")], scorer, num_layers, config)
    evaluated = [p for call in scorer.calls for _, p in call]
    assert len(evaluated) == len(set(evaluated))
    assert evaluated[0] == tuple(range(num_layers))  # the root comes first
    assert all(is_legal(p, bounds, config.max_uses_per_layer) for p in evaluated)
    assert len(evaluated) <= 1 + sims
    assert sample["search"]["programs_evaluated"] == len(evaluated)
    valid = sample["final_valid_transitions"]
    invalid = sample["final_invalid_transitions"]
    assert sorted(map(tuple, valid + invalid)) == sorted(evaluated)
    assert all(hash_correct("a", p) for p in valid) and not any(hash_correct("a", p) for p in invalid)
    if policy == "widening":  # the budget counts new programs; lists shortest first, then by value
        assert sample["search"]["simulations"] == len(evaluated) - 1
        assert valid == sort_programs(valid) and invalid == sort_programs(invalid)
    else:  # the budget counts iterations, some of which may evaluate nothing; lists shortest first
        assert sample["search"]["simulations"] == sims
        assert sample["search"]["free_steps"] == sims + 1 - len(evaluated)
        for programs in (valid, invalid):
            assert [len(p) for p in programs] == sorted(len(p) for p in programs)
    assert sample["initial_score"] == float(hash_correct("a", range(num_layers)))


def test_widening_budget_counts_new_evaluations():
    scorer = HashScorer()
    [sample] = search_many([Q("a", "?", "1")], scorer, 10, SearchConfig(num_simulations=30, tree_policy="widening"))
    assert sample["search"]["programs_evaluated"] == 31
    assert len(scorer.calls) == 31  # one program per round when searching one question


def test_exhausted_space_ends_the_search():
    # 3 layers, lengths 2..3 only, each layer once: root + 3 single skips are all there is.
    config = SearchConfig(num_simulations=50, min_length=2, max_length=3, max_uses_per_layer=1,
                          tree_policy="widening")
    scorer = HashScorer()
    [sample] = search_many([Q("a", "?", "1")], scorer, 3, config)
    # root skips of one layer: [1,2], [0,2], [0,1]; larger blocks give length 1 (out of bounds),
    # copies break max_uses; below them, skipping gives length 1 and repeating breaks max_uses.
    assert sample["search"]["programs_evaluated"] == 4
    assert sample["search"]["simulations"] == 3
    assert sample["search"]["free_steps"] >= config.max_free_steps  # gave up after 200 idle walks

    # the release's policy runs all 50 iterations; 47 of them end on an already scored node
    # (e.g. the second: it descends to the one scored child, which has no legal child) and
    # evaluate nothing
    release = SearchConfig(num_simulations=50, min_length=2, max_length=3, max_uses_per_layer=1)
    [sample] = search_many([Q("a", "?", "1")], HashScorer(), 3, release)
    assert sample["search"]["programs_evaluated"] == 4
    assert (sample["search"]["simulations"], sample["search"]["free_steps"]) == (50, 47)


# --------------------------------------------------------------------------- selection / UCB


def test_ucb_by_hand():
    parent = Node((0, 1, 2, 3), 1.0, visits=10, value=6.0)
    child = Node((0, 1, 2), 1.0, parent=parent, visits=4, value=2.0)
    # 0.5 - 5*3/4 + sqrt(2)*sqrt(ln(11)/4) = 0.5 - 3.75 + 1.4142136*0.7742571 = 0.5 - 3.75 + 1.0949647
    assert ucb(child, parent.visits, 4, SearchConfig()) == pytest.approx(-2.1550353, abs=1e-6)


def test_selection_prefers_best_ucb_and_explores_with_epsilon():
    root = Node((0, 1, 2, 3), 1.0, visits=3, value=2.0)
    a = Node((0, 1, 2), 1.0, parent=root, visits=1, value=1.0)  # 1 - 3.75 + 1.6651 = -1.0849
    b = Node((0, 1, 2, 3, 3), 0.0, parent=root, visits=1, value=0.0)  # 0 - 6.25 + 1.6651
    c = Node((0, 2, 3), 0.0, parent=root, visits=1, value=0.0)  # 0 - 3.75 + 1.6651 = -2.0849
    root.children = [b, c, a]
    greedy = SearchConfig(epsilon=0.0)
    assert ucb(a, 3, 4, greedy) == pytest.approx(1 - 3.75 + math.sqrt(2) * math.sqrt(math.log(4)))
    assert select_child(root, random.Random(0), 4, greedy) is a
    # a well-visited but poor child loses to a shorter, less visited one
    a.visits, a.value = 50, 0.0
    root.visits = 53
    assert select_child(root, random.Random(0), 4, greedy) is c
    # epsilon = 1: always random, and every child gets picked
    rng = random.Random(1)
    picks = {id(select_child(root, rng, 4, SearchConfig(epsilon=1.0))) for _ in range(60)}
    assert picks == {id(a), id(b), id(c)}


def test_backpropagation_updates_the_whole_path():
    root = Node((0, 1), 1.0)
    child = Node((0,), 0.0, parent=root)
    leaf = Node((0, 0), 1.0, parent=child)
    backpropagate(leaf, 1.0)
    assert (root.visits, root.value, child.visits, child.value, leaf.visits) == (1, 1.0, 1, 1.0, 1)


def test_search_with_known_rewards_finds_the_short_valid_programs():
    """Only programs of length <= D-3 are correct; the length penalty should steer search there."""

    class ShortIsRight:
        def score(self, qs, ps):
            return [O(len(p) <= D - 3) for p in ps]

    [sample] = search_many([Q("a", "?", "1")], ShortIsRight(), D, SearchConfig(num_simulations=40))
    assert sample["initial_score"] == 0.0
    assert len(sample["final_valid_transitions"]) >= 10
    assert all(len(p) <= D - 3 for p in sample["final_valid_transitions"])


def test_generator_protocol_yields_root_first():
    gen = question_search("q", 5, (1, 10), SearchConfig(num_simulations=2, tree_policy="widening"))
    assert next(gen) == [0, 1, 2, 3, 4]
    second = gen.send(1.0)
    third = gen.send(0.0)
    with pytest.raises(StopIteration) as stop:
        gen.send(1.0)
    result = stop.value.value
    assert result.rewards == {(0, 1, 2, 3, 4): 1.0, tuple(second): 0.0, tuple(third): 1.0}
    assert result.initial_score == 1.0


# --------------------------------------------------------------------------- lockstep


@pytest.mark.parametrize("config", [SMALL, SMALL_WIDENING], ids=["release", "widening"])
def test_lockstep_batching_equals_searching_each_question_alone(config):
    qs = questions(7)
    batched_scorer = HashScorer()
    batched = search_many(qs, batched_scorer, D, config, max_active=3)
    alone = [search_many([q], HashScorer(), D, config)[0] for q in qs]
    for s in alone:
        s.pop("index")
    for s in batched:
        s.pop("index")
    assert strip_timing(batched) == strip_timing(alone)
    # every scorer call holds one program from each active question, never two of one question
    assert max(len(c) for c in batched_scorer.calls) == 3
    assert all(len({qid for qid, _ in c}) == len(c) for c in batched_scorer.calls)
    assert batched_scorer.pairs == sum(s["search"]["programs_evaluated"] for s in batched)


def test_all_questions_in_one_round_make_one_call_per_simulation():
    qs = questions(5)
    scorer = HashScorer()
    search_many(qs, scorer, D, SMALL_WIDENING)
    assert len(scorer.calls) == 1 + SMALL_WIDENING.num_simulations
    assert len(scorer.calls[0]) == 5
    # the release's policy: one call per evaluating iteration, at most one per iteration
    scorer = HashScorer()
    samples = search_many(qs, scorer, D, SMALL)
    assert len(scorer.calls) == max(s["search"]["programs_evaluated"] for s in samples) <= 1 + SMALL.num_simulations
    assert len(scorer.calls[0]) == 5


@pytest.mark.parametrize("policy", ["release", "widening"])
def test_seed_changes_the_search_but_is_reproducible(policy):
    q = [Q("z", "?", "1")]
    a = search_many(q, HashScorer(), D, SearchConfig(num_simulations=20, seed=1, tree_policy=policy))
    b = search_many(q, HashScorer(), D, SearchConfig(num_simulations=20, seed=1, tree_policy=policy))
    c = search_many(q, HashScorer(), D, SearchConfig(num_simulations=20, seed=2, tree_policy=policy))
    assert strip_timing(a) == strip_timing(b)
    assert strip_timing(a) != strip_timing(c)


# --------------------------------------------------------------------------- summary


def test_summary_by_hand():
    samples = [
        {"initial_score": 1.0, "final_valid_transitions": [[0, 2], [0, 1, 2]], "search": {"programs_evaluated": 5}},
        {"initial_score": 1.0, "final_valid_transitions": [[0, 1, 2]], "search": {"programs_evaluated": 3}},
        {"initial_score": 0.0, "final_valid_transitions": [[1]], "search": {"programs_evaluated": 4}},
        {"initial_score": 0.0, "final_valid_transitions": [], "search": {"programs_evaluated": 2}},
    ]
    s = summarize(samples, 3)
    assert s["base_accuracy"] == 0.5
    assert s["oracle_accuracy"] == 0.75
    assert s["correct_with_shorter_valid"] == 0.5
    assert s["wrong_fixed"] == 0.5
    assert s["mean_shortest_valid_length"] == pytest.approx((2 + 3 + 1) / 3, abs=1e-3)
    assert s["programs_evaluated"] == 14


# --------------------------------------------------------------------------- on disk


KEY = {"model_path": "fake", "search": SMALL.as_dict()}


def _run(tmp_path, qs, scorer, shard=0, num_shards=1, key=KEY, max_active=2):
    return run_shard(qs, lambda: (scorer, D), tmp_path, key, {"settings": {"model": "fake"}}, SMALL,
                     "fake", shard=shard, num_shards=num_shards, max_active=max_active)


def test_resume_after_crash_loses_nothing_and_redoes_nothing(tmp_path):
    qs = questions(6)
    reference = _run(tmp_path / "ref", qs, HashScorer())["samples"]

    crashing = HashScorer(fail_after_calls=40)  # 2 active questions x 16 rounds each: dies in pair 3
    with pytest.raises(RuntimeError, match="injected"):
        _run(tmp_path / "run", qs, crashing)
    saved = json.loads(shard_path(tmp_path / "run", 0, 1).read_text())
    assert not saved["complete"]
    done = {s["id"] for s in saved["samples"]}
    assert done == {"q0", "q1", "q2", "q3"}

    resumed_scorer = HashScorer()
    state = _run(tmp_path / "run", qs, resumed_scorer)
    assert state["complete"]
    asked = {qid for call in resumed_scorer.calls for qid, _ in call}
    assert asked == {"q4", "q5"}  # finished questions are never redone
    assert resumed_scorer.pairs == sum(s["search"]["programs_evaluated"] for s in reference if s["id"] in asked)
    assert strip_timing(state["samples"]) == strip_timing(reference)

    # a third run finds nothing to do and does not even build a scorer
    def no_scorer():
        raise AssertionError("nothing left to do, the model must not be loaded")

    run_shard(qs, no_scorer, tmp_path / "run", KEY, {}, SMALL, "fake", max_active=2)


def test_time_limit_finishes_questions_in_flight_then_merges_what_is_done(tmp_path):
    qs = questions(6)

    class SlowScorer(HashScorer):
        def score(self, questions_, programs):
            time.sleep(0.01)
            return super().score(questions_, programs)

    state = run_shard(qs, lambda: (SlowScorer(), D), tmp_path, KEY, {"settings": {}}, SMALL, "fake",
                      max_active=2, time_limit=0.005)
    assert not state["complete"] and [s["id"] for s in state["samples"]] == ["q0", "q1"]
    merged, summary = merge_shards(tmp_path, 1, plots=False, partial=True)
    data = json.loads(merged.read_text())
    assert summary["questions"] == 2 and data["metadata"]["partial"]["questions_done"] == 2
    assert merge_shards(tmp_path, 1, plots=False) is None  # not complete: no merge without partial
    resumed = _run(tmp_path, qs, HashScorer())  # a rerun without the limit continues
    assert resumed["complete"] and len(resumed["samples"]) == 6


def test_resume_with_other_settings_is_a_clear_error(tmp_path):
    qs = questions(2)
    _run(tmp_path, qs, HashScorer())
    other = {"model_path": "fake", "search": SearchConfig(num_simulations=99).as_dict()}
    with pytest.raises(DataError, match=r"other settings \(search.num_simulations: 15 there, 99 now\)"):
        _run(tmp_path, qs, HashScorer(), key=other)


def test_shards_merge_into_the_unsharded_result(tmp_path):
    qs = questions(7)
    _run(tmp_path / "one", qs, HashScorer())
    merged_one, summary_one = merge_shards(tmp_path / "one")

    assert _run(tmp_path / "three", qs, HashScorer(), shard=1, num_shards=3)["questions"] == 2  # q1, q4
    assert merge_shards(tmp_path / "three", 3) is None  # shards 0 and 2 still missing
    for shard in (2, 0):
        _run(tmp_path / "three", qs, HashScorer(), shard=shard, num_shards=3)
    merged_three, summary_three = merge_shards(tmp_path / "three")

    one = json.loads(merged_one.read_text())
    three = json.loads(merged_three.read_text())
    assert merged_three.name == MERGED_NAME
    assert [s["id"] for s in three["samples"]] == [q.id for q in qs]
    assert strip_timing(three["samples"]) == strip_timing(one["samples"])
    for key in ("base_accuracy", "oracle_accuracy", "wrong_fixed", "programs_evaluated"):
        assert summary_one[key] == summary_three[key]
    assert (tmp_path / "three" / "valid_program_lengths.png").stat().st_size > 1000
    assert (tmp_path / "three" / "layer_heatmap.png").stat().st_size > 1000


def test_merge_refuses_mixed_shard_counts(tmp_path):
    qs = questions(3)
    _run(tmp_path, qs, HashScorer(), shard=0, num_shards=2)
    _run(tmp_path, qs, HashScorer(), shard=0, num_shards=1)
    with pytest.raises(DataError, match="several shard counts"):
        merge_shards(tmp_path)


def test_output_directory_names(tmp_path):
    assert model_dir_name("meta-llama/Llama-3.2-3B-Instruct") == "meta-llama/Llama-3.2-3B-Instruct"
    gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.write_bytes(b"x")
    assert model_dir_name(str(gguf)) == "SmolLM2-135M-Instruct.Q4_1"
    (tmp_path / "my-model").mkdir()
    assert model_dir_name(str(tmp_path / "my-model") + "/") == "my-model"
    assert task_name("math", 3) == "dart-math-diff-3"
    assert task_name("dart", 1) == "dart-math-diff-1"
    assert task_name("gsm8k", None) == "gsm8k"
    with pytest.raises(ValueError):
        task_name("dart", None)


def test_shard_flag_and_torchrun_environment():
    from polar.distributed import parse_shard

    assert parse_shard("2/8", {}) == (2, 8)
    assert parse_shard(None, {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3"}) == (3, 4)
    assert parse_shard(None, {}) == (0, 1)
    for bad in ("8/8", "x", "1/0"):
        with pytest.raises(ValueError):
            parse_shard(bad, {})


# --------------------------------------------------------------------------- CLI, tiny real model


def _cli(*argv) -> int:
    from polar.cli import main

    return main(["search", *map(str, argv)])


def _search_args(model, out, *extra):
    return ("--model_path", model, "--dataset", "math", "--target_diff", 1, "--limit", 3,
            "--num_simulations", 3, "--max_new_tokens", 3, "--prompt_style", "plain", "--device", "cpu",
            "--no_progress", "--out", out, *extra)


def test_cli_search_writes_release_format_and_resumes(tiny_model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    assert _cli(*_search_args(tiny_model_dir, out)) == 0
    task = out / "tiny-llama" / "dart-math-diff-1"
    merged = json.loads((task / MERGED_NAME).read_text())
    settings = merged["metadata"]["settings"]
    assert (settings["model_path"], settings["max_new_tokens"], settings["prompt_style"]) == (
        str(tiny_model_dir), 3, "plain")
    assert settings["search"]["num_simulations"] == 3 and settings["num_layers"] == 6
    assert "program_semantics" in merged["metadata"] and "versions" in merged["metadata"]
    assert len(merged["samples"]) == 3
    for sample in merged["samples"]:
        assert sample["question"] and sample["gt_ans"]
        assert sample["initial_score"] in (0.0, 1.0)
        assert sample["search"]["programs_evaluated"] == 4
        programs = sample["final_valid_transitions"] + sample["final_invalid_transitions"]
        assert [0, 1, 2, 3, 4, 5] in programs and len(programs) == 4
    summary = json.loads((task / "summary.json").read_text())["summary"]
    assert summary["questions"] == 3 and summary["programs_evaluated"] == 12
    assert summary["programs_per_second"] > 0
    assert (task / "valid_program_lengths.png").exists() and (task / "layer_heatmap.png").exists()
    assert "base_accuracy" in capsys.readouterr().out

    try:  # the supervision loader of training must accept the file
        from polar.data import load_samples
    except ImportError:
        load_samples = None
    if load_samples is not None:
        assert len(load_samples(task / MERGED_NAME)) == 3

    # rerun: all done, so the model is not even loaded, and the output is unchanged
    import polar.engine

    def no_load(*a, **k):
        raise AssertionError("resume must not redo finished questions")

    monkeypatch.setattr(polar.engine.ProgramRunner, "from_pretrained", no_load)
    assert _cli(*_search_args(tiny_model_dir, out)) == 0
    again = json.loads((task / MERGED_NAME).read_text())
    assert again["samples"] == merged["samples"]

    # same output directory, other settings: a clear one-line error
    capsys.readouterr()
    assert _cli(*_search_args(tiny_model_dir, out, "--seed", 5)) == 2
    assert "other settings (search.seed: 42 there, 5 now" in capsys.readouterr().err


def test_cli_shards_then_merge_equal_unsharded(tiny_model_dir, tmp_path, capsys):
    from polar.cli import main

    assert _cli(*_search_args(tiny_model_dir, tmp_path / "one")) == 0
    sharded = tmp_path / "two"
    assert _cli(*_search_args(tiny_model_dir, sharded, "--shard", "1/2")) == 0
    task = sharded / "tiny-llama" / "dart-math-diff-1"
    assert not (task / MERGED_NAME).exists()  # shard 0 is missing
    capsys.readouterr()
    assert main(["merge", "--out", str(sharded), "--model_path", str(tiny_model_dir), "--target_diff", "1"]) == 2
    assert "not every shard" in capsys.readouterr().err
    assert _cli(*_search_args(tiny_model_dir, sharded, "--shard", "0/2")) == 0  # last shard merges
    (task / MERGED_NAME).unlink()
    assert main(["merge", "--out", str(sharded), "--model_path", str(tiny_model_dir), "--target_diff", "1"]) == 0
    one = json.loads((tmp_path / "one" / "tiny-llama" / "dart-math-diff-1" / MERGED_NAME).read_text())
    two = json.loads((task / MERGED_NAME).read_text())
    assert strip_timing(two["samples"]) == strip_timing(one["samples"])


@pytest.mark.slow
def test_tiny_search_on_smollm2_labels_two_questions():
    """End to end on the real model: prompts, engine, answer checking, MCTS, release format."""
    from polar.datasets import load_questions
    from polar.engine import ProgramRunner
    from polar.scoring import ProgramScorer

    runner = ProgramRunner.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct", device="cpu")
    scorer = ProgramScorer(runner, prompt_style="plain", max_new_tokens=20)
    qs = load_questions("math", difficulty=1, limit=2)
    samples = search_many(qs, scorer, runner.num_layers, SearchConfig(num_simulations=3),
                          model_name=runner.model_name)
    assert [s["id"] for s in samples] == [q.id for q in qs]
    bounds = length_bounds(runner.model_name, runner.num_layers)
    for sample in samples:
        programs = sample["final_valid_transitions"] + sample["final_invalid_transitions"]
        assert len(programs) == 4 and list(range(30)) in programs
        assert all(is_legal(p, bounds, 2) for p in programs)
        assert sample["initial_score"] == float(list(range(30)) in sample["final_valid_transitions"])
    # the full-depth outcome agrees with scoring it directly
    direct = scorer.score(qs, [list(range(30))] * 2)
    assert [float(o.correct) for o in direct] == [s["initial_score"] for s in samples]
