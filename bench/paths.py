"""Where the benchmarks write their results and find the repository and the MAF trace.

Fixed by this file's place, not by the working directory, so every benchmark package writes
to the one ``bench/results`` folder whichever folder it lives in and wherever it is run from.
"""

from __future__ import annotations

from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
MAF_DIR = REPO.parent / "shared" / "data" / "maf"
