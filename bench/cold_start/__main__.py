"""``python -m bench.cold_start``: runs the benchmark in benchmark.py, so the command stays short."""

import sys

from bench.cold_start.benchmark import main

sys.exit(main())
