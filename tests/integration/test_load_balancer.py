"""Debian's nginx, configured by deploy/nginx/nginx.conf, in front of two real replicas."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import httpx
import pytest

from app.probe import probe
from tests.integration.stack import (
    LoadResult,
    answers,
    nginx,
    png_bytes,
    replicas,
    run_load,
    wait_until,
)
from tests.support import TinyRepo, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MAX_REQUESTS = 3000  # the load's bound; it normally stops far sooner (see `stop`)
AFTER_EXIT = 50  # requests answered after the stopped replica has exited


def test_a_replica_stopped_with_sigterm_under_load_loses_no_request(
    tiny_repo: TinyRepo, tmp_path: Path
) -> None:
    with (
        replicas(tiny_repo.root, tmp_path, 2, shutdown_delay_s="1", drain_timeout_s="10") as pair,
        nginx([r.address for r in pair], tmp_path / "nginx") as lb,
    ):
        stopping, staying = pair
        marks: dict[str, int] = {}

        def on_answer(_: int, result: LoadResult) -> None:
            if "sigterm" not in marks and result.sent >= 60:
                marks["sigterm"] = result.sent
                stopping.process.send_signal(signal.SIGTERM)

        def stop(result: LoadResult) -> bool:
            if "sigterm" in marks and "exited" not in marks and stopping.process.poll() is not None:
                marks["exited"] = result.sent
            return "exited" in marks and result.sent >= marks["exited"] + AFTER_EXIT

        result = asyncio.run(
            run_load(
                lb.url, MAX_REQUESTS, concurrency=8, timeout_s=90, on_answer=on_answer, stop=stop
            )
        )
        assert "exited" in marks, f"the replica did not exit under load: {marks}, {result.statuses}"
        # Every request sent got one answer, and every answer was a classification: the
        # draining replica served on through its delay, and what found its listener closed
        # was retried on the other one.
        assert result.statuses == {200: result.sent}
        assert len(result.request_ids) == result.sent
        assert stopping.process.returncode == 0  # drained and exited by itself, not killed

        stopping_log = stopping.access_log()
        assert all(e["status"] == 200 for e in stopping_log if e["path"] == "/classify")
        # nginx's record of the same: whatever it had to try again ended in a 200.
        retried = [e for e in lb.access_log() if ", " in e["upstream_status"]]
        assert all(e["status"] == 200 for e in retried)
        # The replica that stayed served the rest.
        served_after = [e for e in staying.access_log() if e["status"] == 200]
        assert len(served_after) >= AFTER_EXIT


def test_even_a_replica_killed_under_load_loses_no_request(
    tiny_repo: TinyRepo, tmp_path: Path
) -> None:
    """SIGKILL: no drain at all. Requests on its connections fail mid-flight, and new ones are
    refused; nginx retries both on the other replica (POST /classify is safe to run twice)."""
    with (
        replicas(tiny_repo.root, tmp_path, 2) as pair,
        nginx([r.address for r in pair], tmp_path / "nginx") as lb,
    ):
        killed = pair[0]
        marks: dict[str, int] = {}

        def on_answer(_: int, result: LoadResult) -> None:
            if "kill" not in marks and result.sent >= 60:
                marks["kill"] = result.sent
                killed.process.send_signal(signal.SIGKILL)

        def stop(result: LoadResult) -> bool:
            return "kill" in marks and result.sent >= marks["kill"] + 100

        result = asyncio.run(
            run_load(lb.url, 400, concurrency=8, timeout_s=60, on_answer=on_answer, stop=stop)
        )
        assert result.statuses == {200: result.sent}
        assert killed.process.wait(timeout=5) == -signal.SIGKILL
        retried = [e for e in lb.access_log() if e["upstream"].startswith(f"{killed.address}, ")]
        assert retried and all(e["status"] == 200 for e in retried)


def test_on_sigterm_readiness_turns_false_first_while_the_process_still_answers(
    tiny_repo: TinyRepo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with replicas(tiny_repo.root, tmp_path, 1, shutdown_delay_s="2") as (replica,):
        monkeypatch.setenv("VIT_SERVE_PORT", str(replica.port))
        assert probe("/readyz")  # the image's HEALTHCHECK
        replica.process.send_signal(signal.SIGTERM)
        wait_until(lambda: answers(f"{replica.url}/readyz", 503), 5, "readiness off")
        assert not probe("/readyz")
        assert answers(f"{replica.url}/healthz", 200)  # alive: not restarted, just draining
        # Served as usual while load balancers notice, each answer closing its connection.
        served = httpx.post(
            f"{replica.url}/classify", content=png_bytes(), headers={"content-type": "image/png"}
        )
        assert served.status_code == 200
        assert served.headers["connection"] == "close"
        assert replica.process.wait(timeout=15) == 0
        assert "SIGTERM: draining" in replica.log_path.read_text()


def test_request_ids_pass_through_nginx_or_are_made_there(
    tiny_repo: TinyRepo, tmp_path: Path
) -> None:
    with (
        replicas(tiny_repo.root, tmp_path, 1) as (replica,),
        nginx([replica.address], tmp_path / "nginx") as lb,
    ):
        given = httpx.get(f"{lb.url}/models", headers={"x-request-id": "client-id-1"})
        made = httpx.get(f"{lb.url}/models")
        odd = httpx.get(f"{lb.url}/models", headers={"x-request-id": "not an id"})
    assert given.headers["x-request-id"] == "client-id-1"
    assert len(made.headers["x-request-id"]) == 32
    assert odd.headers["x-request-id"] not in ("not an id", made.headers["x-request-id"])
    # One id per request, the same in the client's answer, nginx's log and the replica's log.
    logged = [e["request_id"] for e in replica.access_log()]
    sent = [r.headers["x-request-id"] for r in (given, made, odd)]
    assert logged == sent
    assert [e["request_id"] for e in lb.access_log()] == sent


def test_with_no_replica_up_nginx_answers_a_retryable_503_in_json(tmp_path: Path) -> None:
    with nginx([f"127.0.0.1:{free_port()}"], tmp_path / "nginx") as lb:
        response = httpx.post(
            f"{lb.url}/classify", content=b"x", headers={"content-type": "image/png"}
        )
        assert response.status_code == 503
        assert response.json() == {"detail": "no replica could take the request; retry shortly"}
        assert response.headers["retry-after"] == "1"
        assert len(response.headers["x-request-id"]) == 32
        too_large = httpx.post(
            f"{lb.url}/classify",
            content=b"\0" * (25 * 1024 * 1024),
            headers={"content-type": "image/png"},
        )
        assert too_large.status_code == 413
        assert "24 MiB" in too_large.json()["detail"]


async def _held_replica(port: int, release: asyncio.Event, held: list[int]) -> asyncio.Server:
    """A stand-in replica that holds each request until `release` is set (a full one, as nginx
    sees), then answers it."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(1)
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            (
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ),
            0,
        )
        await reader.readexactly(length)
        await release.wait()
        body = b'{"held": true}'
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            + f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", port)


def test_with_every_replica_at_max_conns_nginx_refuses_at_once_in_json(tmp_path: Path) -> None:
    """nginx holds a replica to max_conns requests (its request places); the next is a 503
    from nginx itself, at once, so an overloaded replica's accept queue never fills."""
    port = free_port()
    held: list[int] = []

    async def scenario(url: str) -> None:
        release = asyncio.Event()
        server = await _held_replica(port, release, held)
        async with server, httpx.AsyncClient(timeout=10) as client:

            async def post() -> tuple[int, httpx.Response]:
                response = await client.post(
                    f"{url}/classify", content=b"x", headers={"content-type": "image/png"}
                )
                return response.status_code, response

            first = [asyncio.create_task(post()) for _ in range(2)]
            await asyncio.sleep(0.5)  # both are at the replica
            # Refused at once, not queued behind the held ones: those are held until it is
            # answered, so a queued request would end in this client's 10 s timeout instead.
            status, refused = await post()
            release.set()
            assert (status, refused.json()) == (
                503,
                {"detail": "no replica could take the request; retry shortly"},
            )
            assert refused.headers["retry-after"] == "1"
            assert [(await t)[0] for t in first] == [200, 200]
        assert len(held) == 2  # the refused request never reached the replica

    with nginx([f"127.0.0.1:{port}"], tmp_path / "nginx", max_conns=2) as lb:
        asyncio.run(scenario(lb.url))
