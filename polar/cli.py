"""The ``polar`` command: a thin layer that parses flags and calls library functions.

Each subcommand lives in ``polar/commands/<name>.py`` and exposes ``register(subparsers)``; the
function it installs as ``func`` receives the parsed ``argparse.Namespace`` and returns an exit
code. Errors meant for users (:class:`polar.errors.PolarError`, ``ValueError``, missing files)
are printed as one line, with no traceback, and exit with status 2.
"""

from __future__ import annotations

import importlib
import sys

from polar.flags import Parser

SUBCOMMANDS = ("run", "validate", "search", "merge", "train", "eval", "demo", "bench")


def build_parser() -> Parser:
    parser = Parser(
        prog="polar",
        description="Run LLMs as programs of layers: search programs, train a predictor, evaluate.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"polar.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"polar.commands.{name}":
                continue  # subcommand not part of this build
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args.func, args)


def run_command(func, args) -> int:
    """Call a command function, turning user-facing errors into a one-line message."""
    from polar.errors import PolarError

    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted: finished work is saved; rerun the same command to resume", file=sys.stderr)
        return 130
    except (PolarError, ValueError, FileNotFoundError, NotADirectoryError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
