"""``polar eval``: evaluate a trained predictor (same flags as ``run_polar.py``)."""

from __future__ import annotations

from typing import Any


def register(subparsers: Any) -> None:
    from polar.release_cli import add_release_arguments, eval_command

    p = subparsers.add_parser("eval", help="evaluate a trained predictor: pass@k, pass@1, vote@k, baseline",
                              description=__doc__)
    add_release_arguments(p)
    p.set_defaults(func=eval_command)
