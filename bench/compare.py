"""The service of two commits side by side: did a change move img/s, latency or CPU per image?

    .venv/bin/python -m bench.compare --baseline 19a2506
    .venv/bin/python -m bench.compare --baseline main~3 --concurrency 1 16 64 --rounds 6
    .venv/bin/python -m bench.compare --baseline main~3 --repo build/int8/both --model vit-ti16

The baseline commit is checked out into build/compare/<sha> (a git worktree) and served from
there beside this checkout's service, both over the baseline's model repository (a newer
model.json may not load in older code) or `--repo`, fed the same photos; each level alternates
between them in rounds and reports medians. Writes bench/results/compare_<baseline>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
from dataclasses import dataclass
from pathlib import Path

from bench.harness import (
    DEMO_MODEL,
    RESULTS,
    ROOT,
    LoadResult,
    load_images,
    run_levels,
    service,
    write_results,
)


@dataclass
class CompareReport:
    baseline: str  # the commit
    current: str  # this checkout's HEAD, "+changes" when its tree differs from it
    model: str
    images: str
    levels: dict[str, list[LoadResult]]  # "baseline" and "current", level by level


def git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout.strip()


def checkout(commit: str) -> tuple[str, Path]:
    """The commit's full sha and a worktree of it under build/compare (made once)."""
    sha = git("rev-parse", "--verify", f"{commit}^{{commit}}")
    tree = ROOT / "build" / "compare" / sha[:12]
    if not tree.exists():
        git("worktree", "add", "--detach", str(tree), sha)
    return sha, tree


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--baseline", required=True, help="a commit: sha, tag, branch, main~3")
    p.add_argument("--model", default=DEMO_MODEL)
    p.add_argument(
        "--repo",
        type=Path,
        help="the model repository both serve (default: the baseline's model_repo), e.g. "
        "build/int8/both with --model vit-ti16",
    )
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    # Rounds end on time, not on count: a fixed count made the demo model's rounds half a second.
    p.add_argument("--requests", type=int, default=100_000, help="per level and server, at most")
    p.add_argument("--max-seconds", type=float, default=24.0, help="per level and server")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)

    sha, tree = checkout(a.baseline)
    head = git("rev-parse", "HEAD")
    current = head[:12] + (
        "+changes" if git("status", "--porcelain", "--untracked-files=no") else ""
    )
    repo = a.repo.resolve() if a.repo is not None else tree / "model_repo"
    images = load_images()
    print(f"baseline {sha[:12]} from {tree}, current {current}; {images.source}")
    with (
        service(repo, a.model, name="baseline", tree=tree) as before,
        service(repo, a.model, name="current") as after,
    ):
        levels = asyncio.run(
            run_levels(
                [before.target(), after.target()],
                images.bodies,
                a.concurrency,
                a.requests,
                a.max_seconds,
                a.rounds,
            )
        )
    report = CompareReport(sha, current, a.model, images.source, levels)
    suffix = "" if a.model == DEMO_MODEL else f"_{a.model}"
    write_results(a.out or RESULTS / f"compare_{sha[:12]}{suffix}.json", report)


if __name__ == "__main__":
    main()
