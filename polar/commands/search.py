"""``polar search``: label questions with valid programs by MCTS (SPEC 5).

Writes ``{out}/{model}/dart-math-diff-N/merged_mcts_samples.json`` (the release's supervision
format), ``summary.json`` and two plots. Restartable (rerun the same command to resume) and
shardable (``--shard i/n`` or RANK/WORLD_SIZE set by ``torchrun``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from polar.distributed import default_device, parse_shard
from polar.flags import (
    finite_float,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
    seed,
    torch_device,
)

DATASETS = ("dart", "math", "gsm8k", "math500", "asdiv", "mawps", "svamp")
DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "search",
        help="find valid programs per question by MCTS (writes merged_mcts_samples.json)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model_path", default=DEFAULT_MODEL, help="hub id, local directory or .gguf file")
    p.add_argument("--dataset", type=dataset_argument, default="math", metavar="NAME_OR_PATH",
                   help=f"question pool: {', '.join(DATASETS)}; 'math' is the offline equivalent of 'dart'; a local copy of the "
                        "DART-Math pool (.jsonl/.json/.parquet file or folder) is read as 'dart' (default: math)")
    p.add_argument("--target_diff", type=int, choices=range(1, 6), metavar="N", help="difficulty level 1-5")
    p.add_argument("--limit", type=positive_int, default=None, help="search only this many questions")
    p.add_argument("--offset", type=non_negative_int, default=0, help="skip this many questions first")
    p.add_argument("--num_simulations", type=positive_int, default=100,
                   help="MCTS iterations per question (release policy: an iteration may evaluate nothing; "
                        "widening: newly evaluated programs)")
    p.add_argument("--max_new_tokens", type=positive_int, default=50)
    p.add_argument("--prompt_style", default=None,
                   help="prompt wrapping (plain, chat, chat_nothink; default: the model's reference style)")
    p.add_argument("--answer_mode", choices=("boxed", "lenient"), default="boxed")
    p.add_argument("--fewshot", type=non_negative_int, default=0)
    p.add_argument("--batch_size", type=positive_int, default=None,
                   help="sequences per engine call (default: what fits in free GPU memory, up to 1024; 64 on the CPU)")
    p.add_argument("--max_active", type=positive_int, default=None,
                   help="questions searched at once (default: batch_size)")
    p.add_argument("--seed", type=seed, default=42,
                   help="search RNG seed (the release reseeds 42 for every question; default: 42)")
    p.add_argument("--device", type=torch_device, default=None, help="cpu, cuda, cuda:1 ... (default: cuda:LOCAL_RANK if available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--min_length", type=positive_int, default=None, help="shortest allowed program (default: per model)")
    p.add_argument("--max_length", type=positive_int, default=None, help="longest allowed program (default: per model)")
    p.add_argument("--epsilon", type=probability, default=0.1, help="chance of a random move at each step of selection")
    p.add_argument("--length_penalty", type=finite_float, default=5.0, help="UCB penalty per length/D (negative favours longer programs)")
    p.add_argument("--exploration", type=non_negative_float, default=2 ** 0.5, help="UCB exploration constant")
    p.add_argument("--tree_policy", choices=("release", "widening"), default="release",
                   help="release: the authors' MCTS (default); widening: progressive widening (see polar.search)")
    p.add_argument("--widening", type=finite_float, default=None,
                   help="--tree_policy widening only: widening exponent (default 0.5); <= 0 for classic UCT")
    p.add_argument("--shard", default=None, metavar="i/n",
                   help="search shard i of n (default: RANK/WORLD_SIZE from the environment, else 0/1)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    p.add_argument("--time_limit", type=positive_float, default=None, metavar="SECONDS",
                   help="start no question after this many seconds; merge what finished (rerun to continue)")
    p.add_argument("--out", required=True, help="output root (like --data_root of training)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace results made with other settings under --out (default: refuse and name them)")
    p.add_argument("--trust_remote_code", action="store_true",
                   help="allow the model's own Python code to run (off by default)")
    p.set_defaults(func=run)


def dataset_argument(value: str) -> str:
    """A name from DATASETS, or a local DART-Math pool file or folder."""
    from polar.dart_pool import is_local_pool

    if value in DATASETS or is_local_pool(value):
        return value
    raise argparse.ArgumentTypeError(
        f"{value!r} is neither one of {', '.join(DATASETS)} nor a DART-Math pool file or folder (.jsonl, .json, .parquet)"
    )


def load_question_list(dataset: str, target_diff: int | None, offset: int, limit: int | None) -> list[Any]:
    from polar.datasets import load_questions

    if offset < 0 or (limit is not None and limit < 1):
        raise ValueError("--offset must not be negative and --limit must be positive")
    wanted = None if limit is None else offset + limit
    questions = list(load_questions(dataset, difficulty=target_diff, limit=wanted))
    return questions[offset:wanted]


def widening_option(tree_policy: str, widening: float | None) -> dict[str, Any]:
    """``SearchConfig`` keywords for ``--widening`` (<= 0: classic UCT). The release policy has no
    widening, so the flag with it is an error rather than silently ignored."""
    if widening is None:
        return {}
    if tree_policy != "widening":
        raise ValueError(f"--widening applies only to --tree_policy widening (got --tree_policy {tree_policy})")
    return {"widening": widening if widening > 0 else None}


def resolve_prompt_style(style: str | None, model_path: str) -> str:
    if style is not None:
        return style
    from polar.prompts import default_prompt_style

    return default_prompt_style(model_path)


def run(args: argparse.Namespace) -> int:
    from polar.distributed import join_group, leave_group, wait_for_all_ranks
    from polar.io import check_writable_dir, run_metadata
    from polar.data import model_dir_name
    from polar.search import SearchConfig, merge_shards, run_shard, task_name

    if args.min_length is not None and args.max_length is not None and args.min_length > args.max_length:
        raise ValueError(f"argument --min_length: {args.min_length} is above --max_length {args.max_length}")
    check_writable_dir(args.out, "--out")  # results are written as questions finish: fail before the first
    shard, num_shards = parse_shard(args.shard)
    pool_kind = args.dataset if args.dataset in DATASETS else "dart"  # a local pool file is the DART pool
    task_dir = Path(args.out) / model_dir_name(args.model_path) / task_name(pool_kind, args.target_diff)
    config = SearchConfig(
        num_simulations=args.num_simulations, epsilon=args.epsilon, length_penalty=args.length_penalty,
        exploration=args.exploration, min_length=args.min_length, max_length=args.max_length,
        tree_policy=args.tree_policy, seed=args.seed, **widening_option(args.tree_policy, args.widening),
    )
    prompt_style = resolve_prompt_style(args.prompt_style, args.model_path)
    questions = load_question_list(args.dataset, args.target_diff, args.offset, args.limit)
    if not questions:
        if args.offset == 0:
            raise ValueError(f"argument --dataset: {args.dataset} holds no questions"
                             + (f" of difficulty {args.target_diff}" if args.target_diff else ""))
        raise ValueError(f"argument --offset: {args.offset} is past the last question of {args.dataset}")
    resume_key = {
        "model_path": args.model_path, "dataset": args.dataset, "target_diff": args.target_diff,
        "offset": args.offset, "limit": args.limit, "questions": len(questions), "dtype": args.dtype,
        "prompt_style": prompt_style, "answer_mode": args.answer_mode, "fewshot": args.fewshot,
        "max_new_tokens": args.max_new_tokens, "search": config.as_dict(),
    }
    device = default_device(args.device)
    settings = {**resume_key, "seed": args.seed, "simulations": args.num_simulations,
                "batch_size": args.batch_size, "device": device}

    def make_scorer():
        from polar.engine import ProgramRunner
        from polar.scoring import ProgramScorer

        runner = ProgramRunner.from_pretrained(args.model_path, device=device, dtype=args.dtype,
                                               trust_remote_code=args.trust_remote_code)
        scorer = ProgramScorer(runner, prompt_style=prompt_style, answer_mode=args.answer_mode,
                               max_new_tokens=args.max_new_tokens, fewshot=args.fewshot,
                               batch_size=args.batch_size or 64)
        if args.batch_size is None:
            lengths = [len(ids) for ids in runner.encode([scorer.prompt_text(q) for q in questions[:256]])]
            scorer.batch_size = runner.suggest_batch_size(lengths, args.max_new_tokens)
            _stderr(f"batch size {scorer.batch_size} (from free device memory; --batch_size to choose)")
        settings["batch_size"] = scorer.batch_size
        settings["model_source"] = runner.model_name
        settings["num_layers"] = runner.num_layers
        state_metadata.update(run_metadata(**settings))
        return scorer, runner.num_layers

    state_metadata: dict[str, Any] = {}
    grouped = args.shard is None and join_group()  # under torchrun: rank 0 merges after a barrier
    mine = sum(1 for k in range(len(questions)) if k % num_shards == shard)
    bar = _ProgressBar(mine, disabled=args.no_progress)
    try:
        state = run_shard(
            questions, make_scorer, task_dir, resume_key, state_metadata, config, args.model_path,
            shard=shard, num_shards=num_shards, max_active=args.max_active,
            progress=bar.update, time_limit=args.time_limit, overwrite=args.overwrite, log=_stderr,
        )
    finally:
        bar.close()
    print(f"shard {shard}/{num_shards}: {len(state['samples'])} of {mine} questions done", file=sys.stderr)
    if grouped:
        wait_for_all_ranks()
        leave_group()
        if shard != 0:
            return 0
    partial = args.time_limit is not None and not state["complete"]
    if partial:
        print(f"time limit reached: {len(state['samples'])} of {mine} questions searched; "
              "rerun the same command without --time_limit to continue", file=sys.stderr)
    merged = merge_shards(task_dir, num_shards, partial=partial)
    if merged is None:
        print(f"waiting for other shards; merge later with: polar merge --out {args.out} "
              f"--model_path {args.model_path} --dataset {pool_kind} --target_diff {args.target_diff}",
              file=sys.stderr)
        return 0
    print_summary(*merged)
    return 0


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def print_summary(merged_path: Path, summary: dict[str, Any]) -> None:
    print(f"wrote {merged_path}")
    for key, value in summary.items():
        print(f"  {key}: {value}")


class _ProgressBar:
    """tqdm bar over questions, with programs evaluated and programs/s in the postfix."""

    def __init__(self, total: int, disabled: bool = False) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="q", desc="search", disable=disabled, dynamic_ncols=True)
        self.programs = 0
        self.started = time.perf_counter()

    def update(self, finished: int, programs: int) -> None:
        self.programs += programs
        rate = self.programs / max(1e-9, time.perf_counter() - self.started)
        self.bar.set_postfix(programs=self.programs, prog_per_s=f"{rate:.1f}", refresh=False)
        self.bar.update(finished)

    def close(self) -> None:
        self.bar.close()
