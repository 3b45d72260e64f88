"""GPU benchmark of program execution: HF ``generate`` vs the generic engine vs the CUDA fast path.

Random bf16 weights from real configs (Llama-3.2-3B and Qwen3-8B shapes) built directly on the
GPU, so no download is needed; timings do not depend on weight values. Reports, in one run:

* the weight-read roofline: bytes of weights one decode step must read over the device-to-device
  copy bandwidth measured here;
* ms per decode step at batch 1 (full depth) for HF ``generate``, the generic engine and the fast
  path, each as the time difference between a long and a short generation over the extra steps;
* the time of a shorter program (default 20 of D layers) relative to full depth;
* programs evaluated per second for 64 distinct MCTS-like programs (256-token random prompts,
  50 new tokens, no early stop): HF ``generate`` one program at a time (a few measured, the
  rate extrapolated) vs the fast path in one batch (after a warm-up batch of other programs).

The fast path runs with its defaults on CUDA: torch.compile'd layers and head, fused q/k/v and
gate/up projections, beam-merged schedule, stop tokens checked one token behind; ``--baseline``
adds the batch-1 time without compile and fusion.

Usage: ``python bench/gpu.py --models 3b,8b --baseline --out bench-gpu.json``
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ceilings import copy_bandwidth  # noqa: E402
from polar.cuda_engine import CudaGraphDecoder  # noqa: E402
from polar.engine import ProgramRunner  # noqa: E402
from polar.schedule import build_schedule, greedy_min_order  # noqa: E402


def model_config(name: str) -> Any:
    """Architecture shapes of the paper models (random weights)."""
    import transformers as tf

    if name == "3b":
        return tf.LlamaConfig(
            hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
            num_key_value_heads=8, head_dim=128, vocab_size=128256, rope_theta=500000.0,
            tie_word_embeddings=True, max_position_embeddings=8192,
        )
    if name == "8b":
        return tf.Qwen3Config(
            hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
            num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=8192,
            tie_word_embeddings=False,
        )
    raise ValueError(name)


def build_model(name: str) -> Any:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(model_config(name), dtype=torch.bfloat16, attn_implementation="sdpa")
    return model.eval()


def weight_bytes(model: Any) -> int:
    """Bytes one decode step reads: every weight once; an untied input embedding only by row."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.model.embed_tokens.weight
    if model.lm_head.weight.data_ptr() != embed.data_ptr():
        total -= embed.numel() * embed.element_size()
    return total


def timed(fn: Callable[[], Any]) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def per_step_ms(run: Callable[[int], Any], lo: int, hi: int, reps: int) -> float:
    """ms per decode step: (time for ``hi`` new tokens - time for ``lo``) / (hi - lo), median."""
    run(lo)  # warm-up (graph capture, kernels)
    samples = [(timed(lambda: run(hi)) - timed(lambda: run(lo))) / (hi - lo) * 1e3 for _ in range(reps)]
    return statistics.median(samples)


def profile_decode(run: Callable[[int], Any], path: Path) -> None:
    """Where one batch-1 decode's time goes: 33 tokens minus the prefill, kernels by device time."""
    from torch.profiler import ProfilerActivity, profile

    run(33)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run(33)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90)
    path.write_text(table)
    print(table[:6000], flush=True)


def mcts_programs(depth: int, count: int, seed: int) -> list[list[int]]:
    """Distinct programs a few edits from full depth: skips and repeats of 1-4 layer blocks."""
    rng = random.Random(seed)
    seen: set[tuple[int, ...]] = set()
    out = []
    while len(out) < count:
        program = list(range(depth))
        for _ in range(rng.randint(1, 3)):
            size = rng.randint(1, 4)
            start = rng.randrange(0, len(program) - size)
            block = program[start:start + size]
            if rng.random() < 0.5 and len(program) > size + 4:
                del program[start:start + size]
            else:
                program[start + size:start + size] = block
        if tuple(program) not in seen:
            seen.add(tuple(program))
            out.append(program)
    return out


def hf_program_model(model: Any, program: list[int]) -> tuple[torch.nn.ModuleList, int]:
    """Patch the layer list to ``program`` (the release's way); weights shared, each position
    its own ``layer_idx`` so HF's cache keeps a separate entry. Returns what to restore."""
    layers, depth = model.model.layers, model.config.num_hidden_layers
    patched = []
    for k, l in enumerate(program):
        layer = copy.copy(layers[l])
        layer._modules = dict(layers[l]._modules)
        attn = copy.copy(layers[l].self_attn)
        attn.layer_idx = k
        layer._modules["self_attn"] = attn
        patched.append(layer)
    model.model.layers = torch.nn.ModuleList(patched)
    model.config.num_hidden_layers = len(program)
    return layers, depth


def hf_generate(model: Any, ids: torch.Tensor, n: int) -> torch.Tensor:
    return model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
        do_sample=False, num_beams=1, pad_token_id=0,
    )


def bench_model(name: str, args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    model = build_model(name)
    depth = model.config.num_hidden_layers
    vocab = model.config.vocab_size
    fast = ProgramRunner(model, max_batch_size=args.programs)
    assert fast.enable_fast_path(), "fast path declined"
    generic = ProgramRunner(model, max_batch_size=args.programs)
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(100, vocab, (args.prompt_len,), generator=gen).tolist()
    full = list(range(depth))
    none: set[int] = set()
    r: dict[str, Any] = {"model": name, "depth": depth, "weight_GB": weight_bytes(model) / 1e9}
    r["roofline_ms"] = weight_bytes(model) / args.bandwidth * 1e3
    log(f"{name}: weights {r['weight_GB']:.2f} GB, roofline {r['roofline_ms']:.3f} ms")

    def ours(runner: ProgramRunner, program: list[int]) -> Callable[[int], Any]:
        return lambda n: runner.generate([prompt], [program], max_new_tokens=n, stop_token_ids=none)

    r["fused"] = fast.fast_path.fused
    r["compiled"] = fast.fast_path.compiled
    r["first_call_s"] = timed(lambda: ours(fast, full)(2))  # includes compiling for bucket 1
    log(f"first call (compile, capture): {r['first_call_s']:.1f} s; fused={r['fused']} compiled={r['compiled']}")
    r["fast_ms"] = per_step_ms(ours(fast, full), 1, 65, 3)
    r["row_gemv"] = fast.fast_path.row_gemv
    log(f"fast path full depth: {r['fast_ms']:.3f} ms/step (one-row Triton projections: {r['row_gemv']})")
    if args.profile:
        profile_decode(ours(fast, full), Path(f"{args.profile}-{name}.txt"))
    if args.compare_gemv and r["row_gemv"]:
        other = ProgramRunner(model, max_batch_size=args.programs)
        other.fast_path = CudaGraphDecoder(other, row_gemv=False)
        r["fast_ms_cublas"] = per_step_ms(ours(other, full), 1, 65, 3)
        log(f"same, projections through cuBLAS: {r['fast_ms_cublas']:.3f} ms/step")
        del other
    n_short = round(depth * args.short_layers / 28)  # same fraction of depth on every model
    cut = depth - n_short
    short = full[: depth - 2 - cut] + full[depth - 2:]  # skip a block near the top, as search does
    r["short_layers"] = len(short)
    r["fast_short_ms"] = per_step_ms(ours(fast, short), 1, 65, 3)
    r["short_ratio"] = r["fast_short_ms"] / r["fast_ms"]
    r["short_target"] = len(short) / depth + 0.10
    log(f"fast path {len(short)}/{depth} layers: {r['fast_short_ms']:.3f} ms/step (ratio {r['short_ratio']:.3f})")
    if args.baseline:  # the fast path as it was: HF layers eager inside the graphs, no fusion
        base = ProgramRunner(model, max_batch_size=args.programs)
        base.fast_path = CudaGraphDecoder(base, compile_layers=False, fuse=False)
        r["baseline_ms"] = per_step_ms(ours(base, full), 1, 65, 3)
        log(f"baseline fast path (no compile, no fusion): {r['baseline_ms']:.3f} ms/step")
        del base
    if not args.skip_slow:
        r["generic_ms"] = per_step_ms(ours(generic, full), 1, 9, 1)
        log(f"generic path: {r['generic_ms']:.2f} ms/step")
        ids = torch.tensor([prompt], device="cuda")
        r["hf_ms"] = per_step_ms(lambda n: hf_generate(model, ids, n), 1, 9, 1)
        log(f"HF generate: {r['hf_ms']:.2f} ms/step")
        a = fast.generate([prompt], [full], max_new_tokens=16, stop_token_ids=none)[0].token_ids
        b = generic.generate([prompt], [full], max_new_tokens=16, stop_token_ids=none)[0].token_ids
        r["tokens_agree"] = f"{sum(x == y for x, y in zip(a, b))}/16"
        log(f"fast vs generic greedy tokens agree: {r['tokens_agree']}")

    # programs per second: 64 distinct MCTS-like programs in one batch
    prompts = [torch.randint(100, vocab, (args.prompt_len,), generator=gen).tolist() for _ in range(args.programs)]
    programs = mcts_programs(depth, args.programs, seed=200)
    r["schedule_steps"] = len(build_schedule(programs))
    r["schedule_steps_greedy_min"] = len(greedy_min_order(programs))
    before = fast.fast_path.graphs_captured
    r["batch_cold_s"] = timed(lambda: fast.generate(prompts, mcts_programs(depth, args.programs, seed=100),
                                                    max_new_tokens=args.new_tokens, stop_token_ids=none))
    r["graphs_cold"] = fast.fast_path.graphs_captured - before
    for i in range(1, args.warm_batches):  # a search streams batches: later ones find their graphs
        fast.generate(prompts, mcts_programs(depth, args.programs, seed=100 + i),
                      max_new_tokens=args.new_tokens, stop_token_ids=none)
    before = fast.fast_path.graphs_captured
    r["batch_s"] = timed(lambda: fast.generate(prompts, programs, max_new_tokens=args.new_tokens, stop_token_ids=none))
    r["graphs_new_batch"] = fast.fast_path.graphs_captured - before
    r["fast_programs_per_s"] = args.programs / r["batch_s"]
    r["prefill_s"] = timed(lambda: fast.generate(prompts, programs, max_new_tokens=1, stop_token_ids=none))
    log(f"fast path, {args.programs} programs in one batch ({r['schedule_steps']} schedule steps, "
        f"greedy-min would take {r['schedule_steps_greedy_min']}): "
        f"{r['batch_s']:.2f} s (prefill+1 token {r['prefill_s']:.2f} s; cold batch {r['batch_cold_s']:.2f} s, "
        f"{r['graphs_cold']} graphs captured; new programs captured {r['graphs_new_batch']})")
    if not args.skip_slow and args.hf_programs > 0:
        times = []
        for program, p in zip(programs[: args.hf_programs], prompts):
            layers, depth0 = hf_program_model(model, program)
            try:
                ids = torch.tensor([p], device="cuda")
                times.append(timed(lambda: hf_generate(model, ids, args.new_tokens)))
            finally:
                model.model.layers, model.config.num_hidden_layers = layers, depth0
        r["hf_program_s"] = statistics.mean(times)
        r["hf_programs_per_s"] = 1.0 / r["hf_program_s"]
        log(f"HF generate one program at a time: {r['hf_program_s']:.2f} s each ({len(times)} measured)")
    del fast, generic, model
    torch.cuda.empty_cache()
    return r


def table(results: list[dict[str, Any]], bandwidth: float) -> str:
    lines = [
        f"copy bandwidth (read+write): {bandwidth / 1e12:.2f} TB/s",
        "| model | roofline ms | HF generate ms/step | generic ms/step | fast ms/step | fast/roofline "
        "| short program | short/full (target) | programs/s HF (1 at a time) | programs/s fast (64 in a batch) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        def f(key: str, fmt: str = "{:.2f}") -> str:
            return fmt.format(r[key]) if key in r else "—"

        lines.append(
            f"| {r['model']} (D={r['depth']}) | {f('roofline_ms')} | {f('hf_ms', '{:.1f}')} | {f('generic_ms', '{:.1f}')} "
            f"| {f('fast_ms')} | {r['fast_ms'] / r['roofline_ms']:.2f}× | {r['short_layers']}/{r['depth']} layers "
            f"| {r['short_ratio']:.3f} (≤ {r['short_target']:.3f}) | {f('hf_programs_per_s', '{:.2f}')} "
            f"| {f('fast_programs_per_s', '{:.1f}')} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="3b,8b", help="comma list of 3b, 8b")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=50)
    parser.add_argument("--programs", type=int, default=64)
    parser.add_argument("--short-layers", type=int, default=20, help="layers of the shorter program, per 28 layers of depth")
    parser.add_argument("--hf-programs", type=int, default=2, help="programs timed through HF generate")
    parser.add_argument("--skip-slow", action="store_true", help="skip HF generate and the generic path")
    parser.add_argument("--baseline", action="store_true",
                        help="also time the fast path without torch.compile and fused projections (batch 1)")
    parser.add_argument("--warm_batches", type=int, default=3,
                        help="batches of other programs run before the timed one (steady state of a search)")
    parser.add_argument("--profile", default=None, help="profile batch-1 decode; tables go to PROFILE-<model>.txt")
    parser.add_argument("--compare-gemv", action="store_true",
                        help="also time batch 1 with the projections through cuBLAS instead of polar.gemv")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA device"

    def log(msg: str) -> None:
        print(msg, flush=True)

    log(f"{torch.cuda.get_device_name()} torch {torch.__version__}")
    args.bandwidth = copy_bandwidth()
    results = []
    for name in args.models.split(","):
        if name == "8b":  # fewer slow baselines on the larger model
            args.hf_programs = min(args.hf_programs, 1)
        results.append(bench_model(name, args, log))
    text = table(results, args.bandwidth)
    if args.out:
        Path(args.out).write_text(json.dumps({"bandwidth": args.bandwidth, "results": results}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
