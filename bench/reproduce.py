"""Small-scale reproduction of the paper's Tables 1-2: search -> train -> evaluate, per level.

For each MATH level it runs ``polar search`` (time-limited: whatever finishes is kept), then
trains one predictor on all levels with the release README's example flags through
``run_polar.py``, evaluates it live on each level's held-out questions and on out-of-distribution
sets, and writes one table (``reproduction.md`` / ``reproduction.json``) in the shape of the
paper's tables. The split keeps the paper's proportions (1250/250/500 of 2000 -> 62.5/12.5/25 %)
at whatever number of questions the search labelled.

    python bench/reproduce.py --model_path HuggingFaceTB/SmolLM2-135M-Instruct --device cuda \\
        --questions_per_level 400 --simulations 100 --search_seconds 60 --out repro
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from polar.data import load_samples, supervision_path  # noqa: E402
from polar.io import run_metadata, write_json_atomic, write_text_atomic  # noqa: E402
from polar.release_cli import main as release_main  # noqa: E402

RELEASE_EXAMPLE = [  # the release README's example run
    "--num_epochs", "10", "--batch_size", "128", "--learning_rate", "5e-4", "--max_paths_per_sample", "50",
    "--per_sample_weight_normalize", "--beam_size", "5", "--top_k_paths", "5",
    "--reweight_original_path_if_shorter_valid", "--original_path_weight", "0.30", "--seed", "42",
    "--lr_scheduler", "cosine", "--warmup_steps", "10",
]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    p.add_argument("--questions_per_level", type=int, default=400)
    p.add_argument("--simulations", type=int, default=100)
    p.add_argument("--max_new_tokens", type=int, default=50)
    p.add_argument("--search_seconds", type=float, default=None, help="time limit of each level's search")
    p.add_argument("--search_budget", type=float, default=None,
                   help="seconds for all levels' search: sizes the questions per level from a probe")
    p.add_argument("--prompt_style", default="chat")
    p.add_argument("--answer_mode", default="lenient")
    p.add_argument("--encoder", default="self")
    p.add_argument("--batch_size", type=int, default=256, help="sequences per engine call")
    p.add_argument("--ood", nargs="*", default=["asdiv", "mawps"])
    p.add_argument("--ood_limit", type=int, default=300)
    p.add_argument("--device", default=None)
    p.add_argument("--demo", action="store_true", help="also run the demo's question set (polar demo pipeline)")
    p.add_argument("--out", default="repro")
    return p.parse_args()


def probe_round_seconds(runner, args: argparse.Namespace, rows: int) -> float:
    """Seconds of one search round of ``rows`` distinct programs at full length (no early stop):
    the upper bound used to size the search to the time budget."""
    from engine import mcts_like_programs

    prompt = "Solve the following math problem. " * 12
    for seed in (1, 2):  # warm-ups: compiles and most graph captures happen here, not in the timing
        runner.generate([prompt] * rows, mcts_like_programs(runner.num_layers, rows, seed=seed),
                        max_new_tokens=args.max_new_tokens, stop_token_ids=set())
    programs = mcts_like_programs(runner.num_layers, rows, seed=3)
    start = time.perf_counter()
    runner.generate([prompt + str(i) for i in range(rows)], programs, max_new_tokens=args.max_new_tokens,
                    stop_token_ids=set())
    return time.perf_counter() - start


def search_level(args: argparse.Namespace, runner, level: int, questions: int, data: Path) -> dict:
    """One level's search with an already loaded model (the CLI would reload it per level)."""
    from polar.data import model_dir_name
    from polar.datasets import load_questions
    from polar.scoring import ProgramScorer
    from polar.search import SearchConfig, merge_shards, run_shard, task_name

    config = SearchConfig(num_simulations=args.simulations)
    scorer = ProgramScorer(runner, prompt_style=args.prompt_style, answer_mode=args.answer_mode,
                           max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    items = load_questions("math", difficulty=level, limit=questions)
    task_dir = data / model_dir_name(args.model_path) / task_name("math", level)
    settings = {"model_path": args.model_path, "dataset": "math", "target_diff": level, "limit": questions,
                "prompt_style": args.prompt_style, "answer_mode": args.answer_mode, "fewshot": 0,
                "max_new_tokens": args.max_new_tokens, "search": config.as_dict(), "num_layers": runner.num_layers,
                "model_source": runner.model_name, "seed": config.seed, "simulations": args.simulations}
    run_shard(items, lambda: (scorer, runner.num_layers), task_dir, settings, run_metadata(**settings), config,
              args.model_path, max_active=args.batch_size, time_limit=args.search_seconds)
    merged = merge_shards(task_dir, 1, partial=True)
    if merged is None:
        raise SystemExit(f"level {level}: no question finished")
    return merged[1]


def run_demo_stage(args: argparse.Namespace, out: Path) -> dict:
    """The demo's question set through the demo pipeline at this run's search settings."""
    from polar.demo import DemoConfig, run_demo

    config = DemoConfig(simulations=args.simulations, max_new_tokens=args.max_new_tokens, device=args.device,
                        out=str(out / "demo"), progress=False)
    start = time.perf_counter()
    report = run_demo(config)
    summary = json.loads((report.parent / "summary.json").read_text())
    metrics = {k: summary[k] for k in ("search", "test", "chance", "timings") if k in summary}
    return {"set": config.question_set, "seconds": round(time.perf_counter() - start, 1), "metrics": metrics,
            "report": str(report)}


def split_sizes(counts: list[int]) -> tuple[int, int, int]:
    """The paper's 1250/250/500 proportions at the smallest level's size."""
    n = min(counts)
    train, val = int(n * 0.625), int(n * 0.125)
    return train, val, n - train - val


def release_args(args: argparse.Namespace, data: Path, save: Path, sizes: tuple[int, int, int]) -> list[str]:
    return [
        "--model_path", args.model_path, "--data_root", str(data), "--save_dir", str(save), "--eval_all_diffs",
        "--encoder", args.encoder, "--prompt_style", args.prompt_style, "--answer_mode", args.answer_mode,
        "--max_new_tokens", str(args.max_new_tokens), "--split_sizes", f"{sizes[0]},{sizes[1]}",
        "--num_samples", str(sizes[2]), "--eval_batch_size", str(args.batch_size), "--no_progress",
        *(["--device", args.device] if args.device else []), *RELEASE_EXAMPLE,
    ]


def table(rows: list[dict], ood: dict[str, dict]) -> str:
    def pct(x):
        return "–" if x is None else f"{100 * x:.1f}"

    head = ("| level | questions | full-depth acc | oracle acc | correct w/ shorter valid | wrong fixed | "
            "test n | baseline (live) | pass@1 | pass@5 (live) | vote@5 | layers top-1 |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = [
        f"| {r['level']} | {r['questions']} | {pct(r['base_accuracy'])} | {pct(r['oracle_accuracy'])} | "
        f"{pct(r['correct_with_shorter_valid'])} | {pct(r['wrong_fixed'])} | {r.get('num_questions', 0)} | "
        f"{pct(r.get('baseline_accuracy'))} | {pct(r.get('pass_at_1'))} | {pct(r.get('pass_at_k_live'))} | "
        f"{pct(r.get('vote_at_k'))} | {r.get('mean_layers_top1', float('nan')):.1f} |"
        for r in rows
    ]
    ood_lines = [
        f"| {name} (OOD) | – | – | – | – | – | {m.get('num_questions', 0)} | {pct(m.get('baseline_accuracy'))} | "
        f"{pct(m.get('pass_at_1'))} | {pct(m.get('pass_at_k_live'))} | {pct(m.get('vote_at_k'))} | "
        f"{m.get('mean_layers_top1', float('nan')):.1f} |"
        for name, m in ood.items()
    ]
    return head + "\n".join(lines + ood_lines) + "\n"


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    data, save = out / "data", out / "outputs"
    timings: dict[str, float] = {}
    from polar.engine import ProgramRunner

    start = time.perf_counter()
    runner = ProgramRunner.from_pretrained(args.model_path, device=args.device)
    timings["load_s"] = round(time.perf_counter() - start, 1)
    questions = args.questions_per_level
    if args.search_budget:
        # every question of a level starts at once (one wave of batch_size rows), so a level
        # costs about (simulations + 1) rounds; size the wave to the budget
        round_s = probe_round_seconds(runner, args, args.batch_size)
        timings["probe_round_s"] = round(round_s, 3)
        per_level = args.search_budget / len(args.levels)
        fits = per_level / ((args.simulations + 1) * round_s)
        questions = max(8, min(args.questions_per_level, int(args.batch_size * min(1.0, fits))))
        print(f"round of {args.batch_size} rows: {round_s:.2f} s -> {questions} questions per level", flush=True)
    start = time.perf_counter()
    for level in args.levels:
        search_level(args, runner, level, questions, data)
        timings[f"search_level{level}_s"] = round(time.perf_counter() - start, 1)
    timings["search_s"] = round(time.perf_counter() - start, 1)
    del runner

    counts = [len(load_samples(supervision_path(data, args.model_path, lv))) for lv in args.levels]
    sizes = split_sizes(counts)
    base = release_args(args, data, save, sizes)
    if args.levels != [1, 2, 3, 4, 5]:  # run_polar knows one level or all five
        raise SystemExit("--levels must be all five (the predictor trains across difficulties)")
    t = time.perf_counter()
    trained = release_main(base) == 0  # fails when no level yielded a parseable valid program
    timings["train_eval_s"] = round(time.perf_counter() - t, 1)
    ood: dict[str, dict] = {}
    t = time.perf_counter()
    for name in args.ood if trained else []:
        if release_main(base + ["--eval", "--eval_dataset", name, "--eval_limit", str(args.ood_limit)]) != 0:
            raise SystemExit(f"evaluation on {name} failed")
        [path] = list((save / "eval").rglob(f"eval_*_{name}.json"))
        ood[name] = json.loads(path.read_text())["metrics"]["overall"]
    timings["ood_eval_s"] = round(time.perf_counter() - t, 1)

    per_diff: dict = {}
    if trained:
        [eval_path] = [p for p in (save / "eval").rglob("eval_*.json")
                       if not any(p.stem.endswith(f"_{n}") for n in args.ood)]
        per_diff = json.loads(eval_path.read_text())["metrics"]["per_difficulty"]
    rows = []
    for level, count in zip(args.levels, counts):
        summary_path = supervision_path(data, args.model_path, level).parent / "summary.json"
        summary = json.loads(summary_path.read_text())["summary"]
        rows.append({"level": level, **summary, **per_diff.get(str(level), {})})
    demo = run_demo_stage(args, out) if args.demo else None
    text = table(rows, ood)
    if not trained:
        text += "\nNo predictor: the search found no parseable valid program to train on.\n"
    if demo is not None:
        text += ("\nDemo set (`polar demo` pipeline, " + demo["set"] + "): " + json.dumps(demo["metrics"]) + "\n")
    settings = {k: v for k, v in vars(args).items()}
    write_json_atomic(out / "reproduction.json", {
        **run_metadata(**settings, split_sizes=sizes), "timings": timings, "levels": rows, "ood": ood,
        "predictor_trained": trained, "demo": demo,
    })
    write_text_atomic(out / "reproduction.md", text)
    print(text)
    print(json.dumps(timings))


if __name__ == "__main__":
    main()
