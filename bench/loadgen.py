"""A closed-loop load client of several processes, so that the client is not what limits the
figures.

One Python client process costs about 0.18 ms of CPU a request (measured on the H200 machine):
near 5,000 requests a second it is one busy core, its event loop late to read answers, and the
latencies it reports are partly its own. Here `processes` client processes each run
`bench.harness.closed_loop` over the same bodies, with the concurrency and the request count
shared out, started together; their answers are merged into one `harness.LoadResult`: counts
added, percentiles from every latency at once (a percentile of percentiles is not a percentile),
the clients' CPU beside the server's (every process of it, by role).

    with Clients(4, images.bodies) as clients:
        result = clients.run(server.target(), concurrency=256, requests=10**9, max_seconds=10)

The processes are fresh interpreters (`python -m bench.loadgen --serve`), not forks or
multiprocessing's spawn: the caller may hold ONNX Runtime's or CUDA's threads, which a fork
copies half-made, and spawn runs the caller's main module again in each. They are started once
and kept for every run, told what to do and answering over their stdin and stdout (pickles; the
bodies sent once). Each run is bounded by `requests` and `max_seconds`, each request by the
harness's client timeout, and a run whose answers do not come back within
`max_seconds + RESULT_GRACE_S` stops the processes and fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import pickle
import select
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import IO, Self

import numpy as np

from bench import harness

# A run's answers are awaited this long past its `max_seconds`: requests sent just before the end
# may take up to the harness's per-request timeout (120 s) to come back or be counted lost.
RESULT_GRACE_S = 150.0
START_TIMEOUT_S = 60.0  # a process imports numpy and the harness before it says it is ready


@dataclass(frozen=True)
class Run:
    """What one client process is asked to do: its share of one level."""

    target: harness.Target
    concurrency: int
    requests: int
    max_seconds: float


@dataclass(frozen=True)
class Share:
    """One client process's part of a run, as it measured it."""

    pid: int
    concurrency: int
    requests: int  # sent
    ok: int  # answered, and the answer accepted by the target (`Target.accept`)
    errors: int  # answered, the answer not accepted
    lost: int  # sent, never answered (a broken connection or the client's timeout)
    seconds: float  # from its first send to its last answer
    cpu_seconds: float  # the process's CPU time (all its threads) over the run
    statuses: dict[str, int]
    latencies_ms: list[float]


@dataclass
class SpreadResult(harness.LoadResult):
    """A `harness.LoadResult` of several client processes."""

    client_processes: int = 1
    client_pids: list[int] = field(default_factory=list)
    # The busiest client process's CPU seconds per second of its run: near 1.0, that process was
    # the limit (its event loop saturated) and the figures are partly the client's.
    client_busiest_core: float | None = None


def shares_of(total: int, parts: int) -> list[int]:
    """`total` shared out over `parts` as evenly as whole numbers allow, larger shares first."""
    if parts < 1:
        raise ValueError("at least one part")
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def per_image(seconds: float, images: int) -> float | None:
    return round(seconds * 1e3 / images, 3) if images else None


def merge(
    name: str,
    shares: Sequence[Share],
    server_cpu: tuple[dict[str, float], dict[str, float]] | None = None,
) -> SpreadResult:
    """One level's result from its shares: counts and statuses added, img/s over the longest
    share (they start together), p50/p95/p99 of every latency, the client's CPU per image summed
    over the processes; with `server_cpu` (the server's CPU seconds by role, `cpu_by_role`,
    before and after), the server's per image, in all and by role."""
    if not shares:
        raise ValueError("no shares to merge")
    statuses: Counter[str] = Counter()
    for share in shares:
        statuses.update(share.statuses)
    latencies = [ms for share in shares for ms in share.latencies_ms]  # every answer's
    accepted = sum(s.ok for s in shares)
    seconds = max(s.seconds for s in shares)
    lat = np.array(latencies or [float("nan")])
    by_role: dict[str, float] | None = None
    server: float | None = None
    if server_cpu is not None and accepted:
        before, after = server_cpu
        by_role = {
            role: round((after[role] - before.get(role, 0.0)) * 1e3 / accepted, 3)
            for role in sorted(after)
        }
        server = per_image(sum(after.values()) - sum(before.values()), accepted)
    return SpreadResult(
        server=name,
        concurrency=sum(s.concurrency for s in shares),
        requests=sum(s.requests for s in shares),
        ok=accepted,
        errors=sum(s.errors for s in shares),
        lost=sum(s.lost for s in shares),
        seconds=round(seconds, 2),
        img_per_s=accepted / seconds if seconds > 0 else 0.0,
        latency_ms_p50=float(np.percentile(lat, 50)),
        latency_ms_p95=float(np.percentile(lat, 95)),
        latency_ms_p99=float(np.percentile(lat, 99)),
        statuses=dict(sorted(statuses.items())),
        server_cpu_ms_per_image=server,
        client_cpu_ms_per_image=per_image(sum(s.cpu_seconds for s in shares), accepted),
        server_cpu_ms_per_image_by_process=by_role,
        latencies_ms=latencies,
        client_processes=len(shares),
        client_pids=[s.pid for s in shares],
        client_busiest_core=round(max(s.cpu_seconds / max(s.seconds, 1e-9) for s in shares), 3),
    )


def serve(inbox: IO[bytes], outbox: IO[bytes]) -> None:
    """A client process: reads its bodies, says its pid, then runs each `Run` it is sent and
    sends back its `Share`, until it is sent None (or its stdin closes)."""
    bodies: list[bytes] = pickle.load(inbox)
    _send(outbox, os.getpid())
    while True:
        try:
            run: Run | None = pickle.load(inbox)
        except EOFError:  # the parent went away
            return
        if run is None:
            return
        cpu0 = time.process_time()
        result = asyncio.run(
            harness.closed_loop(run.target, bodies, run.concurrency, run.requests, run.max_seconds)
        )
        _send(
            outbox,
            Share(
                pid=os.getpid(),
                concurrency=run.concurrency,
                requests=result.requests,
                ok=result.ok,
                errors=result.errors,
                lost=result.lost,
                seconds=result.seconds,
                cpu_seconds=time.process_time() - cpu0,
                statuses=result.statuses,
                latencies_ms=result.latencies_ms,
            ),
        )


def _send(stream: IO[bytes], message: object) -> None:
    pickle.dump(message, stream, protocol=pickle.HIGHEST_PROTOCOL)
    stream.flush()


class Clients:
    """`processes` client processes over `bodies`, kept for every `run` until the block ends."""

    def __init__(self, processes: int, bodies: Sequence[bytes]) -> None:
        if processes < 1:
            raise ValueError("at least one client process")
        self.count = processes
        self.bodies = list(bodies)
        self._processes: list[subprocess.Popen[bytes]] = []
        self.pids: list[int] = []

    def __enter__(self) -> Self:
        cmd = [sys.executable, "-m", "bench.loadgen", "--serve"]
        try:
            for _ in range(self.count):
                process = subprocess.Popen(
                    cmd, cwd=harness.ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE
                )
                self._processes.append(process)
                assert process.stdin is not None
                _send(process.stdin, self.bodies)
            for process in self._processes:
                pid = self._receive(process, START_TIMEOUT_S)
                if pid != process.pid:
                    raise RuntimeError(f"a client process started with {pid!r}")
                self.pids.append(process.pid)
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._stop()

    def run(
        self,
        target: harness.Target,
        concurrency: int,
        requests: int,
        max_seconds: float,
        cpu: bool = True,
    ) -> SpreadResult:
        """One level: `concurrency` connections and at most `requests` requests shared out over
        the processes (fewer processes where the concurrency is lower), for `max_seconds` at
        most; with `cpu`, the target server's CPU by role around it. `target.accept` must be a
        module-level function (it travels pickled)."""
        used = self._processes[: min(self.count, concurrency)]
        runs = [
            Run(target, c, r, max_seconds)
            for c, r in zip(
                shares_of(concurrency, len(used)), shares_of(requests, len(used)), strict=True
            )
        ]
        pid = target.pid if cpu else None
        before = harness.cpu_by_role(pid) if pid is not None else None
        for process, each in zip(used, runs, strict=True):
            assert process.stdin is not None
            _send(process.stdin, each)
        shares = []
        for process in used:
            share = self._receive(process, max_seconds + RESULT_GRACE_S)
            if not isinstance(share, Share):
                raise RuntimeError(f"a client process answered {share!r}")
            shares.append(share)
        after = harness.cpu_by_role(pid) if pid is not None else None
        server_cpu = (before, after) if before is not None and after is not None else None
        return merge(target.name, shares, server_cpu)

    def _receive(self, process: subprocess.Popen[bytes], timeout_s: float) -> object:
        """What a process sends back; stops them all when it does not come in time or the
        process has ended."""
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], timeout_s)
        if not ready:
            self._stop()
            raise TimeoutError(f"a client process sent nothing back within {timeout_s:.0f} s")
        try:
            answer: object = pickle.load(process.stdout)
        except EOFError:
            self._stop()
            raise RuntimeError(f"client process {process.pid} ended without answering") from None
        return answer

    def _stop(self) -> None:
        for process in self._processes:
            with contextlib.suppress(OSError):  # that process is gone already
                assert process.stdin is not None
                _send(process.stdin, None)
                process.stdin.close()
        for process in self._processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
            if process.stdout is not None:
                process.stdout.close()
        self._processes.clear()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--serve", action="store_true", help="be one client process (Clients runs it)")
    args = p.parse_args(argv)
    if not args.serve:
        p.error("this module is a library; --serve is how Clients starts its processes")
    # The answers go out on the real stdout; anything printed goes to stderr instead.
    outbox = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    serve(sys.stdin.buffer, outbox)


if __name__ == "__main__":
    # By its name, not as __main__: the Shares it sends must unpickle as bench.loadgen's.
    from bench import loadgen

    loadgen.main()
