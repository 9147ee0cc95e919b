"""`python -m prefix_grouper_trl ...` is the `prefix-grouper-trl` command."""

from .cli import main

raise SystemExit(main())
