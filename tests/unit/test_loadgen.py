"""bench/loadgen.py: the shares of a level, the merge of what each client process measured, and
the real server under several client processes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from bench.harness import DEMO_MODEL, DEMO_REPO, load_images, service
from bench.loadgen import Clients, Share, merge, shares_of


def share(pid: int, latencies_ms: list[float], **counts: float) -> Share:
    ok = int(counts.get("ok", len(latencies_ms)))
    errors = int(counts.get("errors", 0))
    return Share(
        pid=pid,
        concurrency=int(counts.get("concurrency", 2)),
        requests=int(counts.get("requests", ok + errors)),
        ok=ok,
        errors=errors,
        lost=int(counts.get("lost", 0)),
        seconds=counts.get("seconds", 1.0),
        cpu_seconds=counts.get("cpu_seconds", 0.1),
        statuses={"200": ok, **({"503": errors} if errors else {})},
        latencies_ms=latencies_ms,
    )


def test_a_level_is_shared_out_whole() -> None:
    assert shares_of(256, 4) == [64, 64, 64, 64]
    assert shares_of(10, 4) == [3, 3, 2, 2]
    assert shares_of(1, 3) == [1, 0, 0]
    assert sum(shares_of(10**9, 7)) == 10**9
    with pytest.raises(ValueError):
        shares_of(5, 0)


def test_percentiles_come_from_every_latency_not_from_each_process() -> None:
    # One process saw 90 quick answers, the other 10 slow ones: of the 100, the median is quick
    # and the 99th percentile slow. Averaging each process's own percentiles would say 505 ms
    # for the p99 and 505 for the p50.
    quick = share(11, [10.0] * 90, seconds=2.0, cpu_seconds=0.3)
    slow = share(12, [1000.0] * 8, ok=8, errors=2, lost=1, requests=11, cpu_seconds=0.1)
    slow = Share(**{**vars(slow), "latencies_ms": [1000.0] * 10})  # errors answered too
    merged = merge("service", [quick, slow])
    every = [10.0] * 90 + [1000.0] * 10
    assert merged.latency_ms_p50 == pytest.approx(np.percentile(every, 50)) == 10.0
    assert merged.latency_ms_p99 == pytest.approx(np.percentile(every, 99))
    assert merged.latency_ms_p99 > 990.0
    averaged = (np.percentile([10.0] * 90, 99) + np.percentile([1000.0] * 10, 99)) / 2
    assert merged.latency_ms_p99 != pytest.approx(averaged)
    # Counts add up, statuses too; img/s is accepted answers over the longest share.
    assert (merged.requests, merged.ok, merged.errors, merged.lost) == (101, 98, 2, 1)
    assert merged.statuses == {"200": 98, "503": 2}
    assert merged.concurrency == 4
    assert merged.img_per_s == pytest.approx(98 / 2.0)
    assert len(merged.latencies_ms) == 100
    # The client's CPU is every process's, per accepted image; its busiest process's share of a
    # core says whether the client was the limit.
    assert merged.client_cpu_ms_per_image == pytest.approx(0.4 * 1e3 / 98, abs=1e-3)
    assert merged.client_busiest_core == pytest.approx(0.15)
    assert (merged.client_processes, merged.client_pids) == (2, [11, 12])
    assert merged.server_cpu_ms_per_image is None  # not measured


def test_the_servers_cpu_is_per_accepted_image_and_by_process() -> None:
    shares = [share(1, [5.0] * 30), share(2, [5.0] * 20)]
    before = {"main": 1.0, "engine": 2.0, "front-end": 10.0}
    after = {"main": 1.0, "engine": 2.05, "front-end": 10.2, "new": 0.01}
    merged = merge("service", shares, (before, after))
    assert merged.server_cpu_ms_per_image_by_process == {
        "engine": 1.0,
        "front-end": 4.0,
        "main": 0.0,
        "new": 0.2,  # a process that started meanwhile: all of it
    }
    assert merged.server_cpu_ms_per_image == pytest.approx(5.2)


def test_nothing_to_merge_is_an_error() -> None:
    with pytest.raises(ValueError, match="no shares"):
        merge("service", [])


def command_line(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


@pytest.mark.integration
@pytest.mark.slow
def test_the_service_under_several_client_processes() -> None:
    images = load_images(limit=4)
    with service(DEMO_REPO, DEMO_MODEL) as server, Clients(2, images.bodies) as clients:
        # Two processes of their own, neither this one nor the server's.
        assert len(set(clients.pids)) == 2
        assert os.getpid() not in clients.pids and server.pid not in clients.pids
        for pid in clients.pids:
            assert "bench.loadgen" in command_line(pid)
        result = clients.run(server.target(), concurrency=4, requests=9, max_seconds=60)
        assert (result.requests, result.ok, result.errors, result.lost) == (9, 9, 0, 0)
        assert result.statuses == {"200": 9} and len(result.latencies_ms) == 9
        assert sorted(result.client_pids) == sorted(clients.pids)  # both sent their share
        assert result.concurrency == 4 and result.client_processes == 2
        assert result.client_cpu_ms_per_image is not None and result.client_cpu_ms_per_image > 0
        assert result.server_cpu_ms_per_image is not None
        assert result.server_cpu_ms_per_image_by_process is not None
        assert set(result.server_cpu_ms_per_image_by_process) == {"main"}  # one process
        # A level of concurrency 1 runs in one process alone; the processes serve each run.
        single = clients.run(server.target(), concurrency=1, requests=3, max_seconds=60)
        assert (single.client_processes, single.ok, single.concurrency) == (1, 3, 1)
        pids = list(clients.pids)
    for pid in pids:  # stopped with the block
        assert not Path(f"/proc/{pid}").exists()
