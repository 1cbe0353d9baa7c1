"""``python -m bench.control_plane``: runs the benchmark in benchmark.py, so the command stays short."""

import sys

from bench.control_plane.benchmark import main

sys.exit(main())
