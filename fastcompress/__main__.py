"""``python -m fastcompress``: the same command line as the ``fastcompress`` script."""

from fastcompress.cli import main

raise SystemExit(main())
