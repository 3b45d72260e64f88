"""Speed features never change results: prompt-state reuse, length-planned chunks and prefill
groups, the schedule heuristics, the static-slot decoder with early-exit compaction. Each is
checked against an independent reference (HF's own generation on a physically unrolled copy, a
brute-force optimum) and switched off one at a time on the same inputs."""

from __future__ import annotations

import itertools
import random
import zlib

import pytest
import torch

from conftest import tiny_model
from polar.cuda_engine import CudaGraphDecoder
from polar.engine import ProgramRunner
from polar.schedule import build_schedule, identity_prefix, plan_groups, sweep_order
from test_engine import hf_greedy, random_program, unrolled_copy

D = 6


def _programs(rng: random.Random, n: int) -> list[list[int]]:
    """Near-full-depth programs (as MCTS makes them), some unrelated ones, and full depth."""
    out = [list(range(D))]
    while len(out) < n:
        if rng.random() < 0.6:
            p = list(range(D))
            i = rng.randrange(D)
            if rng.random() < 0.5:
                del p[i]
            else:
                p.insert(i, p[i])
            out.append(p)
        else:
            out.append(random_program(rng))
    return out


def _prompts(rng: random.Random, n: int, longest: int = 40) -> list[list[int]]:
    return [[rng.randrange(4, 97) for _ in range(rng.choice([1, 2, 3, 7, 12, 25, longest]))] for _ in range(n)]


# --------------------------------------------------------------------------- planning


def _brute_force_cost(lengths, unit, cell, fixed, extra):
    widths = sorted({-(-max(n, 1) // unit) * unit for n in lengths})
    count = {w: sum(1 for n in lengths if -(-max(n, 1) // unit) * unit == w) for w in widths}
    best = float("inf")
    for cuts in itertools.product([False, True], repeat=len(widths) - 1):
        cost, rows = 0.0, 0
        for i, w in enumerate(widths):
            rows += count[w]
            if i == len(widths) - 1 or cuts[i]:
                cost += rows * (w + extra) * cell + fixed
                rows = 0
        best = min(best, cost)
    return best


def test_length_groups_minimise_the_padding_cost_model():
    rng = random.Random()
    for _ in range(30):
        lengths = [rng.randrange(1, 300) for _ in range(rng.randrange(1, 40))]
        unit, cell, fixed, extra = rng.choice([8, 16, 64]), 1.0, rng.choice([0.0, 50.0, 2000.0, 1e6]), rng.randrange(60)
        groups = plan_groups(lengths, unit, cell, fixed, extra=extra)
        assert sorted(r for g in groups for r in g) == list(range(len(lengths)))
        cost = sum(len(g) * (-(-max(max(lengths[r] for r in g), 1) // unit) * unit + extra) * cell + fixed for g in groups)
        assert cost == pytest.approx(_brute_force_cost(lengths, unit, cell, fixed, extra))


def test_length_groups_respect_row_and_cell_limits():
    rng = random.Random()
    lengths = [rng.randrange(1, 100) for _ in range(200)]
    for group in plan_groups(lengths, 16, 1.0, 1e9, max_rows=17):
        assert 1 <= len(group) <= 17
    for group in plan_groups(lengths, 16, 1.0, 1e9, max_cells=500):
        assert len(group) == 1 or len(group) * max(lengths[r] for r in group) <= 500


def test_every_schedule_heuristic_runs_each_program_in_order():
    rng = random.Random()
    programs = [random_program(rng) for _ in range(50)] + _programs(rng, 50)
    order = sweep_order(programs)
    for program in programs:
        it = iter(order)
        assert all(layer in it for layer in program), "program is a subsequence of the sweep order"
    steps = build_schedule(programs)
    for r, program in enumerate(programs):
        mine = [(s.layer, s.positions[s.members.index(r)]) for s in steps if r in s.members]
        assert mine == [(layer, k) for k, layer in enumerate(program)]


def test_identity_prefix_counts_leading_full_depth_positions():
    assert identity_prefix([0, 1, 2, 3]) == 4
    assert identity_prefix([0, 1, 1, 2]) == 2
    assert identity_prefix([0, 2, 3]) == 1
    assert identity_prefix([1, 2]) == 0


# --------------------------------------------------------------------------- engine


def _reference(model, prompts, programs, max_new, eos):
    return [hf_greedy(unrolled_copy(model, p), prompt, max_new, eos) for prompt, p in zip(prompts, programs)]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_reused_prompt_states_give_the_unrolled_models_tokens(arch):
    rng = random.Random()
    model = tiny_model(arch, seed=rng.randrange(1000))
    runner = ProgramRunner(model)
    eos = 3
    runner._stop_ids = {eos}
    prompts = _prompts(rng, 4)
    first = _programs(rng, 4)
    runner.generate(prompts, first, max_new_tokens=8)  # fills the prompt cache
    assert len(runner.prompt_cache) == len({tuple(p) for p in prompts})
    second = _programs(rng, 8)[1:] + [[0, 1, 2]]  # new programs, same prompts
    prompts2 = (prompts * 2)[: len(second)]
    hits = runner.prompt_cache.hits
    gens = runner.generate(prompts2, second, max_new_tokens=8)
    assert runner.prompt_cache.hits > hits
    assert [g.token_ids for g in gens] == _reference(model, prompts2, second, 8, eos)


def _variants():
    """(name, how to switch the runner) for every speed feature, one at a time and all off."""
    def off_cache(r):
        r.use_prompt_cache = False

    def off_chunks(r):
        r.length_chunks = False

    def many_groups(r):
        r.prefill_group_tokens = 0
        r.prefill_max_tokens = 16

    def tiny_cache(r):
        r.prompt_cache_bytes = 1  # every prompt refused: rows compute from scratch

    def fast(r):
        r.fast_path = CudaGraphDecoder(r, use_graphs=False)

    def fast_no_cache(r):
        fast(r)
        off_cache(r)

    def all_off(r):
        off_cache(r)
        off_chunks(r)
        r.prefill_group_tokens = 1e12

    return [("default", lambda r: None), ("no prompt cache", off_cache), ("input-order chunks", off_chunks),
            ("many prefill groups", many_groups), ("cache refuses", tiny_cache), ("static slots", fast),
            ("static slots, no cache", fast_no_cache), ("all off", all_off)]


def test_every_speed_feature_can_be_switched_off_without_changing_tokens():
    rng = random.Random()
    seed = rng.randrange(1000)
    prompts = _prompts(rng, 14)
    programs = _programs(rng, 14)
    outputs = {}
    for name, switch in _variants():
        runner = ProgramRunner(tiny_model("llama", seed=seed), max_batch_size=5)
        runner._stop_ids = set()
        switch(runner)
        first = runner.generate(prompts[:7], programs[:7], max_new_tokens=6)  # warm any cache
        gens = runner.generate(prompts, programs, max_new_tokens=6)
        outputs[name] = [g.token_ids for g in first + gens]
    reference = outputs["all off"]
    for name, tokens in outputs.items():
        assert tokens == reference, name


def test_long_and_short_prompts_are_chunked_apart():
    runner = ProgramRunner(tiny_model("llama"), max_batch_size=64)
    lengths = [5] * 40 + [400]
    chunks = runner.plan_chunks(lengths, 8, 64)
    assert sorted(len(c) for c in chunks) == [1, 40]
    runner.length_chunks = False
    assert [len(c) for c in runner.plan_chunks(lengths, 8, 64)] == [41]


def test_prompt_cache_stays_within_its_budget():
    rng = random.Random()
    model = tiny_model("qwen3", seed=rng.randrange(1000))
    runner = ProgramRunner(model)
    runner._stop_ids = set()
    entry = runner.prompt_cache.entry_bytes(64)
    runner.prompt_cache.max_bytes = 6 * entry  # room for a few prompts of one width class
    for _ in range(3):
        prompts = _prompts(rng, 5, longest=30)
        programs = _programs(rng, 5)
        gens = runner.generate(prompts, programs, max_new_tokens=4)
        assert runner.prompt_cache.bytes_allocated <= 6 * entry
        assert [g.token_ids for g in gens] == _reference(model, prompts, programs, 4, -1)
    assert runner.prompt_cache.evictions + runner.prompt_cache.refused > 0


def test_rows_that_stop_early_are_compacted_without_changing_the_others():
    rng = random.Random()
    model = tiny_model("llama", seed=rng.randrange(1000))
    runner = ProgramRunner(model)
    fast = CudaGraphDecoder(runner, use_graphs=False)
    prompts, programs = _prompts(rng, 12), _programs(rng, 12)
    free_run, _ = runner._generate_chunk(prompts, programs, 10, set())
    # the second token of most rows becomes a stop token: buckets shrink from 16 to 4 or less
    stops = {free_run[r][1] for r in range(9)}
    expected = runner._generate_chunk(prompts, programs, 10, stops)
    assert fast.generate_chunk(prompts, programs, 10, stops) == expected
    assert fast.compactions > 0


# --------------------------------------------------------------------------- search


class _WordTokens:
    """A word-level tokenizer over the tiny models' vocabulary."""

    bos_token = None
    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [4 + zlib.crc32(w.encode()) % 90 for w in text.split()]}

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))

    def get_vocab(self):
        return {}


def _hash_verdicts(texts, golds, prompt_style, answer_mode):
    """Rewards that depend on the exact generated text, so any token difference shows."""
    return [(t, zlib.crc32(t.encode()) % 3 == 0) for t in texts]


def _questions(rng: random.Random, n: int = 6):
    from polar.datasets import Question

    return [Question(id=f"q{i}", question=" ".join(str(rng.randrange(100)) for _ in range(rng.randrange(1, 30))),
                     answer="1", source="test") for i in range(n)]


def _search(runner, questions):
    from polar.scoring import ProgramScorer
    from polar.search import SearchConfig, search_many

    scorer = ProgramScorer(runner, max_new_tokens=5, batch_size=4, judge_workers=0)
    samples = search_many(questions, scorer, D, SearchConfig(num_simulations=12), max_active=4)
    for sample in samples:
        sample.get("search", {}).pop("seconds", None)
    return samples


def test_search_writes_the_same_supervision_with_and_without_each_speed_feature(monkeypatch):
    import polar.scoring

    monkeypatch.setattr(polar.scoring, "judge_texts", _hash_verdicts)
    rng = random.Random()
    seed = rng.randrange(1000)
    questions = _questions(rng)
    results = {}
    for name, switch in _variants():
        runner = ProgramRunner(tiny_model("qwen2", seed=seed), tokenizer=_WordTokens(), max_batch_size=4)
        runner._stop_ids = {5}
        switch(runner)
        results[name] = _search(runner, questions)
    for name, samples in results.items():
        assert samples == results["all off"], name


def test_a_chunk_that_runs_out_of_memory_is_run_in_halves(capsys):
    rng = random.Random()
    runner = ProgramRunner(tiny_model("llama", seed=rng.randrange(1000)), max_batch_size=16)
    runner._stop_ids = set()
    prompts, programs = _prompts(rng, 12), _programs(rng, 12)
    expected = [g.token_ids for g in runner.generate(prompts, programs, max_new_tokens=5)]
    real, sizes = runner.backend.generate_chunk, []

    def at_most_three(tokens, progs, n, stops):
        sizes.append(len(tokens))
        if len(tokens) > 3:
            raise torch.OutOfMemoryError("simulated: this many rows do not fit")
        return real(tokens, progs, n, stops)

    runner.backend.generate_chunk = at_most_three
    runner.length_chunks = False  # one chunk of 12: halved to 6, then 3
    assert [g.token_ids for g in runner.generate(prompts, programs, max_new_tokens=5)] == expected
    assert sizes[0] == 12 and max(s for s in sizes if s <= 3) <= 3
    said = capsys.readouterr().err
    assert "did not fit in device memory" in said and "at most 3 at a time" in said
    sizes.clear()  # later calls are planned at the size that fitted: no failure, no message
    assert [g.token_ids for g in runner.generate(prompts, programs, max_new_tokens=5)] == expected
    assert max(sizes) <= 3 and "did not fit" not in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_search_on_the_gpu_writes_the_same_supervision_with_and_without_each_feature(monkeypatch):
    """fp32 on CUDA: graphs, compile, fused projections, Triton attention, the one-row kernels of
    batch 1, one graph per token and the prompt cache, each switched off in turn, give the same
    search labels."""
    import polar.scoring

    monkeypatch.setattr(polar.scoring, "judge_texts", _hash_verdicts)
    rng = random.Random()
    seed = rng.randrange(1000)
    questions = _questions(rng)
    variants = {
        "all on": {},
        "no triton attention": {"triton_attention": False},
        "no one-row kernels": {"row_gemv": False},
        "no compile, no fusion": {"compile_layers": False, "fuse": False},
        "no token graphs": {"token_graphs": False},
        "no graphs": {"use_graphs": False},
    }
    results = {}
    for name, options in [*variants.items(), ("eager backend, no prompt cache", None)]:
        runner = ProgramRunner(tiny_model("llama", seed=seed).cuda(), tokenizer=_WordTokens(), max_batch_size=4)
        runner._stop_ids = {5}
        if options is None:
            runner.use_prompt_cache = False
        else:
            assert runner.enable_fast_path(**options)
        results[name] = _search(runner, questions)
    for name, samples in results.items():
        assert samples == results["eager backend, no prompt cache"], name
