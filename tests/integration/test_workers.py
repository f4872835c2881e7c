"""Every guarantee of one process, at VIT_SERVE_WORKERS=2: a supervisor, an engine process and
two front ends (`python -m app.server`, real sockets on loopback).

A slow engine, where a test needs requests to wait, is the simulated accelerator
(app/runtime/simulated.py) with a flat curve: every batch takes SLOW_BATCH_MS, whatever its size.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from tritonclient.utils import InferenceServerException

from tests.integration.stack import Replica, png_bytes, spawn_replica, wait_until
from tests.support import TINY, TINY_REPO, free_port

pytestmark = pytest.mark.integration

SLOW_BATCH_MS = 2000
READY_S = 90.0
BUSY = "the server is overloaded (every request place is taken); retry shortly"


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def role_of(pid: int) -> str:
    try:
        args = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return ""
    return args[args.index(b"--role") + 1].decode() if b"--role" in args else ""


def front_ends(replica: Replica) -> list[int]:
    return sorted(p for p in children(replica.process.pid) if role_of(p) == "front-end")


def listening(pid: int, port: int) -> bool:
    """Whether process `pid` holds a socket listening on `port` (SO_REUSEPORT: each front end
    has its own, and listens only once it has started)."""
    inodes = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            target = os.readlink(fd) if fd.is_symlink() else ""
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        return False
    tables = [Path("/proc/net/tcp"), Path("/proc/net/tcp6")]  # gRPC's: v4-mapped IPv6
    lines = [line for t in tables if t.exists() for line in t.read_text().splitlines()[1:]]
    for line in lines:
        fields = line.split()
        port_of = int(fields[1].rsplit(":", 1)[1], 16)
        if fields[3] == "0A" and port_of == port and fields[9] in inodes:
            return True
    return False


def every_front_end_listens(replica: Replica) -> bool:
    pids = front_ends(replica)
    return len(pids) == 2 and all(listening(p, replica.port) for p in pids)


def engine_pid(replica: Replica) -> int | None:
    return next((p for p in children(replica.process.pid) if role_of(p) == "engine"), None)


def shm_names() -> set[str]:
    return {p.name for p in Path("/dev/shm").iterdir()} if Path("/dev/shm").is_dir() else set()


def fresh_get(url: str) -> httpx.Response:
    """One request on a connection of its own: new connections spread over the front ends."""
    with httpx.Client(timeout=10) as client:
        return client.get(url)


def classify(url: str, timeout_s: float = 30, **params: str) -> httpx.Response:
    with httpx.Client(timeout=timeout_s) as client:
        return client.post(
            f"{url}/classify",
            params=params,
            content=png_bytes(64),
            headers={"content-type": "image/png"},
        )


@contextmanager
def served(root: Path, work: Path, **settings: str) -> Iterator[Replica]:
    replica = spawn_replica(root, work, workers="2", **settings)
    try:
        wait_until(
            lambda: replica.process.poll() is None and _ok(f"{replica.url}/readyz"),
            READY_S,
            f"not ready (log: {replica.log_path})",
        )
        # Ready is the answer of whichever front end listens first: the test's kills and
        # counts need both.
        wait_until(lambda: every_front_end_listens(replica), 30, "two front ends listening")
        yield replica
    finally:
        if replica.process.poll() is None:
            replica.process.terminate()
            try:
                replica.process.wait(timeout=60)
            except Exception:
                replica.process.kill()


def _ok(url: str) -> bool:
    try:
        return fresh_get(url).status_code == 200
    except httpx.HTTPError:
        return False


def tiny(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    shutil.copytree(TINY_REPO / TINY, root / TINY)
    return root


def slow_curve(tmp_path: Path) -> str:
    path = tmp_path / "curve.json"
    path.write_text(json.dumps({"tokens_per_image": 64, "points": [[1, SLOW_BATCH_MS]]}))
    return str(path)


def metric(text: str, line_start: str) -> float:
    values = [
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start)
    ]
    return sum(values)


def test_every_request_is_answered_once_and_counted_across_the_front_ends(tmp_path: Path) -> None:
    before = shm_names()
    with served(tiny(tmp_path), tmp_path) as replica:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: classify(replica.url).status_code, range(48)))
        metrics = fresh_get(f"{replica.url}/metrics").text
        views = {fresh_get(f"{replica.url}/models").text for _ in range(12)}
        ready = {(fresh_get(f"{replica.url}/v2/health/ready").status_code) for _ in range(12)}
        # Introspection runs in the engine process too (its CPU session there).
        learned = fresh_get(f"{replica.url}/models/tiny/introspection")
        with httpx.Client(timeout=30) as client:
            one = client.post(
                f"{replica.url}/models/tiny/introspection/attention-distance",
                content=png_bytes(64),
                headers={"content-type": "image/png"},
            )
        assert shm_names() == before  # the shared memory has no name
    assert answers == [200] * 48
    # One /metrics for the replica, whichever front end answers it: every process added up.
    assert (
        metric(
            metrics,
            'vit_serve_requests_total{model="tiny",protocol="http",route="/classify",status="200"}',
        )
        == 48
    )
    assert metric(metrics, "vit_serve_batch_size_count") >= 1  # the engine process's own
    assert "\nvit_serve_ready 1.0\n" in metrics
    assert len(views) == 1 and ready == {200}  # the same answer from every front end
    assert learned.status_code == 200, learned.text
    assert one.status_code == 200 and one.json()["grid"] == [8, 8], one.text


def test_admission_is_global_and_refused_before_the_body(tmp_path: Path) -> None:
    settings = {
        "simulated_curve": slow_curve(tmp_path),
        "max_queue_images": "1",
        "max_batch_size": "1",
        "warmup": "false",
    }
    # Two places in the whole replica: one batch running, one image queued. Two requests take
    # them (one after the other, so that neither front end's decoding is full)...
    with (
        served(tiny(tmp_path), tmp_path, **settings) as replica,
        concurrent.futures.ThreadPoolExecutor(8) as pool,
    ):
        held = [pool.submit(classify, replica.url)]
        time.sleep(0.5)
        held.append(pool.submit(classify, replica.url))
        time.sleep(0.5)
        # ... and whichever front end the next six reach, they find no place.
        refused = list(pool.map(lambda _: classify(replica.url), range(6)))
        assert [h.result().status_code for h in held] == [200, 200]
    assert [r.status_code for r in refused] == [503] * 6
    assert all(r.json() == {"detail": BUSY} and r.headers["retry-after"] == "1" for r in refused)


def test_a_deadline_or_a_client_gone_cancels_the_job_in_the_engine(tmp_path: Path) -> None:
    grpc_port = free_port()
    settings = {
        "grpc_port": str(grpc_port),
        "simulated_curve": slow_curve(tmp_path),
        "max_queue_images": "1",
        "max_batch_size": "1",
        "warmup": "false",
    }
    with served(tiny(tmp_path), tmp_path, **settings) as replica:
        # Every front end serves the gRPC door too, on the same port.
        assert all(listening(p, grpc_port) for p in front_ends(replica))
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            running = pool.submit(classify, replica.url)
            time.sleep(0.8)  # the first batch is running: the next waits in the queue
            late = classify(replica.url, timeout_ms="200")
            assert late.status_code == 504, late.text
            # A gRPC client whose own deadline passes: the front end's call is cancelled, and
            # with it the job in the engine's queue; its place comes back.
            grpc_client = triton_grpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
            grids = triton_grpc.InferInput("patches", [1, 8, 8, 192], "UINT8")
            grids.set_data_from_numpy(np.zeros((1, 8, 8, 192), np.uint8))
            with pytest.raises(InferenceServerException) as gone:
                grpc_client.infer("tiny", [grids], client_timeout=0.3)
            assert "DEADLINE_EXCEEDED" in str(gone.value.status())
            assert running.result().status_code == 200
        wait_until(
            lambda: metric(fresh_get(f"{replica.url}/metrics").text, "vit_serve_queue_depth") == 0,
            10,
            "the queue empties",
        )
        # Both places are free again: two requests at once are both served (the second a
        # moment later, so that a front end's one-image decode queue is not what refuses it).
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            first = pool.submit(classify, replica.url)
            time.sleep(0.5)
            second = pool.submit(classify, replica.url)
            again = [first.result().status_code, second.result().status_code]
        assert again == [200, 200]


def test_a_reload_fails_no_request_and_every_front_end_sees_it(tmp_path: Path) -> None:
    root = tiny(tmp_path)
    with served(root, tmp_path, admin_api_key="admin-key-for-tests") as replica:
        stop = threading.Event()
        statuses: list[int] = []

        def load() -> None:
            with httpx.Client(timeout=30) as client:
                while not stop.is_set():
                    r = client.post(
                        f"{replica.url}/classify",
                        content=png_bytes(64),
                        headers={"content-type": "image/png"},
                    )
                    statuses.append(r.status_code)

        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        shutil.copytree(root / TINY / "2", root / TINY / "3")
        spec = json.loads((root / TINY / "model.json").read_text())
        spec["versions"]["3"] = spec["versions"]["2"]
        (root / TINY / "model.json").write_text(json.dumps(spec))
        report = httpx.post(
            f"{replica.url}/admin/reload",
            headers={"authorization": "Bearer admin-key-for-tests"},
            timeout=60,
        )
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join()
        versions = {
            tuple(m["versions"])
            for _ in range(12)
            for m in fresh_get(f"{replica.url}/models").json()["models"]
        }
    assert report.status_code == 200 and report.json()["loaded"] == ["tiny/3"], report.text
    assert statuses and set(statuses) == {200}, sorted(set(statuses))
    assert versions == {(1, 2, 3)}


def test_a_front_end_that_dies_is_replaced_and_the_rest_go_on(tmp_path: Path) -> None:
    with served(tiny(tmp_path), tmp_path) as replica:
        first, second = front_ends(replica)
        os.kill(first, signal.SIGKILL)
        # The other front end serves meanwhile (a connection the dead one had accepted may
        # have been reset: only new ones are asked for here).
        assert classify(replica.url).status_code == 200
        wait_until(
            lambda: first not in front_ends(replica) and every_front_end_listens(replica),
            30,
            "a new front end",
        )
        wait_until(lambda: _ok(f"{replica.url}/readyz"), 30, "ready")
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: classify(replica.url).status_code, range(16)))
        assert second in front_ends(replica)
    assert answers == [200] * 16


def test_an_engine_that_dies_turns_the_replica_unready_until_it_is_back(tmp_path: Path) -> None:
    with served(tiny(tmp_path), tmp_path) as replica:
        dead = engine_pid(replica)
        assert dead is not None
        os.kill(dead, signal.SIGKILL)
        wait_until(lambda: fresh_get(f"{replica.url}/readyz").status_code == 503, 10, "not ready")
        refused = classify(replica.url)
        if refused.status_code == 503:  # unless the engine was back already
            assert refused.headers["retry-after"] == "1"
            assert "engine" in refused.json()["detail"]
        wait_until(lambda: _ok(f"{replica.url}/readyz"), READY_S, "ready again")
        assert engine_pid(replica) not in (None, dead)
        assert classify(replica.url).status_code == 200


def test_a_killed_supervisor_takes_its_children_and_leaves_nothing_in_dev_shm(
    tmp_path: Path,
) -> None:
    before = shm_names()
    with served(tiny(tmp_path), tmp_path) as replica:
        assert classify(replica.url).status_code == 200
        pids = children(replica.process.pid)
        assert len(pids) == 3
        replica.process.kill()
        replica.process.wait(timeout=10)
        wait_until(
            lambda: not [p for p in pids if Path(f"/proc/{p}").exists() and role_of(p)],
            30,
            "every child gone",
        )
    assert shm_names() == before
