"""Engine throughput: many distinct programs in one batch vs the release's way.

The release runs one program at a time: it patches the model's layer list to the program and
calls HF ``generate``. We run all programs in one heterogeneous batch through ``ProgramRunner``.
Both generate exactly ``--new_tokens`` tokens per program (no early stop) from the same prompts,
so the work is identical. Also times a single full-depth program against plain HF ``generate``.

    python bench/engine.py                      # SmolLM2 (offline) + a random-weight Qwen3-0.6B shape
    python bench/engine.py --models smollm2 --programs 16 --new_tokens 32
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from polar.engine import ProgramRunner  # noqa: E402

QUESTION = (
    "Solve the following math problem and output ONLY the final answer directly, formatted strictly as "
    "\\boxed{{ANSWER}}.\n### Problem Start\n{q}\n### Problem End\nAnswer:"
)
QUESTIONS = [
    "What is the sum of the first ten positive integers?",
    "If $3x + 5 = 20$, what is $x$?",
    "A rectangle has sides 4 and 7. What is its area?",
    "Compute $2^{10} - 1000$.",
]


def mcts_like_programs(num_layers: int, count: int, seed: int = 0) -> list[list[int]]:
    """Distinct programs like the ones search visits: full depth with 1-3 block skips/repeats."""
    rng = random.Random(seed)
    seen: set[tuple[int, ...]] = set()
    programs = []
    while len(programs) < count:
        program = list(range(num_layers))
        for _ in range(rng.randint(1, 3)):
            size = rng.randint(1, 4)
            start = rng.randrange(0, num_layers - size)
            block = list(range(start, start + size))
            if rng.random() < 0.5 and all(x in program for x in block):
                program = [x for x in program if x not in block]
            elif all(program.count(x) == 1 for x in block) and block[-1] in program:
                at = program.index(block[-1]) + 1
                program = program[:at] + block + program[at:]
        key = tuple(program)
        if key not in seen:
            seen.add(key)
            programs.append(program)
    return programs


def _shallow_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A module sharing its weights but with its own submodule table (``copy.copy`` alone would
    share the table, so replacing a submodule of the copy would change the original)."""
    clone = copy.copy(module)
    clone._modules = dict(module._modules)
    return clone


def release_style_generate(model, program: list[int], ids: torch.Tensor, new_tokens: int) -> list[int]:
    """One program through HF generate with the layer list patched (the release's approach)."""
    original_layers, original_depth = model.model.layers, model.config.num_hidden_layers
    original_types = getattr(model.config, "layer_types", None)
    patched = []
    for k, i in enumerate(program):  # give each position its own cache slot (unrolled semantics)
        layer = _shallow_copy(original_layers[i])
        layer.self_attn = _shallow_copy(layer.self_attn)
        layer.self_attn.layer_idx = k
        patched.append(layer)
    model.model.layers = torch.nn.ModuleList(patched)
    model.config.num_hidden_layers = len(program)
    if original_types:
        model.config.layer_types = [original_types[i] for i in program]
    try:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    finally:
        model.model.layers, model.config.num_hidden_layers = original_layers, original_depth
        if original_types:
            model.config.layer_types = original_types
    return out[0, ids.shape[1]:].tolist()


def load(name: str, device: str) -> ProgramRunner:
    if name == "smollm2":
        return ProgramRunner.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct", device=device)
    if name == "qwen3-0.6b-random":
        from transformers import AutoModelForCausalLM, Qwen3Config

        config = Qwen3Config(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                             num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                             vocab_size=151936, tie_word_embeddings=True)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
        return ProgramRunner(model.to(device).eval(), load("smollm2", device).tokenizer, source=name)
    raise ValueError(f"unknown model {name!r}")


def bench_model(name: str, args: argparse.Namespace) -> dict:
    runner = load(name, args.device)
    tok = runner.tokenizer
    prompts = [QUESTION.format(q=QUESTIONS[i % len(QUESTIONS)]) for i in range(args.programs)]
    token_lists = runner.encode(prompts)
    programs = mcts_like_programs(runner.num_layers, args.programs)
    model = runner.model
    torch.set_grad_enabled(False)

    # warm-up both paths once
    runner.generate(token_lists[:2], programs[:2], max_new_tokens=2, stop_token_ids=set())
    release_style_generate(model, programs[0], torch.tensor([token_lists[0]]), 2)

    start = time.perf_counter()
    ours = runner.generate(token_lists, programs, max_new_tokens=args.new_tokens, stop_token_ids=set())
    ours_s = time.perf_counter() - start

    start = time.perf_counter()
    theirs = [release_style_generate(model, p, torch.tensor([t]), args.new_tokens)
              for p, t in zip(programs, token_lists)]
    theirs_s = time.perf_counter() - start
    agree = sum(o.token_ids == t for o, t in zip(ours, theirs))

    ids = torch.tensor([token_lists[0]])
    full = list(range(runner.num_layers))
    start = time.perf_counter()
    single = runner.generate([token_lists[0]], [full], max_new_tokens=args.new_tokens, stop_token_ids=set())
    single_s = time.perf_counter() - start
    start = time.perf_counter()
    hf = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                        min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    hf_s = time.perf_counter() - start
    del tok
    return {
        "model": name,
        "layers": runner.num_layers,
        "programs": args.programs,
        "new_tokens": args.new_tokens,
        "batched_s": ours_s,
        "release_way_s": theirs_s,
        "speedup_batch": theirs_s / ours_s,
        "programs_agreeing": f"{agree}/{args.programs}",
        "single_full_depth_s": single_s,
        "hf_generate_s": hf_s,
        "single_vs_hf": hf_s / single_s,
        "single_matches_hf": single[0].token_ids == hf[0, ids.shape[1]:].tolist(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2", "qwen3-0.6b-random"])
    parser.add_argument("--programs", type=int, default=16)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        rows.append(bench_model(name, args))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'model':<20}{'D':>4}{'batched s':>11}{'release s':>11}{'ratio':>8}{'agree':>8}"
          f"{'1 prog s':>10}{'HF s':>8}{'HF/ours':>9}")
    for r in rows:
        print(f"{r['model']:<20}{r['layers']:>4}{r['batched_s']:>11.2f}{r['release_way_s']:>11.2f}"
              f"{r['speedup_batch']:>7.1f}x{r['programs_agreeing']:>8}{r['single_full_depth_s']:>10.2f}"
              f"{r['hf_generate_s']:>8.2f}{r['single_vs_hf']:>8.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
