"""What the fuzz, chaos and overload suites tried and what happened, for the README's reliability table.

Each suite counts, per fault or input class, how many cases it tried and how each ended
(``Tally.add(suite, case, outcome)``). When ``CARASERVE_RELIABILITY_OUT`` names a file, every
:meth:`Tally.save` merges its counts into that JSON file (one entry per suite and class, replaced
on each run); by default nothing is written. The file's shape::

    {"fuzz-http": {"completions": {"tried": 300, "outcomes": {"200": 41, "400": 259}}}, ...}

Print the table in Markdown with ``python -m tests.reliability_report bench/results/reliability.json``.
"""

from __future__ import annotations

import collections
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

OUT_ENV = "CARASERVE_RELIABILITY_OUT"


@dataclass
class Tally:
    """Outcome counts per (suite, case class)."""

    counts: dict[tuple[str, str], collections.Counter] = field(default_factory=dict)

    def add(self, suite: str, case: str, outcome: str, n: int = 1) -> None:
        self.counts.setdefault((suite, case), collections.Counter())[outcome] += n

    def outcomes(self, suite: str, case: str) -> collections.Counter:
        return self.counts.get((suite, case), collections.Counter())

    def as_dict(self) -> dict[str, dict[str, dict]]:
        out: dict[str, dict[str, dict]] = {}
        for (suite, case), counter in sorted(self.counts.items()):
            out.setdefault(suite, {})[case] = {"tried": sum(counter.values()),
                                               "outcomes": dict(sorted(counter.items()))}
        return out

    def save(self, path: str | None = None) -> Path | None:
        """Merge these counts into ``path`` (default: $CARASERVE_RELIABILITY_OUT); None when unset."""
        target = path or os.environ.get(OUT_ENV, "")
        if not target:
            return None
        file = Path(target)
        merged = json.loads(file.read_text()) if file.is_file() else {}
        for suite, cases in self.as_dict().items():
            merged.setdefault(suite, {}).update(cases)
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(json.dumps(merged, indent=1, sort_keys=True) + "\n")
        return file


def markdown(results: dict[str, dict[str, dict]]) -> str:
    """The reliability table: one row per suite and fault or input class."""
    rows = ["| suite | fault / input class | tried | outcomes |", "| --- | --- | ---: | --- |"]
    for suite, cases in sorted(results.items()):
        for case, entry in sorted(cases.items()):
            outcomes = ", ".join(f"{name}: {n}" for name, n in sorted(entry["outcomes"].items()))
            rows.append(f"| {suite} | {case} | {entry['tried']} | {outcomes} |")
    return "\n".join(rows)


if __name__ == "__main__":
    source = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results/reliability.json")
    print(markdown(json.loads(source.read_text())))
