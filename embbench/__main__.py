"""``python -m embbench``: the command-line interface."""

from embbench.cli import main

raise SystemExit(main())
