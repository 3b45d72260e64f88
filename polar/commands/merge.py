"""``polar merge``: join finished search shards into ``merged_mcts_samples.json``.

The last search shard to finish merges by itself; this command is for when shards ran on
different machines and their ``shards/`` files were copied together afterwards.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from polar.commands.search import DATASETS, DEFAULT_MODEL
from polar.flags import positive_int


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("merge", help="join search shards into merged_mcts_samples.json", description=__doc__)
    p.add_argument("--out", required=True, help="the --out root the shards were written to")
    p.add_argument("--model_path", default=DEFAULT_MODEL)
    p.add_argument("--dataset", choices=DATASETS, default="math")
    p.add_argument("--target_diff", type=int, choices=range(1, 6), metavar="N")
    p.add_argument("--num_shards", type=positive_int, default=None, help="default: the count in the shard file names")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a merged file made with other settings (default: refuse and name them)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from polar.commands.search import print_summary
    from polar.errors import DataError
    from polar.data import model_dir_name
    from polar.search import merge_shards, shard_files, task_name

    task_dir = Path(args.out) / model_dir_name(args.model_path) / task_name(args.dataset, args.target_diff)
    merged = merge_shards(task_dir, args.num_shards, overwrite=args.overwrite)
    if merged is None:
        groups = shard_files(task_dir)
        present = sum(len(v) for v in groups.values())
        raise DataError(f"{task_dir}: not every shard is present and complete ({present} shard files found); "
                        "rerun the missing shards with the same command")
    print_summary(*merged)
    return 0
