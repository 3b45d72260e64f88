"""Programs evaluated per second: our lockstep batched search vs. the release's way.

Both sides score the same (question, program) pairs (the ones our MCTS evaluated), with the same
model, prompts, ``max_new_tokens`` and answer checking, in one run:

* **polar**: ``polar.search.search_many`` -- every round scores one pending program per question in
  one heterogeneous ``ProgramRunner.generate`` batch.
* **release way**: one program per Hugging Face ``generate`` call, with the model's layer list
  patched (``model.model.layers = ModuleList([layers[i] for i in program])`` and
  ``config.num_hidden_layers = len(program)``). HF attention modules index the KV cache by their
  original ``layer_idx``, so the cache keeps one slot per *original* layer and the two passes of
  a repeated layer share one slot (the second pass also attends to the first pass's keys). That is
  the release's semantics, not ours (SPEC 2), so repeat programs may give different text; the
  benchmark measures cost, and reports how many answers agree.

Run ``python bench/search.py --help`` for options; results are recorded in ``docs/performance.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Shapes of the paper models, for random-weight runs without downloading weights.
CONFIG_SHAPES = {
    "llama-3.2-3b": dict(
        arch="llama", vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
        num_attention_heads=24, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
        max_position_embeddings=4096, tie_word_embeddings=True, rms_norm_eps=1e-5,
    ),
    "qwen2.5-3b": dict(
        arch="qwen2", vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
        num_attention_heads=16, num_key_value_heads=2, rope_theta=1000000.0, max_position_embeddings=4096,
        tie_word_embeddings=True, rms_norm_eps=1e-6,
    ),
    "tiny": dict(
        arch="llama", vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
    ),
}


def build_runner(model: str, device: str | None, dtype: str | None, tokenizer_source: str | None = None):
    """A ``ProgramRunner`` for a real model, or for a random-weight model of a named shape
    (tokenizer: SmolLM2's, which fits every vocabulary above, or ``tokenizer_source``: a saved
    tokenizer folder, for machines without the hub or the SmolLM2 package). On CUDA the
    random-weight runner takes the CUDA fast path, like ``from_pretrained`` does."""
    from polar.engine import ProgramRunner

    if model not in CONFIG_SHAPES:
        return ProgramRunner.from_pretrained(model, device=device, dtype=dtype)
    import transformers
    from polar.loading import load_causal_lm, resolve_device, resolve_dtype

    if tokenizer_source:
        tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_source, trust_remote_code=False)
    else:
        tokenizer = load_causal_lm("HuggingFaceTB/SmolLM2-135M-Instruct", device="cpu").tokenizer
    shape = dict(CONFIG_SHAPES[model])
    config_class = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[shape.pop("arch")]
    config = config_class(**shape, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    dev = resolve_device(device)
    torch.manual_seed(0)
    with torch.device(dev):
        hf = transformers.AutoModelForCausalLM.from_config(
            config, dtype=resolve_dtype(dtype, dev), attn_implementation="sdpa"
        ).eval()
    runner = ProgramRunner(hf, tokenizer, source=f"random-weight {model}")
    if runner.device.type == "cuda":
        runner.enable_fast_path()
    return runner


class RecordingScorer:
    """Wraps a scorer and keeps every round's (question, program, outcome) triples, with its time."""

    def __init__(self, scorer) -> None:
        self.scorer = scorer
        self.rounds: list[list[tuple[object, list[int], object]]] = []
        self.round_seconds: list[float] = []
        self.round_captures: list[int] = []  # graphs captured so far, after each round

    @property
    def pairs(self) -> list[tuple[object, list[int], object]]:
        return [pair for r in self.rounds for pair in r]

    def score(self, questions, programs):
        started = time.perf_counter()
        outcomes = self.scorer.score(questions, programs)
        self.round_seconds.append(time.perf_counter() - started)
        fast = self.scorer.runner.fast_path
        if fast is not None:
            self.round_captures.append(fast.graphs_captured)
        self.rounds.append(list(zip(questions, [list(p) for p in programs], outcomes)))
        return outcomes


def round_limit(runner, scorer, rounds, bandwidth: float, flops: float) -> list[float]:
    """Seconds each round needs at least: FLOPs at the measured matmul rate plus, per decode
    token, max(FLOPs, bytes at the measured copy bandwidth).

    Work counted: prefill of each program from its first edit (the full-depth prefix of a question
    seen in an earlier round is reused; a question's first program prefills at full depth) with
    causal attention; per decode token, every schedule step's weights once, the LM head, each live
    row's KV (prompt + tokens so far, every program position) and its matmul FLOPs. Rows stop
    where they stopped. Padding, launches and the host are free here: that is the gap."""
    from polar.schedule import build_schedule, identity_prefix

    config = runner.config
    layer0 = runner.model.model.layers[0]
    params = sum(p.numel() for p in layer0.parameters())
    size = torch.empty((), dtype=runner.dtype).element_size()
    heads = config.num_attention_heads
    _, head_dim = runner.kv_shape
    hidden, vocab = config.hidden_size, config.vocab_size
    kv_column = runner.kv_column_bytes
    seen: set[object] = set()
    limits = []
    for pairs in rounds:
        prefill = 0.0
        lengths, programs, tokens = [], [], []
        for question, program, outcome in pairs:
            length = len(runner.encode([scorer.prompt_text(question)])[0])
            start = identity_prefix(program) if question.id in seen else 0
            seen.add(question.id)
            positions = len(program) - start if start else runner.num_layers + len(program) - identity_prefix(program)
            prefill += positions * length * (2 * params + 2 * length * heads * head_dim)
            lengths.append(length)
            programs.append(program)
            tokens.append(outcome.tokens + (1 if outcome.stopped else 0))
        steps = len(build_schedule(programs))
        decode = 0.0
        for t in range(max(tokens)):
            alive = [k for k, n in enumerate(tokens) if n > t]
            work = sum(2 * params * len(programs[k]) + 2 * hidden * vocab for k in alive)
            moved = steps * params * size + hidden * vocab * size
            moved += sum(len(programs[k]) * (lengths[k] + t) * kv_column for k in alive)
            decode += max(work / flops, moved / bandwidth)
        limits.append(prefill / flops + decode)
    return limits


def profile_round(scorer, pairs, path: Path | None) -> str:
    """One round again under torch.profiler: where its time goes (top kernels and host calls)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    questions, programs = [p[0] for p in pairs], [p[1] for p in pairs]
    with profile(activities=activities) as prof:
        scorer.score(questions, programs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    key = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=25)
    cpu = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    text = f"== by device time ==\n{table}\n== by host time ==\n{cpu}\n"
    if path is not None:
        path.write_text(text)
    return table


def release_way(runner, scorer, pairs, max_new_tokens: int) -> tuple[float, list[str | None]]:
    """Score each pair with its own HF ``generate`` call on a layer-patched model."""
    from transformers import DynamicCache

    from polar.math import extract_answer, is_equivalent
    from polar.prompts import completion_answer_text

    model, tok = runner.model, runner.tokenizer
    layers = model.model.layers
    full_config = copy.deepcopy(model.config)
    answers: list[str | None] = []
    sync = torch.cuda.synchronize if runner.device.type == "cuda" else (lambda: None)
    sync()
    started = time.perf_counter()
    try:
        for question, program, _ in pairs:
            prompt = scorer.prompt_text(question)
            # the exact token ids our engine feeds, so both ways see the same input
            input_ids = torch.tensor([runner.encode([prompt])[0]], device=runner.device)
            ids = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
            model.model.layers = torch.nn.ModuleList([layers[i] for i in program])
            model.config.num_hidden_layers = len(program)
            with torch.inference_mode():
                out = model.generate(
                    **ids, max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                    top_k=None, past_key_values=DynamicCache(config=full_config),
                    eos_token_id=sorted(runner.stop_token_ids) or None,
                    pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                )
            text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
            answer = extract_answer(completion_answer_text(text, scorer.prompt_style), scorer.answer_mode)
            is_equivalent(answer, question.answer)
            answers.append(answer)
        sync()
    finally:
        model.model.layers = layers
        model.config.num_hidden_layers = len(layers)
    return time.perf_counter() - started, answers


def load_bench_questions(count: int, levels: list[int]):
    """The first ``count`` MATH train questions of the given levels, level by level."""
    from polar.datasets import load_questions

    questions = []
    for level in levels:
        questions += load_questions("math", difficulty=level, limit=count - len(questions))
        if len(questions) >= count:
            break
    return questions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct",
                        help=f"hub id / dir / .gguf, or a random-weight shape: {', '.join(CONFIG_SHAPES)}")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--tokenizer", default=None,
                        help="random-weight shapes: a saved tokenizer folder instead of SmolLM2's")
    parser.add_argument("--questions", type=int, default=8, help="MATH train questions searched together")
    parser.add_argument("--levels", default="1,2", help="MATH levels the questions come from, in order")
    parser.add_argument("--simulations", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=50)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--prompt_style", default="plain")
    parser.add_argument("--answer_mode", default="boxed", choices=("boxed", "lenient"))
    parser.add_argument("--judge_workers", type=int, default=None, help="answer-checking processes")
    parser.add_argument("--release_pairs", type=int, default=None,
                        help="time the release's way on only the first N pairs (it is slow); default: all")
    parser.add_argument("--no_limit", action="store_true", help="skip the limit estimate")
    parser.add_argument("--profile", default=None, help="profile one more round; write the tables here")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    from polar.scoring import ProgramScorer
    from polar.search import SearchConfig, search_many

    runner = build_runner(args.model, args.device, args.dtype, args.tokenizer)
    questions = load_bench_questions(args.questions, [int(x) for x in args.levels.split(",")])
    scorer = ProgramScorer(runner, prompt_style=args.prompt_style, answer_mode=args.answer_mode,
                           max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                           judge_workers=args.judge_workers)
    lengths = sorted(len(runner.encode([scorer.prompt_text(q)])[0]) for q in questions)
    # the answer checker's lazy imports off the clock (the engine's compiles stay on it)
    from polar.scoring import judge_texts
    judge_texts(["\\boxed{1}"], ["1"], args.prompt_style, args.answer_mode)
    recorder = RecordingScorer(scorer)
    cuda = runner.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    started = time.perf_counter()
    search_many(questions, recorder, runner.num_layers, SearchConfig(num_simulations=args.simulations),
                model_name=args.model, max_active=args.batch_size)
    sync()
    ours_s = time.perf_counter() - started
    ours_n = len(recorder.pairs)
    stopped = sum(1 for _, _, o in recorder.pairs if o.stopped)
    print(f"polar: {ours_n} programs in {ours_s:.1f} s ({ours_n / ours_s:.1f}/s); first round "
          f"{recorder.round_seconds[0]:.1f} s, later rounds median "
          f"{sorted(recorder.round_seconds[1:] or [0])[len(recorder.round_seconds[1:]) // 2]:.2f} s; "
          f"generate {scorer.seconds['generate']:.1f} s, waiting for answer checks "
          f"{scorer.seconds['judge_wait']:.1f} s; {stopped} rows stopped early", flush=True)

    pairs = recorder.pairs[: args.release_pairs] if args.release_pairs else recorder.pairs
    release_way(runner, scorer, pairs[:1], args.max_new_tokens)  # warm-up
    release_s, release_answers = release_way(runner, scorer, pairs, args.max_new_tokens)
    agree = sum(a == o.answer for a, (_, _, o) in zip(release_answers, pairs))

    ours_rate, release_rate = ours_n / ours_s, len(pairs) / release_s
    cache = runner.prompt_cache.stats() if runner.prompt_cache is not None else None
    result = {
        "model": runner.model_name, "num_layers": runner.num_layers, "device": str(runner.device),
        "dtype": str(runner.dtype).replace("torch.", ""), "questions": len(questions),
        "prompt_tokens": {"min": lengths[0], "median": lengths[len(lengths) // 2], "max": lengths[-1],
                          "mean": round(sum(lengths) / len(lengths), 1)},
        "simulations": args.simulations, "fast_path": runner.fast_path is not None,
        "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "rounds": len(recorder.rounds),
        "polar_programs": ours_n, "polar_seconds": round(ours_s, 2), "polar_programs_per_s": round(ours_rate, 3),
        "first_round_s": round(recorder.round_seconds[0], 2),
        "round_seconds": [round(x, 3) for x in recorder.round_seconds],
        "generate_s": round(scorer.seconds["generate"], 2), "judge_wait_s": round(scorer.seconds["judge_wait"], 2),
        "rows_stopped_early": stopped, "prompt_cache": cache,
        "release_programs": len(pairs), "release_seconds": round(release_s, 2),
        "release_programs_per_s": round(release_rate, 3), "speedup": round(ours_rate / release_rate, 1),
        "same_answer": f"{agree}/{len(pairs)}",
    }
    fast = runner.fast_path
    if fast is not None:
        from torch._dynamo.utils import counters

        result.update({"graphs_captured": fast.graphs_captured, "capture_seconds": round(fast.capture_seconds, 2),
                       "captures_after_round": recorder.round_captures,
                       "dynamo_unique_graphs": int(counters["stats"].get("unique_graphs", 0)),
                       "triton_attention": fast.triton_attention, "fused": fast.fused, "compiled": fast.compiled,
                       "compactions": fast.compactions})
        print(f"fast path: {fast.graphs_captured} graphs captured in {fast.capture_seconds:.1f} s (compiles "
              f"included); triton attention {fast.triton_attention}; {fast.compactions} compactions", flush=True)
    if cuda and not args.no_limit:
        from ceilings import copy_bandwidth, matmul_rate

        bandwidth, flops = copy_bandwidth(), matmul_rate()
        limits = round_limit(runner, scorer, recorder.rounds, bandwidth, flops)
        result.update({
            "copy_bandwidth_TBps": round(bandwidth / 1e12, 2), "matmul_TFLOPps": round(flops / 1e12, 1),
            "limit_seconds": round(sum(limits), 2), "limit_programs_per_s": round(ours_n / sum(limits), 1),
            "fraction_of_limit": round(sum(limits) / ours_s, 3),
            "limit_round_s_median": round(sorted(limits)[len(limits) // 2], 3),
        })
    if args.profile:
        middle = recorder.rounds[len(recorder.rounds) // 2]
        print(profile_round(scorer, [(q, p) for q, p, _ in middle], Path(args.profile)))

    print(f"model {result['model']} (D={runner.num_layers}) on {result['device']}, {result['dtype']}; "
          f"{len(questions)} questions x {args.simulations} simulations, max_new_tokens={args.max_new_tokens}, "
          f"batch {args.batch_size}; prompt tokens {result['prompt_tokens']}")
    print("| way | programs | seconds | programs/s |")
    print("|---|---:|---:|---:|")
    print(f"| polar lockstep batched search | {ours_n} | {ours_s:.1f} | {ours_rate:.2f} |")
    print(f"| release: one HF generate per program | {len(pairs)} | {release_s:.1f} | {release_rate:.2f} |")
    print(f"speedup: {result['speedup']}x   same extracted answer: {result['same_answer']}")
    if "limit_seconds" in result:
        print(f"limit (FLOPs at {result['matmul_TFLOPps']} TFLOP/s, bytes at {result['copy_bandwidth_TBps']} TB/s): "
              f"{result['limit_seconds']} s = {result['limit_programs_per_s']} programs/s; reached "
              f"{result['fraction_of_limit']:.1%} of it")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
