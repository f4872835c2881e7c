"""What the fuzz tests tried and how each try ended, counted for `python -m bench.fuzz`.

Every example a property runs records one outcome (also those Hypothesis runs while shrinking:
each one ran the code under test). The counts stay in memory unless `VIT_SERVE_FUZZ_TALLY`
names a file, which tests/fuzz/conftest.py writes at the end of the session.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

TALLY_ENV = "VIT_SERVE_FUZZ_TALLY"

_properties: defaultdict[str, Counter[str]] = defaultdict(Counter)
_calls: defaultdict[str, Counter[str]] = defaultdict(Counter)


def record(prop: str, outcome: str) -> None:
    """One example of an imaging property and how it ended (a result or an error type)."""
    _properties[prop][outcome] += 1


def record_call(operation: str, status: str) -> None:
    """One request schemathesis sent to an operation and its status (with a note if excused)."""
    _calls[operation][status] += 1


def snapshot() -> dict[str, dict[str, dict[str, int]]]:
    def plain(counts: dict[str, Counter[str]]) -> dict[str, dict[str, int]]:
        return {name: dict(sorted(c.items())) for name, c in sorted(counts.items())}

    return {"properties": plain(_properties), "api": plain(_calls)}


def write(path: Path) -> None:
    path.write_text(json.dumps(snapshot(), indent=2) + "\n")
