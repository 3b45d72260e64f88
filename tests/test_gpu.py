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


def test_one_row_argmax_is_the_first_maximum():
    """The two-stage argmax of batch 1 equals torch's: any vocabulary size, ties to the first."""
    from polar.cuda_engine import _row_argmax

    rng = random.Random()
    for vocab in (1, 1023, 1024, 1025, rng.randrange(2, 200_000)):
        logits = torch.randn(1, vocab)
        assert int(_row_argmax(logits)) == int(logits.argmax(-1))
        top = float(logits.max())
        tied = sorted(rng.sample(range(vocab), min(vocab, 3)))
        logits[0, tied] = top + 1  # equal maxima in different blocks: the first one wins
        assert int(_row_argmax(logits)) == tied[0] == int(logits.argmax(-1))


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


#: bf16 tolerances, as fractions of the reference's largest |logit|. Measured on the H200 over 292
#: random models and batches: logits within 1.9% of the unrolled model's, every token within 2.0%
#: of its best logit; a 4% bound keeps twice that margin and still fails a wrong layer or KV slot
#: (those move logits by tens of percent).
BF16_LOGIT_TOL = 0.04


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_graphs_in_bf16_agree_with_an_unrolled_hf_model(arch):
    """Teacher-forced on the graphs' own tokens, the unrolled HF model gives the same logits up to
    bf16 rounding, every token is its best or a near-tie, and where the generic path picked
    another token the two paths parted at a near-tie of the reference (both tokens near the top)."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    runner = _cuda_runner(arch, torch.bfloat16, rng.randrange(1000))
    prompts, programs = _batch(rng, 8)
    runner.fast_path.capture_logits = True
    tokens, _ = runner._generate_chunk(prompts, programs, 10, set())
    step_logits = runner.fast_path.last_logits
    generic, _ = _generic(runner, prompts, programs, 10, set())
    for row, (prompt, program) in enumerate(zip(prompts, programs)):
        where = f"seed {seed}, row {row}, program {program}"
        clone = unrolled_copy(runner.model, program)
        full = torch.tensor([prompt + tokens[row]], device="cuda")
        with torch.no_grad():
            reference = clone(input_ids=full).logits[0, len(prompt) - 1 : -1].float()
        ours = torch.stack([step[row] for step in step_logits]).to("cuda")
        tol = BF16_LOGIT_TOL * float(reference.abs().max())
        assert float((ours - reference).abs().max()) <= tol, where
        assert _near_argmax(tokens[row], reference, tol), where
        parted = next((t for t, (a, b) in enumerate(zip(tokens[row], generic[row])) if a != b), None)
        if parted is not None:  # same prefix up to here, so the reference row applies to both
            assert _near_argmax([generic[row][parted]], reference[parted : parted + 1], tol), where


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


def _run_in_triton_interpreter(script: str) -> None:
    """Run ``script`` with Triton's CPU interpreter (kernels execute as Python); it prints "ok"."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def test_decode_attention_kernel_equals_its_reference_in_the_interpreter():
    """Triton's CPU interpreter runs the kernel itself (skipped where Triton is not installed)."""
    _run_in_triton_interpreter(_INTERPRETER_CHECK)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("one_split", [False, True], ids=["split", "direct"])
def test_decode_attention_kernel_equals_its_reference_on_the_gpu(dtype, one_split, monkeypatch):
    from polar import decode_attention as da

    assert da.operator() is not None
    if one_split:  # what large batches get: the kernel writes the output itself, no combine
        monkeypatch.setattr(da, "splits_for", lambda *args: 1)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for q, keys, values, start, column in _attention_cases("cuda", dtype):
        ours = torch.ops.polar.decode_attention(q, keys, values, start, column, 0.125)
        reference = da.decode_attention_reference(q, keys, values, start, column, 0.125)
        torch.testing.assert_close(ours.float(), reference.float(), rtol=tol, atol=tol)


# --------------------------------------------------------------------------- one-row projections


def _gemv_cases(device: str, dtype: torch.dtype):
    """Fresh random shapes (rows and columns not multiples of the tile), every prologue, with and
    without bias and residual."""
    from polar import gemv as gv

    rng = random.Random()
    for _ in range(3):
        n, k = rng.randrange(3, 300), rng.randrange(17, 1100)
        for prologue in gv.PROLOGUES:
            x = torch.randn(2 * k if prologue == "silu_mul" else k).to(device, dtype)
            weight = (torch.randn(n, k) / k**0.5).to(device, dtype)
            norm = (1 + 0.1 * torch.randn(k)).to(device, dtype)
            extra = torch.randn(2, n).to(device, dtype)
            for bias, residual in [(None, None), (extra[0], extra[1])]:
                yield x, weight, bias, residual, prologue, norm


def _qkv_rope_cases(device: str, dtype: torch.dtype):
    """Fresh random q/k/v projections (grouped and plain heads, with and without bias), rotary
    angles of a random position, KV buffers with random contents and a random current column."""
    rng = random.Random()
    for dim, heads, kv_heads in [(16, 4, 2), (32, 3, 1), (128, 2, 2)]:
        k = rng.randrange(17, 400)
        rows = (heads + 2 * kv_heads) * dim
        x = torch.randn(k).to(device, dtype)
        weight = (torch.randn(rows, k) / k**0.5).to(device, dtype)
        norm = (1 + 0.1 * torch.randn(k)).to(device, dtype)
        angles = torch.rand(dim // 2) * rng.randrange(1, 500)
        cos, sin = (f(torch.cat([angles, angles])).to(device, dtype) for f in (torch.cos, torch.sin))
        tcap = rng.randrange(2, 40)
        column = torch.tensor([rng.randrange(tcap)], device=device)
        for bias in (None, torch.randn(rows).to(device, dtype)):
            kv = torch.randn(2, 1, kv_heads, tcap, dim).to(device, dtype)
            yield x, norm, weight, bias, cos, sin, column, kv


_GEMV_INTERPRETER_CHECK = _INTERPRETER_CHECK.split("from polar import")[0] + """
from polar import gemv as gv
from test_gpu import _gemv_cases, _qkv_rope_cases
for x, weight, bias, residual, prologue, norm in _gemv_cases("cpu", torch.float32):
    ours = gv.gemv_triton(x, weight, bias, residual, prologue, norm, 1e-5, block_n=4, block_k=128)
    reference = gv.gemv_reference(x, weight, bias, residual, prologue, norm, 1e-5)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
for x, norm, weight, bias, cos, sin, column, kv in _qkv_rope_cases("cpu", torch.float32):
    ours_kv, reference_kv = kv.clone(), kv.clone()
    ours = gv.qkv_rope_triton(x, norm, 1e-5, weight, bias, cos, sin, column, *ours_kv, block_k=64)
    reference = gv.qkv_rope_reference(x, norm, 1e-5, weight, bias, cos, sin, column, *reference_kv)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_kv, reference_kv, rtol=1e-5, atol=1e-5)
print("ok")
"""


def test_one_row_projection_kernels_equal_their_references_in_the_interpreter():
    """Triton's CPU interpreter runs both kernels (fp32; skipped where Triton is not installed)."""
    _run_in_triton_interpreter(_GEMV_INTERPRETER_CHECK)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_row_projection_kernel_equals_its_reference_on_the_gpu(dtype):
    from polar import gemv as gv

    assert gv.operator() is not None
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for x, weight, bias, residual, prologue, norm in _gemv_cases("cuda", dtype):
        ours = torch.ops.polar.gemv(x, weight, bias, residual, prologue, norm, 1e-5)
        reference = gv.gemv_reference(x, weight, bias, residual, prologue, norm, 1e-5)
        torch.testing.assert_close(ours.float(), reference.float(), rtol=tol, atol=tol * float(reference.abs().max()))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qkv_rotary_kernel_equals_its_reference_on_the_gpu(dtype):
    from polar import gemv as gv

    assert gv.operator() is not None
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for x, norm, weight, bias, cos, sin, column, kv in _qkv_rope_cases("cuda", dtype):
        ours_kv, reference_kv = kv.clone(), kv.clone()
        ours = torch.ops.polar.qkv_rope(x, norm, 1e-5, weight, bias, cos, sin, column, *ours_kv)
        reference = gv.qkv_rope_reference(x, norm, 1e-5, weight, bias, cos, sin, column, *reference_kv)
        scale = float(reference.abs().max())
        torch.testing.assert_close(ours.float(), reference.float(), rtol=tol, atol=tol * scale)
        torch.testing.assert_close(ours_kv.float(), reference_kv.float(), rtol=tol, atol=tol * scale)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_batch_one_with_one_row_kernels_gives_the_generic_tokens(arch):
    """Batch 1 runs the polar.gemv layer and head; in fp32 its tokens are the generic path's."""
    rng = random.Random()
    runner = _cuda_runner(arch, torch.float32, rng.randrange(1000))
    assert runner.fast_path.row_gemv, "the one-row kernels should apply to this architecture"
    for _ in range(3):
        prompts, _ = _batch(rng, 1)
        programs = [random_program(rng)]
        expected = _generic(runner, prompts, programs, 16, set())
        assert runner._generate_chunk(prompts, programs, 16, set()) == expected
