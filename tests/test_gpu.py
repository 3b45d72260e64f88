"""The CUDA fast path (static KV slots + per-layer graphs) gives the generic engine's results.

Tests without a marker run the same static-buffer code eagerly on the CPU (``use_graphs=False``)
against the generic path; ``-m gpu`` tests replay real CUDA graphs in bf16 and fp32 and compare
with the generic path and with HF's own forward on a physically unrolled model.
"""

from __future__ import annotations

import random

import pytest
import torch

from conftest import tiny_model
from polar.cuda_engine import CudaGraphDecoder, bucket_for
from polar.engine import ProgramRunner
from polar.schedule import build_schedule
from test_engine import random_program, unrolled_copy

D = 6
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _batch(rng: random.Random, n: int, vocab: int = 97) -> tuple[list[list[int]], list[list[int]]]:
    programs = [random_program(rng) for _ in range(n - 1)] + [list(range(D))]
    prompts = [[rng.randrange(4, vocab) for _ in range(rng.randrange(1, 12))] for _ in programs]
    return prompts, programs


# --------------------------------------------------------------------------- CPU (eager static buffers)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_static_slots_generate_like_the_generic_path(arch):
    rng = random.Random()
    runner = ProgramRunner(tiny_model(arch, seed=rng.randrange(1000)))
    fast = CudaGraphDecoder(runner, use_graphs=False)
    prompts, programs = _batch(rng, 7)
    expected = runner._generate_chunk(prompts, programs, 12, set())
    assert fast.generate_chunk(prompts, programs, 12, set()) == expected


def test_early_exit_moves_rows_to_smaller_slots_without_changing_the_others():
    rng = random.Random(4)
    runner = ProgramRunner(tiny_model("llama", seed=11))
    fast = CudaGraphDecoder(runner, use_graphs=False)
    prompts, programs = _batch(rng, 6)
    reference, _ = runner._generate_chunk(prompts, programs, 12, set())
    stops = {reference[0][2], reference[3][4]}  # two rows stop early, others may too
    expected = runner._generate_chunk(prompts, programs, 12, stops)
    got = fast.generate_chunk(prompts, programs, 12, stops)
    assert got == expected
    assert got[1][0] and got[1][3]


def test_step_logits_match_uncached_logits():
    runner = ProgramRunner(tiny_model("qwen3", seed=2))
    fast = CudaGraphDecoder(runner, use_graphs=False)
    fast.capture_logits = True
    prompts, programs = [[5, 6, 7, 8], [9, 10]], [[0, 1, 1, 2, 4, 5], [0, 2, 3, 3, 4, 5, 5]]
    tokens, _ = fast.generate_chunk(prompts, programs, 6, set())
    for row, (prompt, program) in enumerate(zip(prompts, programs)):
        full = torch.tensor([prompt + tokens[row]])
        uncached = runner.logits(full, [program])[0, len(prompt) - 1 : -1]
        ours = torch.stack([step[row] for step in fast.last_logits])
        torch.testing.assert_close(ours, uncached, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_fused_projection_layer_matches_the_hf_layer(arch):
    rng = random.Random()
    runner = ProgramRunner(tiny_model(arch, seed=rng.randrange(1000)))
    ids = torch.randint(0, 97, (2, 9))
    before = runner.logits(ids, [list(range(D))] * 2)
    fast = CudaGraphDecoder(runner, use_graphs=False, fuse=True)
    assert fast._fused is not None
    assert fast.check_fused_layer(runner, fast._fused[0])
    # re-pointed q/k/v and gate/up weights leave the HF model's own results unchanged
    torch.testing.assert_close(runner.logits(ids, [list(range(D))] * 2), before, rtol=0, atol=0)
    prompts, programs = _batch(rng, 5)
    assert fast.generate_chunk(prompts, programs, 10, set()) == runner._generate_chunk(prompts, programs, 10, set())


def test_schedule_lets_rows_wait_to_share_a_repeat():
    # row 0 repeats 2..4 after 4, row 1 repeats 2..3 after 3: greedy-min would run 2,3 for row 1
    # alone and then 2,3,4 for row 0 alone (5 extra steps); waiting for row 0 needs 3.
    programs = [[0, 1, 2, 3, 4, 2, 3, 4, 5], [0, 1, 2, 3, 2, 3, 4, 5]]
    steps = build_schedule(programs)
    assert len(steps) == 9
    for r, program in enumerate(programs):
        assert [s.layer for s in steps if r in s.rows.tolist()] == program


def test_new_programs_reuse_slots_instead_of_allocating():
    rng = random.Random(7)
    runner = ProgramRunner(tiny_model("llama", seed=3))
    fast = CudaGraphDecoder(runner, use_graphs=False)
    programs = [list(range(D))] * 4
    prompts = [[rng.randrange(4, 97) for _ in range(8)] for _ in programs]
    fast.generate_chunk(prompts, programs, 4, set())
    created = fast.slots_created
    # same shape of batch, different prompts: the same slots serve it
    fast.generate_chunk([[t + 1 for t in p] for p in prompts], programs, 4, set())
    assert fast.slots_created == created
    # a program that repeats a layer needs one extra slot for that layer, once
    varied = [[0, 1, 2, 2, 3, 4, 5]] + programs[1:]
    fast.generate_chunk(prompts, varied, 4, set())
    grown = fast.slots_created
    fast.generate_chunk(prompts, [[0, 1, 2, 3, 3, 4, 5]] + programs[1:], 4, set())
    fast.generate_chunk(prompts, varied, 4, set())
    assert fast.slots_created - grown <= 1


def test_batches_larger_than_the_slot_pool_are_split():
    rng = random.Random(9)
    runner = ProgramRunner(tiny_model("qwen2", seed=4), max_batch_size=2)
    fast = CudaGraphDecoder(runner, use_graphs=False)
    prompts, programs = _batch(rng, 5)
    assert fast.generate_chunk(prompts, programs, 6, set()) == runner._generate_chunk(prompts, programs, 6, set())


def test_buckets_are_powers_of_two():
    assert [bucket_for(n) for n in (1, 2, 3, 5, 8, 9, 64, 65)] == [1, 2, 4, 8, 8, 16, 64, 128]


def test_fast_path_is_declined_where_graphs_cannot_apply():
    assert not CudaGraphDecoder.supports(ProgramRunner(tiny_model("llama")))  # CPU
    if torch.cuda.is_available():
        moe = ProgramRunner(tiny_model("qwen2_moe").cuda())
        assert not CudaGraphDecoder.supports(moe)  # data-dependent expert routing


# --------------------------------------------------------------------------- CUDA graphs


def _cuda_runner(arch: str, dtype: torch.dtype, seed: int) -> ProgramRunner:
    model = tiny_model(arch, seed=seed).to(device="cuda", dtype=dtype)
    runner = ProgramRunner(model)
    assert runner.enable_fast_path()
    return runner


def _generic(runner: ProgramRunner, prompts, programs, n: int, stops: set[int]):
    fast, runner.fast_path = runner.fast_path, None
    try:
        return runner._generate_chunk(prompts, programs, n, stops)
    finally:
        runner.fast_path = fast


def _near_argmax(tokens: list[int], logits: torch.Tensor, tol: float) -> bool:
    """Each token is the argmax of the reference logits, or within ``tol`` of it (a tie)."""
    picked = logits[torch.arange(len(tokens)), torch.tensor(tokens, device=logits.device)]
    return bool((logits.max(-1).values - picked <= tol).all())


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_graphs_in_fp32_give_the_generic_tokens(arch):
    rng = random.Random()
    runner = _cuda_runner(arch, torch.float32, rng.randrange(1000))
    prompts, programs = _batch(rng, 9)
    expected = _generic(runner, prompts, programs, 16, set())
    assert runner._generate_chunk(prompts, programs, 16, set()) == expected
    stops = {expected[0][0][3]}
    assert runner._generate_chunk(prompts, programs, 16, stops) == _generic(runner, prompts, programs, 16, stops)
    assert runner.fast_path.graphs_captured > 0


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_graphs_in_bf16_agree_with_an_unrolled_hf_model(arch):
    rng = random.Random()
    runner = _cuda_runner(arch, torch.bfloat16, rng.randrange(1000))
    prompts, programs = _batch(rng, 8)
    runner.fast_path.capture_logits = True
    tokens, _ = runner._generate_chunk(prompts, programs, 10, set())
    step_logits = runner.fast_path.last_logits
    generic, _ = _generic(runner, prompts, programs, 10, set())
    agree = sum(a == b for a, b in zip(tokens, generic))
    assert agree >= len(prompts) - 2, "bf16 may flip a near-tie, but not most rows"
    for row, (prompt, program) in enumerate(zip(prompts, programs)):
        clone = unrolled_copy(runner.model, program)
        full = torch.tensor([prompt + tokens[row]], device="cuda")
        with torch.no_grad():
            reference = clone(input_ids=full).logits[0, len(prompt) - 1 : -1].float()
        ours = torch.stack([step[row] for step in step_logits]).to("cuda")
        scale = float(reference.abs().max())
        assert float((ours - reference).abs().max()) <= 0.05 * scale, f"program {program}"
        assert _near_argmax(tokens[row], reference, 0.02 * scale), f"program {program}"


# --------------------------------------------------------------------------- decode attention kernel


def _attention_cases(device: str, dtype: torch.dtype):
    """Fresh random shapes: grouped and plain heads, empty rows, rows valid from column 0."""
    rng = random.Random()
    for batch, heads, kv_heads, dim, tcap in [(3, 6, 2, 16, 130), (1, 24, 8, 128, 384), (9, 4, 4, 32, 64), (2, 3, 1, 64, 17)]:
        q = torch.randn(batch, heads, dim).to(device, dtype)
        keys, values = (torch.randn(batch, kv_heads, tcap, dim).to(device, dtype) for _ in range(2))
        column = torch.tensor([tcap - 1 - rng.randrange(4)], device=device)
        start = torch.tensor([rng.randrange(int(column)) for _ in range(batch)], dtype=torch.int32, device=device)
        start[0] = tcap  # a padding row: attends to nothing
        if batch > 1:
            start[1] = 0
        yield q, keys, values, start, column


_INTERPRETER_CHECK = """
import torch, triton.runtime.interpreter as interpreter
# The interpreter turns scalars into one-element arrays, which numpy 2 refuses as loop bounds.
original = interpreter._patch_lang_tensor
def patched(tensor, scope):
    original(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
interpreter._patch_lang_tensor = patched
from polar import decode_attention as da
from test_gpu import _attention_cases
for splits in (1, 3):
    da.splits_for = lambda *args, s=splits: s
    for q, keys, values, start, column in _attention_cases("cpu", torch.float32):
        ours = da.decode_attention_triton(q, keys, values, start, column, 0.125)
        reference = da.decode_attention_reference(q, keys, values, start, column, 0.125)
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
        assert bool((ours[0] == 0).all()), "a row with no valid column gives zeros"
print("ok")
"""


def test_decode_attention_kernel_equals_its_reference_in_the_interpreter():
    """Triton's CPU interpreter runs the kernel itself (skipped where Triton is not installed)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    done = subprocess.run([sys.executable, "-c", _INTERPRETER_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_kernel_equals_its_reference_on_the_gpu(dtype):
    from polar import decode_attention as da

    assert da.operator() is not None
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for q, keys, values, start, column in _attention_cases("cuda", dtype):
        ours = torch.ops.polar.decode_attention(q, keys, values, start, column, 0.125)
        reference = da.decode_attention_reference(q, keys, values, start, column, 0.125)
        torch.testing.assert_close(ours.float(), reference.float(), rtol=tol, atol=tol)
