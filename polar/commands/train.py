"""``polar train``: train a predictor from search output (same flags as ``run_polar.py``)."""

from __future__ import annotations

from typing import Any


def register(subparsers: Any) -> None:
    from polar.release_cli import add_release_arguments, train_command

    p = subparsers.add_parser("train", help="train the PoLar predictor on search output", description=__doc__)
    add_release_arguments(p)
    p.set_defaults(func=train_command)
