"""``python -m jema ...``: the ``jema`` command line (``demo``, ``bench``, ``inspect``, ...)."""

from jema._app.cli import main

raise SystemExit(main())
