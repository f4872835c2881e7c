"""The fuzz tests with bigger budgets, counted: what was tried and how each try was answered.

    .venv/bin/python -m bench.fuzz                      # Hypothesis profile `long`
    .venv/bin/python -m bench.fuzz --profile ci         # CI's budget, for comparison

Runs tests/fuzz (the imaging properties and the schemathesis run against the API) under pytest
in a child process with `HYPOTHESIS_PROFILE`, collects the counts the tests record
(tests/fuzz/tally.py: examples per property and how each ended, requests per operation by
status), and writes them to bench/results/fuzz.json. Needs the `test` extra. Exits non-zero if
a test failed or any request got a server error.
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
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TALLY_ENV = "VIT_SERVE_FUZZ_TALLY"  # as tests/fuzz/tally.py reads it


def summarise(tally: dict[str, dict[str, dict[str, int]]]) -> dict[str, Any]:
    properties = {
        name: {"examples": sum(outcomes.values()), "outcomes": outcomes}
        for name, outcomes in tally["properties"].items()
    }
    operations = {
        name: {"calls": sum(statuses.values()), "by_status": statuses}
        for name, statuses in tally["api"].items()
    }
    by_status: Counter[str] = Counter()
    for statuses in tally["api"].values():
        by_status.update(statuses)
    return {
        "properties": properties,
        "api": {
            "calls": sum(by_status.values()),
            "by_status": dict(sorted(by_status.items())),
            # A 504 to a request whose own deadline passed is tallied as "504 (its own
            # deadline)": the answer the API documents for it, not a server error.
            "server_errors": sum(
                n for status, n in by_status.items() if status.isdigit() and int(status) >= 500
            ),
            "operations": operations,
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--profile", default="long", choices=["ci", "long"])
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fuzz.json")
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
        tally = json.loads(tally_file.read_text())
    report = {
        "profile": a.profile,
        "seconds": round(seconds, 1),
        "pytest_exit_code": tests.returncode,
        **summarise(tally),
    }
    for name, prop in report["properties"].items():
        print(f"{name:>16}: {prop['examples']:6d} examples  {prop['outcomes']}")
    api = report["api"]
    print(f"{'api':>16}: {api['calls']:6d} calls  by status {api['by_status']}")
    for name, op in api["operations"].items():
        print(f"{'':>18}{name}: {op['calls']} calls  {op['by_status']}")
    print(f"server errors: {api['server_errors']}; {seconds:.0f} s; pytest exit {tests.returncode}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {a.out}")
    return 1 if tests.returncode or api["server_errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
