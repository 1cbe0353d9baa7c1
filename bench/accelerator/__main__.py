"""``python -m bench.accelerator``: runs the check in benchmark.py, so the command stays short."""

import sys

from bench.accelerator.benchmark import main

sys.exit(main())
