"""The engine equals an independent reference: HF's own forward/generate on a physically
unrolled copy of the model (layer k of the copy is a deep copy of ``layer[program[k]]``)."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from conftest import tiny_model
from polar.engine import ProgramRunner
from polar.schedule import build_schedule
from polar.errors import UnsupportedModelError

D = 6


def unrolled_copy(model, program):
    """A separate HF model whose layers are copies of ``program``'s layers, in order."""
    clone = copy.deepcopy(model)
    layers = [copy.deepcopy(model.model.layers[l]) for l in program]
    for k, layer in enumerate(layers):
        layer.self_attn.layer_idx = k
    clone.model.layers = torch.nn.ModuleList(layers)
    clone.config.num_hidden_layers = len(program)
    if getattr(clone.config, "layer_types", None):
        clone.config.layer_types = [model.config.layer_types[l] for l in program]
    return clone.eval()


def random_program(rng: random.Random) -> list[int]:
    """Skips, contiguous repeats and the odd out-of-order jump."""
    program = []
    for layer in range(D):
        roll = rng.random()
        if roll < 0.25:
            continue
        program.append(layer)
        if roll > 0.8:
            program.append(layer)
    if rng.random() < 0.3 and program:
        program.insert(rng.randrange(len(program)), rng.randrange(D))
    return program or [rng.randrange(D)]


def hf_greedy(model, prompt: list[int], max_new: int, eos: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
        eos_token_id=eos, pad_token_id=0, num_beams=1,
    )[0, len(prompt):].tolist()
    return out[: out.index(eos)] if eos in out else out


def test_full_depth_program_equals_hf_forward(arch):
    model = tiny_model(arch, seed=random.randrange(1000))
    runner = ProgramRunner(model)
    ids = torch.randint(0, 97, (3, 11))
    ours = runner.logits(ids, [list(range(D))] * 3)
    theirs = model(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_skips_and_repeats_equal_an_unrolled_copy(arch):
    rng = random.Random()
    model = tiny_model(arch, seed=rng.randrange(1000))
    runner = ProgramRunner(model)
    programs = [random_program(rng) for _ in range(4)] + [[0, 1, 1, 2, 3, 4, 4, 5], [5, 0, 2]]
    ids = torch.randint(0, 97, (len(programs), 9))
    ours = runner.logits(ids, programs)
    for row, program in enumerate(programs):
        theirs = unrolled_copy(model, program)(input_ids=ids[row : row + 1]).logits[0]
        torch.testing.assert_close(ours[row], theirs, rtol=1e-4, atol=1e-4, msg=f"program {program}")


def test_heterogeneous_padded_batch_generates_like_each_unrolled_model_alone(arch):
    rng = random.Random()
    model = tiny_model(arch, seed=rng.randrange(1000))
    runner = ProgramRunner(model)
    eos = 3
    runner._stop_ids = {eos}
    programs = [random_program(rng) for _ in range(5)] + [list(range(D))]
    prompts = [[rng.randrange(4, 97) for _ in range(rng.randrange(2, 12))] for _ in programs]
    gens = runner.generate(prompts, programs, max_new_tokens=12)
    for gen, prompt, program in zip(gens, prompts, programs):
        expected = hf_greedy(unrolled_copy(model, program), prompt, 12, eos)
        assert gen.token_ids == expected, f"program {program}, prompt {prompt}"
        assert gen.layers_executed == len(program)


def test_programs_sharing_a_prompt_and_first_layers_equal_each_run_alone():
    """The shared first pass computes common prefixes once; results must not change."""
    rng = random.Random()
    model = tiny_model("qwen2", seed=rng.randrange(1000))
    runner = ProgramRunner(model)
    eos = 3
    runner._stop_ids = {eos}
    prompt = [rng.randrange(4, 97) for _ in range(7)]
    other = [rng.randrange(4, 97) for _ in range(4)]
    programs = [list(range(D)), [0, 1, 2, 2, 3, 4, 5], [0, 1, 2, 4, 5], [0, 1, 1, 2, 3, 4, 5], [0, 1, 2, 4, 5]]
    prompts = [prompt, prompt, prompt, other, prompt]
    gens = runner.generate(prompts, programs, max_new_tokens=10)
    ids = torch.tensor([prompt] * 3)
    batched = runner.logits(ids, programs[:3])
    for row, (gen, p, program) in enumerate(zip(gens, prompts, programs)):
        copy_ = unrolled_copy(model, program)
        assert gen.token_ids == hf_greedy(copy_, p, 10, eos), f"program {program}"
        if row < 3:
            torch.testing.assert_close(batched[row], copy_(input_ids=ids[:1]).logits[0], rtol=1e-4, atol=1e-4)


def test_padded_logits_equal_each_row_alone():
    rng = random.Random()
    model = tiny_model("llama", seed=rng.randrange(1000))
    runner = ProgramRunner(model)
    programs = [random_program(rng) for _ in range(4)]
    lengths = [3, 10, 6, 1]
    rows = [torch.randint(0, 97, (n,)) for n in lengths]
    ids = torch.zeros(4, 10, dtype=torch.long)
    mask = torch.zeros(4, 10, dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, 10 - len(row):] = row
        mask[r, 10 - len(row):] = 1
    batched = runner.logits(ids, programs, attention_mask=mask)
    for r, row in enumerate(rows):
        alone = runner.logits(row[None], [programs[r]])[0]
        torch.testing.assert_close(batched[r, 10 - len(row):], alone, rtol=1e-4, atol=1e-4)


def test_cached_generation_agrees_with_uncached_logits():
    rng = random.Random()
    model = tiny_model("qwen3", seed=rng.randrange(1000))
    runner = ProgramRunner(model)
    runner._stop_ids = set()
    programs = [[0, 1, 1, 2, 4, 5], [0, 2, 3, 3, 4, 5, 5]]
    prompts = [[5, 6, 7, 8], [9, 10]]
    gens = runner.generate(prompts, programs, max_new_tokens=8)
    for gen, prompt, program in zip(gens, prompts, programs):
        full = torch.tensor([prompt + gen.token_ids])
        logits = runner.logits(full, [program])[0]
        predicted = logits[len(prompt) - 1 : -1].argmax(-1).tolist()
        assert predicted == gen.token_ids


def test_finished_rows_leave_the_batch_without_changing_the_others():
    model = tiny_model("llama", seed=3)
    runner = ProgramRunner(model)
    runner._stop_ids = set()
    prompts = [[11, 12, 13], [14, 15], [16, 17, 18, 19]]
    programs = [[0, 1, 2, 3, 4, 5], [0, 0, 1, 3, 5], [1, 2, 2, 3]]
    reference = runner.generate(prompts, programs, max_new_tokens=10)
    # make row 1 stop early: its 3rd token becomes a stop token
    stop = reference[1].token_ids[2]
    runner._stop_ids = {stop}
    early = runner.generate(prompts, programs, max_new_tokens=10)
    assert early[1].stopped
    for r in range(3):
        ref = reference[r].token_ids
        cut = ref.index(stop) if stop in ref else len(ref)
        assert early[r].token_ids == ref[:cut]


def test_schedule_runs_each_program_in_order():
    programs = [[0, 1, 2, 3], [0, 2, 2, 3], [3, 1], [0, 1, 0, 1]]
    steps = build_schedule(programs)
    for r, program in enumerate(programs):
        assert [s.layer for s in steps if r in s.rows.tolist()] == program
    # near-full-depth programs share one sweep: 0,1,2,2,3 -> five steps for the first two rows
    assert [s.layer for s in build_schedule(programs[:2])] == [0, 1, 2, 2, 3]


def test_bad_programs_raise_clear_errors():
    runner = ProgramRunner(tiny_model("llama"))
    ids = torch.randint(0, 97, (1, 4))
    with pytest.raises(ValueError, match="program 0: program position 2 has layer 6"):
        runner.logits(ids, [[0, 1, 6]])
    with pytest.raises(ValueError, match="at least one layer"):
        runner.logits(ids, [[]])
    with pytest.raises(ValueError, match="2 programs for 1 prompts"):
        runner.logits(ids, [[0], [1]])


def test_a_model_without_a_layer_list_is_rejected():
    with pytest.raises(UnsupportedModelError, match="decoder-only"):
        ProgramRunner(torch.nn.Linear(2, 2))


def test_token_states_match_hf_hidden_states():
    model = tiny_model("qwen2", seed=5)
    runner = ProgramRunner(model)
    prompt = [4, 5, 6, 7, 8]
    states = runner.token_states([prompt, prompt[:2]], layer=3)
    hf = model(input_ids=torch.tensor([prompt]), output_hidden_states=True).hidden_states[3][0]
    torch.testing.assert_close(states[0], hf, rtol=1e-4, atol=1e-4)
    assert states[1].shape == (2, 64)
