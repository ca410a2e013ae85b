"""Issue 7 benchmark: the engine against the store's read limit and the Dask peers.

Same as ``streamattn bench`` (see ``streamattn.bench`` for the configurations):

    .venv/bin/python scripts/bench.py [--repeat 2] [--big] [--quick] [--only KIND ...]

Writes results/bench/results.json and results.md.
"""

from __future__ import annotations

import sys

from streamattn.bench import main

if __name__ == "__main__":
    sys.exit(main())
