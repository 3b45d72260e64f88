"""``python -m polar`` (and ``torchrun -m polar``) runs the command-line interface."""

from polar.cli import main

raise SystemExit(main())
