"""``python -m zramd.bench``: see :mod:`zramd.bench.cli`."""

from zramd.bench.cli import main

raise SystemExit(main())
