"""Release-compatible entry point: ``python run_polar.py --target_diff 1 ...`` (see ``--help``)."""
from polar.release_cli import main

raise SystemExit(main())
