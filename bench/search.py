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
    """Wraps a scorer and keeps every (question, program) pair it scored, with outcomes."""

    def __init__(self, scorer) -> None:
        self.scorer = scorer
        self.pairs: list[tuple[object, list[int], object]] = []

    def score(self, questions, programs):
        outcomes = self.scorer.score(questions, programs)
        self.pairs.extend(zip(questions, [list(p) for p in programs], outcomes))
        return outcomes


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
            prompt, _ = scorer._prompt(question)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct",
                        help=f"hub id / dir / .gguf, or a random-weight shape: {', '.join(CONFIG_SHAPES)}")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--tokenizer", default=None,
                        help="random-weight shapes: a saved tokenizer folder instead of SmolLM2's")
    parser.add_argument("--questions", type=int, default=8, help="MATH level-1 questions searched together")
    parser.add_argument("--simulations", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=50)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--prompt_style", default="plain")
    parser.add_argument("--release_pairs", type=int, default=None,
                        help="time the release's way on only the first N pairs (it is slow); default: all")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    from polar.datasets import load_questions
    from polar.scoring import ProgramScorer
    from polar.search import SearchConfig, search_many

    runner = build_runner(args.model, args.device, args.dtype, args.tokenizer)
    questions = load_questions("math", difficulty=1, limit=args.questions)
    scorer = ProgramScorer(runner, prompt_style=args.prompt_style, max_new_tokens=args.max_new_tokens,
                           batch_size=args.batch_size)
    # warm-up (first-call allocations, lazy imports of the answer checker) off the clock
    scorer.score(questions[:1], [list(range(runner.num_layers))])
    recorder = RecordingScorer(scorer)
    sync = torch.cuda.synchronize if runner.device.type == "cuda" else (lambda: None)
    sync()
    started = time.perf_counter()
    search_many(questions, recorder, runner.num_layers, SearchConfig(num_simulations=args.simulations),
                model_name=args.model)
    sync()
    ours_s = time.perf_counter() - started
    ours_n = len(recorder.pairs)

    pairs = recorder.pairs[: args.release_pairs] if args.release_pairs else recorder.pairs
    release_way(runner, scorer, pairs[:1], args.max_new_tokens)  # warm-up
    release_s, release_answers = release_way(runner, scorer, pairs, args.max_new_tokens)
    agree = sum(a == o.answer for a, (_, _, o) in zip(release_answers, pairs))

    ours_rate, release_rate = ours_n / ours_s, len(pairs) / release_s
    result = {
        "model": runner.model_name, "num_layers": runner.num_layers, "device": str(runner.device),
        "dtype": str(runner.dtype).replace("torch.", ""), "questions": len(questions),
        "simulations": args.simulations, "fast_path": runner.fast_path is not None, "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
        "polar_programs": ours_n, "polar_seconds": round(ours_s, 2), "polar_programs_per_s": round(ours_rate, 3),
        "release_programs": len(pairs), "release_seconds": round(release_s, 2),
        "release_programs_per_s": round(release_rate, 3), "speedup": round(ours_rate / release_rate, 1),
        "same_answer": f"{agree}/{len(pairs)}",
    }
    print(f"model {result['model']} (D={runner.num_layers}) on {result['device']}, {result['dtype']}; "
          f"{len(questions)} questions x {args.simulations} simulations, max_new_tokens={args.max_new_tokens}")
    print("| way | programs | seconds | programs/s |")
    print("|---|---:|---:|---:|")
    print(f"| polar lockstep batched search | {ours_n} | {ours_s:.1f} | {ours_rate:.2f} |")
    print(f"| release: one HF generate per program | {len(pairs)} | {release_s:.1f} | {release_rate:.2f} |")
    print(f"speedup: {result['speedup']}x   same extracted answer: {result['same_answer']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
