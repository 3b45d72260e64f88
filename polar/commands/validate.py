"""``polar validate FILE... [--num_layers D]``: check supervision files before training on them.

Prints what each file holds (samples, paths, paths training would drop, mean program length,
base accuracy). A bad file gets one ``error:`` line naming file, sample and field; the other
files are still checked, and the exit status is 2 if any file was bad.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from polar.data import SupervisionError, load_samples_with_metadata, metadata_num_layers, summarize_samples


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "validate",
        help="check supervision files (merged_mcts_samples.json) and summarise them",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("files", nargs="+", metavar="FILE", help="supervision JSON files")
    parser.add_argument(
        "--num_layers", type=int, default=None, metavar="D",
        help="model depth; default: settings.num_layers from the file's metadata, if recorded",
    )
    parser.set_defaults(func=run)


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def format_summary(path: str, summary: dict[str, Any]) -> str:
    """A readable block: the file name, then one ``key: value`` line per summary entry."""
    lines = [f"{path}: ok"]
    lines += [f"  {key}: {_format_value(value)}" for key, value in summary.items()]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.num_layers is not None and args.num_layers <= 0:
        raise ValueError(f"--num_layers must be positive, got {args.num_layers}")
    failed = 0
    for path in args.files:
        try:
            samples, metadata = load_samples_with_metadata(path)
        except SupervisionError as err:
            print(f"error: {err}", file=sys.stderr)
            failed += 1
            continue
        depth = args.num_layers or metadata_num_layers(metadata)
        print(format_summary(path, summarize_samples(samples, num_layers=depth)))
    return 2 if failed else 0
