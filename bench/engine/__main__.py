"""``python -m bench.engine``: runs the benchmark in benchmark.py, so the command stays short."""

import sys

from bench.engine.benchmark import main

sys.exit(main())
