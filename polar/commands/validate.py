"""``polar validate FILE... [--num_layers D | --model_path M]``: check supervision files before
training on them.

Prints what each file holds (samples, paths, paths training would drop, mean program length,
base accuracy) and the model depth it was checked against, with where that depth came from. A bad
file gets one ``error:`` line naming file, sample and field; so does a program that cannot run (a
layer index the model does not have, or a layer run more than twice). The other files are still
checked, and the exit status is 2 if any file was bad.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from polar.data import (
    Depth,
    SupervisionError,
    infer_depth,
    load_samples_with_metadata,
    program_problems,
    recorded_depth,
    summarize_samples,
)
from polar.flags import int_range
from polar.programs import MAX_NUM_LAYERS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "validate",
        help="check supervision files (merged_mcts_samples.json) and summarise them",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("files", nargs="+", metavar="FILE", help="supervision JSON files")
    given = parser.add_mutually_exclusive_group()
    given.add_argument(
        "--num_layers", type=int_range(1, MAX_NUM_LAYERS), default=None, metavar="D",
        help="model depth; default: the file's metadata (settings.num_layers), else inferred from the file",
    )
    given.add_argument("--model_path", default=None,
                       help="read the depth from this model's config (local directory, cached hub id or .gguf)")
    parser.set_defaults(func=run)


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def format_summary(path: str, summary: dict[str, Any], verdict: str = "ok") -> str:
    """A readable block: the file name, then one ``key: value`` line per summary entry."""
    lines = [f"{path}: {verdict}"]
    lines += [f"  {key}: {_format_value(value)}" for key, value in summary.items()]
    return "\n".join(lines)


def check_file(path: str, given: Depth | None) -> str:
    """The summary block of one file, or :class:`SupervisionError` for its first problem."""
    samples, metadata = load_samples_with_metadata(path)
    recorded = recorded_depth(path, metadata)
    if given and recorded and given.num_layers != recorded.num_layers:
        raise SupervisionError(f"{path}: {recorded.source} says {recorded.num_layers} layers, "
                               f"but {given.source} says {given.num_layers}")
    depth = given or recorded or infer_depth(samples)
    problems = program_problems(path, samples, depth)
    if problems:
        more = f" (and {len(problems) - 1} more programs that cannot run)" if len(problems) > 1 else ""
        raise SupervisionError(problems[0] + more)
    summary = summarize_samples(samples, num_layers=depth.num_layers if depth.checks_indices else None)
    summary["num_layers_from"] = depth.source
    verdict = "ok" if depth.checks_indices else "ok, but layer indices unchecked (model depth unknown)"
    return format_summary(path, summary, verdict)


def run(args: argparse.Namespace) -> int:
    given = None
    if args.num_layers is not None:
        given = Depth(args.num_layers, "--num_layers")
    elif args.model_path is not None:
        from polar.loading import model_depth

        given = Depth(model_depth(args.model_path), f"the config of {args.model_path}")
    failed = 0
    for path in args.files:
        try:
            print(check_file(path, given))
        except SupervisionError as err:
            print(f"error: {err}", file=sys.stderr)
            failed += 1
    return 2 if failed else 0
