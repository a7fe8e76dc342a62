"""``python -m benchmarks``: the whole suite (see benchmarks/suite.py and benchmarks/README.md)."""

from benchmarks.suite import main

raise SystemExit(main())
