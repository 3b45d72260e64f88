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
    """Call a command function, turning user-facing errors into a one-line message.

    Besides polar's own errors, two kinds of failure come from the user's environment or numbers
    rather than from a bug, and get one line too: a file the system will not give us (no
    permission, a read-only or full disk, a symlink loop; ``OSError`` names the path), and an
    allocation a size flag made impossible (``--polar_d_model 1000000000``).
    """
    from polar.errors import PolarError

    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted: finished work is saved; rerun the same command to resume", file=sys.stderr)
        return 130
    except (PolarError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as err:
        if not _is_out_of_memory(err):
            raise
        from polar.model_files import first_line

        print(f"error: out of memory ({first_line(err)}); a size or count flag "
              "(batch size, model width, token budget) asks for more than this machine has", file=sys.stderr)
        return 2


def _is_out_of_memory(err: BaseException) -> bool:
    """A failed allocation: ``MemoryError``, or torch's CPU/GPU allocator giving up."""
    if isinstance(err, MemoryError):
        return True
    text = str(err)
    return type(err).__name__ == "OutOfMemoryError" or "can't allocate memory" in text or "out of memory" in text


if __name__ == "__main__":
    raise SystemExit(main())
