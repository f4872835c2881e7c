"""The fuzz tests with bigger budgets, counted: what was tried and how each try was answered.

    .venv/bin/python -m bench.fuzz                      # Hypothesis profile `long`, about 3 min
    .venv/bin/python -m bench.fuzz --profile ci         # CI's budget, for comparison

Runs tests/fuzz under pytest in a child process and writes the counts its tests record
(tests/fuzz/tally.py) to bench/results/fuzz.json. Needs the `test` extra. Exits non-zero when a
test failed or a request got a server error.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from bench.harness import RESULTS, ROOT, write_results

TALLY_ENV = "VIT_SERVE_FUZZ_TALLY"  # as tests/fuzz/tally.py reads it


@dataclass
class Property:
    examples: int
    outcomes: dict[str, int]  # a result or an error type -> examples


@dataclass
class Operation:
    calls: int
    by_status: dict[str, int]


@dataclass
class Api:
    calls: int
    by_status: dict[str, int]
    # A 504 to a request whose own deadline passed is tallied as "504 (its own deadline)": the
    # answer the API documents for it, not a server error.
    server_errors: int
    operations: dict[str, Operation]


@dataclass
class FuzzReport:
    profile: str
    seconds: float
    pytest_exit_code: int
    properties: dict[str, Property]
    api: Api


def summarise(tally: dict[str, dict[str, dict[str, int]]]) -> tuple[dict[str, Property], Api]:
    properties = {
        name: Property(sum(outcomes.values()), outcomes)
        for name, outcomes in tally["properties"].items()
    }
    operations = {
        name: Operation(sum(statuses.values()), statuses) for name, statuses in tally["api"].items()
    }
    by_status: Counter[str] = Counter()
    for statuses in tally["api"].values():
        by_status.update(statuses)
    server_errors = sum(n for s, n in by_status.items() if s.isdigit() and int(s) >= 500)
    api = Api(sum(by_status.values()), dict(sorted(by_status.items())), server_errors, operations)
    return properties, api


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--profile", default="long", choices=["ci", "long"])
    p.add_argument("--out", type=Path, default=RESULTS / "fuzz.json")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tally_file = Path(tmp) / "tally.json"
        env = {**os.environ, "HYPOTHESIS_PROFILE": a.profile, TALLY_ENV: str(tally_file)}
        command = [sys.executable, "-m", "pytest", "tests/fuzz", "-q", "-p", "no:cacheprovider"]
        started = time.perf_counter()
        tests = subprocess.run(command, cwd=ROOT, env=env, check=False)
        seconds = time.perf_counter() - started
        if not tally_file.exists():
            print(f"pytest exited {tests.returncode} without writing the counts", file=sys.stderr)
            return tests.returncode or 1
        properties, api = summarise(json.loads(tally_file.read_text()))
    for name, prop in properties.items():
        print(f"{name:>16}: {prop.examples:6d} examples  {prop.outcomes}")
    print(f"{'api':>16}: {api.calls:6d} calls  by status {api.by_status}")
    for name, op in api.operations.items():
        print(f"{'':>18}{name}: {op.calls} calls  {op.by_status}")
    print(f"server errors: {api.server_errors}; {seconds:.0f} s; pytest exit {tests.returncode}")
    report = FuzzReport(a.profile, round(seconds, 1), tests.returncode, properties, api)
    write_results(a.out, report)
    return 1 if tests.returncode or api.server_errors else 0


if __name__ == "__main__":
    sys.exit(main())
