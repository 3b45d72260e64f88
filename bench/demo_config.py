"""Which question set / prompt / answer rule should ``polar demo`` use with SmolLM2-135M?

The demo must show the pipeline on a model this small, so it needs a configuration with *room
both ways*: full-depth greedy right on some questions (so shorter programs can stay right) and
wrong on others (so other programs can fix them). This script measures, for every candidate:

1. **Base accuracy** (full depth, greedy) per question set x prompt style x few-shot, scored with
   both answer rules (``boxed`` and ``lenient``) and two generation lengths, from ONE generation
   per prompt (the short length is the long completion cut after its first tokens).
2. **Room both ways** for chosen configurations: per question a few random programs shaped like
   the search's moves (skip or repeat a block of 1-4 layers, then up to two single-layer moves);
   how often a wrong full-depth answer becomes right, and how often a right one stays right with
   a shorter program.

Usage (results in docs/demo-choice.md)::

    python bench/demo_config.py --threads 1 --limit 24 --sets add1 add2
    python bench/demo_config.py --threads 1 --limit 16 --sets math gsm8k asdiv mawps svamp
    python bench/demo_config.py --threads 1 --skip_base --room add1:chat:0:lenient:16 add1:plain:0:lenient:16
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_SETS = ("add1", "add2", "math", "gsm8k", "asdiv", "mawps", "svamp")
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", default=SMOLLM2)
    p.add_argument("--sets", nargs="+", default=list(DEFAULT_SETS), help="question sets ('math' = MATH level 1)")
    p.add_argument("--styles", nargs="+", default=["plain", "chat"])
    p.add_argument("--fewshots", nargs="+", type=int, default=[0, 4])
    p.add_argument("--limit", type=int, default=24, help="questions per set")
    p.add_argument("--max_new_tokens", type=int, default=50)
    p.add_argument("--short_tokens", type=int, default=16, help="also score completions cut to this many tokens")
    p.add_argument("--room", nargs="*", default=[],
                   help="configurations for the room-both-ways test: set:style:fewshot:answer_mode:tokens")
    p.add_argument("--room_questions", type=int, default=16)
    p.add_argument("--room_programs", type=int, default=10)
    p.add_argument("--skip_base", action="store_true", help="only run the room-both-ways test")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write all numbers here")
    return p.parse_args(argv)


def judge(texts: Sequence[str], golds: Sequence[str], style: str, mode: str) -> list[bool]:
    """Correctness of each completion under one answer rule (the scorer's own check)."""
    from polar.scoring import judge_texts

    return [correct for _, correct in judge_texts(texts, golds, style, mode)]


def random_programs(num_layers: int, bounds: tuple[int, int], count: int, rng: random.Random) -> list[list[int]]:
    """Programs like the ones MCTS visits: one block move from the root, then 0-2 single moves."""
    from polar.search import SearchConfig, legal_children

    config = SearchConfig()
    full = tuple(range(num_layers))
    out: list[tuple[int, ...]] = []
    tries = 0
    while len(out) < count and tries < 100 * count:
        tries += 1
        program = rng.choice(legal_children(full, True, bounds, config))
        for _ in range(rng.randint(0, 2)):
            children = legal_children(program, False, bounds, config)
            if children:
                program = rng.choice(children)
        if program not in out and program != full:
            out.append(program)
    return [list(p) for p in out]


def base_accuracy(runner: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    from tqdm import tqdm

    from polar.demo import demo_questions
    from polar.prompts import format_prompt

    rows = []
    grid = [(s, st, f) for s in args.sets for st in args.styles for f in args.fewshots]
    for name, style, fewshot in tqdm(grid, desc="base accuracy", unit="config"):
        questions = demo_questions(name, args.limit, difficulty=1 if name == "math" else None, seed=args.seed)
        prompts = [format_prompt(q.question, style, runner.tokenizer, fewshot=fewshot) for q in questions]
        started = time.perf_counter()
        gens = runner.generate(prompts, max_new_tokens=args.max_new_tokens)
        seconds = time.perf_counter() - started
        golds = [q.answer for q in questions]
        long_texts = [g.text for g in gens]
        short_texts = [runner.tokenizer.decode(g.token_ids[: args.short_tokens], skip_special_tokens=True) for g in gens]
        row: dict[str, Any] = {"set": name, "style": style, "fewshot": fewshot, "n": len(questions),
                               "seconds": round(seconds, 1), "example": long_texts[0][:80]}
        for tokens, texts in ((args.short_tokens, short_texts), (args.max_new_tokens, long_texts)):
            for mode in ("boxed", "lenient"):
                row[f"{mode}@{tokens}"] = sum(judge(texts, golds, style, mode))
        rows.append(row)
        tqdm.write(json.dumps(row))
    return rows


def room_both_ways(runner: Any, spec: str, args: argparse.Namespace) -> dict[str, Any]:
    from polar.demo import demo_questions
    from polar.scoring import ProgramScorer
    from polar.search import length_bounds

    name, style, fewshot, mode, tokens = spec.split(":")
    questions = demo_questions(name, args.room_questions, difficulty=1 if name == "math" else None, seed=args.seed)
    scorer = ProgramScorer(runner, prompt_style=style, answer_mode=mode, max_new_tokens=int(tokens),
                           fewshot=int(fewshot))
    D = runner.num_layers
    bounds = length_bounds(runner.model_name, D)
    rng = random.Random(args.seed)
    pairs_q, pairs_p = [], []
    for q in questions:
        for program in [list(range(D))] + random_programs(D, bounds, args.room_programs, rng):
            pairs_q.append(q)
            pairs_p.append(program)
    started = time.perf_counter()
    outcomes = scorer.score(pairs_q, pairs_p)
    seconds = time.perf_counter() - started
    per_q = args.room_programs + 1
    base_right = fixed = kept_shorter = right_programs = 0
    for k in range(len(questions)):
        block = list(zip(pairs_p[k * per_q:(k + 1) * per_q], outcomes[k * per_q:(k + 1) * per_q]))
        base = block[0][1].correct
        others = block[1:]
        right_programs += sum(o.correct for _, o in others)
        if base:
            base_right += 1
            kept_shorter += any(o.correct and len(p) < D for p, o in others)
        else:
            fixed += any(o.correct for _, o in others)
    n = len(questions)
    return {
        "config": spec, "questions": n, "programs_per_question": args.room_programs,
        "base_right": base_right, "right_kept_by_shorter": kept_shorter,
        "base_wrong": n - base_right, "wrong_fixed": fixed,
        "random_programs_right": right_programs, "random_programs": n * args.room_programs,
        "seconds": round(seconds, 1),
    }


def markdown(rows: list[dict[str, Any]], room: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = []
    if rows:
        s, l = args.short_tokens, args.max_new_tokens
        lines += [f"| set | style | few-shot | n | boxed@{s} | lenient@{s} | boxed@{l} | lenient@{l} | s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['set']} | {r['style']} | {r['fewshot']} | {r['n']} | {r[f'boxed@{s}']} | "
                         f"{r[f'lenient@{s}']} | {r[f'boxed@{l}']} | {r[f'lenient@{l}']} | {r['seconds']} |")
    if room:
        lines += ["", "| config (set:style:fewshot:answer:tokens) | right at full depth | ... kept by a shorter program "
                  "| wrong at full depth | ... fixed by some program | random programs right |",
                  "|---|---|---|---|---|---|"]
        for r in room:
            lines.append(f"| {r['config']} | {r['base_right']}/{r['questions']} | {r['right_kept_by_shorter']}/"
                         f"{r['base_right']} | {r['base_wrong']}/{r['questions']} | {r['wrong_fixed']}/{r['base_wrong']} "
                         f"| {r['random_programs_right']}/{r['random_programs']} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from polar.engine import ProgramRunner

    runner = ProgramRunner.from_pretrained(args.model_path, device="cpu")
    rows = [] if args.skip_base else base_accuracy(runner, args)
    room = [room_both_ways(runner, spec, args) for spec in args.room]
    for r in room:
        print(json.dumps(r), file=sys.stderr)
    if args.json:
        from polar.io import run_metadata, write_json_atomic

        write_json_atomic(args.json, {"base": rows, "room": room,
                                      "metadata": run_metadata(**{k: v for k, v in vars(args).items() if k != "json"})})
    print(markdown(rows, room, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
