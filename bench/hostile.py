"""Hostile input: odd and broken image files, then open-loop overload at 4x capacity.

    .venv/bin/python -m bench.hostile                          # about 3 minutes
    .venv/bin/python -m bench.hostile --overload-seconds 10 --short-timeout-s 0

The real service (`python -m app.server` over the bundled demo model) on a free 127.0.0.1 port:
1. Odd images: every file in ../shared/testdata/odd-images (Pillow's test images: unusual,
   broken, fuzzer crashes, decompression bombs) POSTed to /classify as a multipart file, once per
   query string of `--odd-params`, the whole folder walked `--odd-walks` times in a row. Answers
   by status, the files behind each non-200 status with the start of the message, the slowest
   files, and the server's resident memory (/proc) before and after each walk: a leak shows as
   growth after the first walk.
2. Overload: capacity first (closed loop at concurrency 16 with the photos in
   ../shared/testdata/photos, as bench.load measures it), then an open-loop client
   (bench.openloop) sending at 4x that rate for a fixed time with the server's default queue
   limit and request timeout; then the same against a server with a short request timeout,
   where requests that wait too long get 504. Answers by status, requests lost (sent and never
   answered: a client timeout, longer than the server's, or a broken connection, with where it
   broke), latency of the 200s and of the 503s (a refusal should be immediate) beside the
   service's own histogram of them (the gap is time spent before its handler ran), Retry-After
   on 503s, the server's CPU, sockets and memory, and whether it answers normally afterwards.

Figures are printed and written to bench/results/hostile.json; the servers' logs go to
build/hostile/. Checks (no 5xx for bad input, nothing lost, Retry-After, recovery, no ERROR in
the server log, and two loose bounds on time that are the service's own promises: every answer
within its request timeout + 1 s as the client waited, and 503s at once, p99 under
`--refusal-bound-ms`, 1 s) are listed with the figures; the exit status is 1 when one fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.load import (
    ROOT,
    Connection,
    Server,
    free_port,
    get,
    load_images,
    rss_bytes,
    run_levels,
    running,
    service_command,
    wait_ready,
)
from bench.machine import machine_info
from bench.openloop import OpenLoopResult, open_loop

ODD_IMAGES = ROOT.parent / "shared" / "testdata" / "odd-images"
LOGS = ROOT / "build" / "hostile"
DETAIL_CHARS = 80


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


def shown(path: Path) -> str:
    """A path as the results file names it: from the project's root, not this machine's."""
    return os.path.relpath(path, ROOT)


def mib(n: float) -> float:
    return round(n / 2**20, 1)


# --- odd images -----------------------------------------------------------------------------


@dataclass(frozen=True)
class OddAnswer:
    file: str
    params: str
    status: int | None  # None: no answer (client timeout or a broken connection)
    detail: str  # the start of the error message; "" for a 200
    seconds: float
    failure: str | None = None


def multipart(filename: str, data: bytes) -> tuple[bytes, str]:
    """One file field `image`, declared as octet-stream: the server must find out what it is."""
    boundary = uuid.uuid4().hex
    quoted = filename.replace('"', "%22").replace("\r", "").replace("\n", "")
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{quoted}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    )
    body = head.encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


async def post_file(port: int, path: str, file: Path, params: str, timeout_s: float) -> OddAnswer:
    # A fresh connection per file, so that whatever one file does to a connection is its own.
    body, content_type = multipart(file.name, file.read_bytes())
    t0 = time.perf_counter()
    conn: Connection | None = None
    try:
        async with asyncio.timeout(timeout_s):
            conn = await Connection.open(port)
            reply = await conn.exchange("POST", f"{path}&{params}", body, content_type)
    except TimeoutError:
        return OddAnswer(file.name, params, None, "", time.perf_counter() - t0, "client timeout")
    except Exception as exc:  # a broken connection or a reply that is not HTTP
        failure = f"{type(exc).__name__}: {exc}"[:DETAIL_CHARS]
        return OddAnswer(file.name, params, None, "", time.perf_counter() - t0, failure)
    finally:
        if conn is not None:
            await conn.close()
    seconds = time.perf_counter() - t0
    detail = ""
    if reply.status != 200:
        try:
            detail = str(json.loads(reply.body)["detail"])
        except (ValueError, KeyError, TypeError):
            detail = reply.body.decode("utf-8", "replace")
    return OddAnswer(file.name, params, reply.status, detail[:DETAIL_CHARS], seconds)


async def odd_images(
    port: int, pid: int, path: str, params: list[str], walks: int, timeout_s: float
) -> dict[str, Any]:
    files = sorted(f for f in ODD_IMAGES.iterdir() if f.is_file())
    rss = [rss_bytes(pid)]
    answers: list[list[OddAnswer]] = []
    t0 = time.perf_counter()
    for _ in range(walks):
        walk = [await post_file(port, path, f, p, timeout_s) for p in params for f in files]
        answers.append(walk)
        rss.append(rss_bytes(pid))
    seconds = time.perf_counter() - t0
    every = [a for walk in answers for a in walk]
    status_sets: dict[tuple[str, str], set[int | None]] = {}
    for a in every:
        status_sets.setdefault((a.params, a.file), set()).add(a.status)
    first = answers[0]
    by_params: dict[str, Any] = {}
    for p in params:
        mine = [a for a in first if a.params == p]
        non_200: dict[str, list[dict[str, str]]] = {}
        for a in mine:
            if a.status != 200:
                non_200.setdefault(str(a.status), []).append({"file": a.file, "detail": a.detail})
        by_params[p] = {
            "statuses": dict(sorted(Counter(str(a.status) for a in mine).items())),
            "non_200": dict(sorted(non_200.items())),
        }
    slowest = sorted(every, key=lambda a: a.seconds, reverse=True)[:5]
    healthz = await get(port, "/healthz")
    return {
        "folder": shown(ODD_IMAGES),
        "files": len(files),
        "params": params,
        "walks": walks,
        "requests": len(every),
        "seconds": round(seconds, 1),
        "by_params": by_params,
        "status_5xx": sum(1 for a in every if a.status is not None and a.status >= 500),
        "no_answer": [asdict(a) for a in every if a.status is None],
        "inconsistent": [
            {"params": p, "file": f, "statuses": sorted(str(s) for s in found)}
            for (p, f), found in sorted(status_sets.items())
            if len(found) > 1
        ],
        "slowest": [
            {"file": a.file, "params": a.params, "ms": round(a.seconds * 1e3, 1)} for a in slowest
        ],
        "healthz_after": healthz[0],
        "rss_mib": [mib(r) for r in rss],  # before the first walk, then after each
        "rss_growth_mib": mib(rss[-1] - rss[0]),
        "rss_growth_after_first_walk_mib": mib(rss[-1] - rss[1]),
    }


def odd_checks(odd: dict[str, Any]) -> list[Check]:
    lost = odd["no_answer"]
    return [
        Check("odd images: no 5xx", odd["status_5xx"] == 0, f"{odd['status_5xx']} 5xx"),
        Check(
            "odd images: every request answered (no timeout, no broken connection)",
            not lost,
            ", ".join(f"{a['file']} ({a['failure']})" for a in lost[:5]) or "all answered",
        ),
        Check(
            "odd images: the same status for a file on every walk",
            not odd["inconsistent"],
            f"{len(odd['inconsistent'])} files differ",
        ),
        Check("odd images: /healthz 200 afterwards", odd["healthz_after"] == 200, "checked"),
    ]


# --- overload -------------------------------------------------------------------------------


_QUEUE_DEPTH = re.compile(r"^vit_serve_queue_depth(?:\{[^}]*\})? ([0-9.e+]+)$", re.MULTILINE)


async def queue_depth(port: int) -> float | None:
    status, body = await get(port, "/metrics")
    found = _QUEUE_DEPTH.search(body.decode()) if status == 200 else None
    return float(found.group(1)) if found else None


_DURATION = re.compile(
    r"^vit_serve_request_duration_seconds_bucket\{([^}]*)\} ([0-9.e+]+)$", re.MULTILINE
)
_LABEL = re.compile(r'(\w+)="([^"]*)"')


async def duration_buckets(port: int) -> dict[tuple[str, float], float]:
    """The service's own /classify latency histogram: (status, le) -> cumulative count."""
    status, body = await get(port, "/metrics")
    found: dict[tuple[str, float], float] = {}
    for labels, count in _DURATION.findall(body.decode() if status == 200 else ""):
        tags = dict(_LABEL.findall(labels))
        if tags.get("route") == "/classify":
            key = (tags["status"], float(tags["le"]))
            found[key] = found.get(key, 0.0) + float(count)
    return found


def server_quantiles(
    before: dict[tuple[str, float], float], after: dict[tuple[str, float], float]
) -> dict[str, dict[str, float | None]]:
    """Per status, the bucket bounds (ms) that hold the p50 and p99 of the requests between two
    scrapes. The server's clock starts when its handler first sees the request, so the gap to
    the client's figures is time spent before that: in the listen backlog, socket buffers and
    the event loop's backlog. None: above the largest bucket."""
    out: dict[str, dict[str, float | None]] = {}
    for status in sorted({s for s, _ in after}):
        les = sorted(le for s, le in after if s == status)
        cumulative = [after[(status, le)] - before.get((status, le), 0.0) for le in les]
        total = cumulative[-1]
        if not total:
            continue
        found: dict[str, float | None] = {"count": total}
        for name, q in (("p50_at_most", 0.5), ("p99_at_most", 0.99)):
            le = next(le for le, c in zip(les, cumulative, strict=True) if c >= q * total)
            found[name] = None if le == float("inf") else round(le * 1e3, 1)
        out[status] = found
    return out


async def recovery(port: int, path: str, photo: bytes) -> dict[str, Any]:
    """After the storm: liveness, one ordinary request, and an empty queue (None: no answer)."""
    found: dict[str, Any] = dict.fromkeys(("healthz", "classify", "classify_ms", "queue_depth"))
    conn: Connection | None = None
    try:
        async with asyncio.timeout(30):
            found["healthz"] = (await get(port, "/healthz"))[0]
            conn = await Connection.open(port)
            t0 = time.perf_counter()
            found["classify"] = (await conn.exchange("POST", path, photo)).status
            found["classify_ms"] = round((time.perf_counter() - t0) * 1e3, 1)
            found["queue_depth"] = await queue_depth(port)
    except Exception as exc:  # reported with the figures: the check fails on the None
        found["error"] = f"{type(exc).__name__}: {exc}"[:DETAIL_CHARS]
    finally:
        if conn is not None:
            await conn.close()
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def open_sockets(pid: int) -> int:
    """Sockets a process holds: the connections it has accepted, plus its listener."""
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):  # closed while we look
            count += os.readlink(fd).startswith("socket:")
    return count


async def overload(
    port: int,
    pid: int,
    path: str,
    images: list[bytes],
    rate: float,
    a: argparse.Namespace,
    client_timeout_s: float,
    client_port: int | None = None,
) -> dict[str, Any]:
    """`client_port`: where the load goes (nginx in front, with --through-nginx); the server's
    own figures are read from `port` either way."""
    rss_before = rss_peak = rss_bytes(pid)
    sockets_peak = 0
    buckets = await duration_buckets(port)
    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
    task = asyncio.create_task(
        open_loop(
            port if client_port is None else client_port,
            path,
            images,
            rate,
            a.overload_seconds,
            a.max_requests,
            client_timeout_s,
            a.max_in_flight,
        )
    )
    while not task.done():
        rss_peak = max(rss_peak, rss_bytes(pid))
        sockets_peak = max(sockets_peak, open_sockets(pid))
        await asyncio.wait({task}, timeout=1)
    result: OpenLoopResult = task.result()
    server_cpu = (cpu_seconds(pid) - cpu0) / (time.perf_counter() - t0)
    server_side = server_quantiles(buckets, await duration_buckets(port))
    after = await recovery(port, path, images[0])
    return {
        "load": asdict(result),
        "server_duration_ms": server_side,
        "client_timeout_s": client_timeout_s,
        "recovery": after,
        "server_cpu_cores": round(server_cpu, 2),
        "server_sockets_peak": sockets_peak,
        "rss_mib_before": mib(rss_before),
        "rss_mib_peak": mib(rss_peak),
        "rss_mib_after": mib(rss_bytes(pid)),
    }


def overload_checks(name: str, run: dict[str, Any], refusal_bound_ms: float) -> list[Check]:
    r, after = run["load"], run["recovery"]
    refused_p99 = r["latency_ms"].get("503", {}).get("p99", 0.0)
    # The server's deadline starts when its handler first sees a request; a client waits from
    # its connect, so this is what the timeout is worth end to end.
    timeout_s = run["request_timeout_s"]
    slowest_s = max((q["max"] for q in r["latency_ms"].values()), default=0.0) / 1e3
    other = {s: n for s, n in r["statuses"].items() if s not in ("200", "503", "504")}
    missing = r["retry_after_503"].get("missing", 0)
    return [
        Check(
            f"{name}: every request answered once (lost 0)",
            r["lost"] == 0,
            f"{r['lost']} lost {r['lost_reasons']}" if r["lost"] else f"{r['sent']} answered",
        ),
        Check(f"{name}: only 200, 503 or 504", not other, f"others: {other}" if other else "yes"),
        Check(
            f"{name}: every 503 carries Retry-After",
            missing == 0,
            f"{missing} without" if missing else f"{r['statuses'].get('503', 0)} 503s, all with",
        ),
        Check(
            f"{name}: every answer within the request timeout + 1 s, as the client waited",
            slowest_s <= timeout_s + 1,
            f"slowest {slowest_s:.1f} s",
        ),
        Check(
            f"{name}: 503s refused at once (p99 under {refusal_bound_ms:g} ms)",
            refused_p99 <= refusal_bound_ms,
            f"p99 {refused_p99:g} ms" if r["statuses"].get("503") else "no 503s",
        ),
        Check(
            f"{name}: the client sent every arrival",
            r["not_sent_in_flight_cap"] == 0,
            f"{r['not_sent_in_flight_cap']} not sent (client in-flight cap)",
        ),
        Check(
            f"{name}: recovered (/healthz 200, a photo 200, queue empty)",
            after["healthz"] == 200 and after["classify"] == 200 and after["queue_depth"] == 0,
            f"healthz {after['healthz']}, photo {after['classify']} in {after['classify_ms']} ms, "
            f"queue {after['queue_depth']}",
        ),
    ]


# --- the server's log -----------------------------------------------------------------------


def log_summary(path: Path) -> dict[str, Any]:
    """JSON lines by level, and the rest: what native code and Python's warnings print."""
    levels: Counter[str] = Counter()
    errors: list[str] = []
    other: Counter[str] = Counter()
    for line in path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
            level, message = str(entry["level"]), str(entry.get("message", ""))
        except (ValueError, KeyError, TypeError):
            other[line.strip()[:160]] += 1
            continue
        levels[level] += 1
        if level in ("ERROR", "CRITICAL") and len(errors) < 5:
            errors.append(message[:200])
    return {
        "path": str(path.relative_to(ROOT)),
        "levels": dict(levels),
        "first_errors": errors,
        "non_json_lines": sum(other.values()),
        "tracebacks": sum(n for text, n in other.items() if text.startswith("Traceback")),
        "non_json_most_common": [[text, n] for text, n in other.most_common(5)],
    }


def log_check(name: str, summary: dict[str, Any]) -> Check:
    # Lines that are not JSON (libtiff's messages, Pillow's warnings) are counted, not failed:
    # a crash in native code also kills the server, which its own check sees.
    levels = summary["levels"]
    bad = levels.get("ERROR", 0) + levels.get("CRITICAL", 0) + summary["tracebacks"]
    return Check(
        f"{name}: no ERROR and no traceback in the server log",
        bad == 0,
        f"{bad}: {summary['first_errors'][:2]}" if bad else f"levels {levels}",
    )


# --- main -----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def service(
    a: argparse.Namespace, request_timeout_s: float, log_path: Path
) -> AsyncIterator[tuple[int, subprocess.Popen[bytes]]]:
    """`python -m app.server` as bench.load runs it, its log to `log_path`, until ready."""
    port = free_port()
    cmd, env = service_command(a.repo, a.model, port)
    settings = {
        "VIT_SERVE_MAX_QUEUE_IMAGES": str(a.queue_images),
        "VIT_SERVE_REQUEST_TIMEOUT_S": str(request_timeout_s),
    }
    with log_path.open("wb") as log, running(cmd, {**env, **settings}, log) as process:
        await wait_ready(port, process, 120)
        yield port, process


@contextlib.contextmanager
def balancer(a: argparse.Namespace, port: int, work: Path) -> Iterator[int | None]:
    """With --through-nginx: Debian's nginx on loopback, configured by deploy/nginx/nginx.conf
    (as the integration tests render it), in front of the replica; its port, else None."""
    if not a.through_nginx:
        yield None
        return
    from tests.integration.stack import nginx  # the same rendering the integration tests use

    with nginx([f"127.0.0.1:{port}"], work) as lb:
        yield lb.port


async def odd_and_capacity(
    a: argparse.Namespace,
    port: int,
    process: subprocess.Popen[bytes],
    path: str,
    images: list[bytes],
    out: dict[str, Any],
    checks: list[Check],
) -> float:
    """Section 1, and the capacity that section 2 overloads: returns the overload rate."""
    if a.odd_walks == 0:
        print("odd images: skipped (--odd-walks 0)")
    elif ODD_IMAGES.is_dir():
        print(f"odd images: walking {ODD_IMAGES} {a.odd_walks} times ...")
        out["odd_images"] = await odd_images(
            port, process.pid, path, a.odd_params, a.odd_walks, a.odd_timeout_s
        )
        checks += odd_checks(out["odd_images"])
    else:
        print(f"odd images: skipped, {ODD_IMAGES} is absent")
    if process.poll() is not None:
        return 0.0
    print(f"capacity: closed loop at concurrency {a.capacity_concurrency} ...")
    levels = await run_levels(
        [Server("service", port, process.pid, path, batch_histogram=True)],
        images,
        concurrencies=[a.capacity_concurrency],
        requests=10**6,
        max_seconds=a.capacity_seconds,
        rounds=1,
    )
    (capacity,) = levels["service"]
    out["capacity"] = asdict(capacity)
    rate: float = a.overload_factor * capacity.img_per_s
    out["overload_rate"] = round(rate, 1)
    return rate


async def bench(a: argparse.Namespace, images: list[bytes]) -> dict[str, Any]:
    out: dict[str, Any] = {"odd_images": None, "capacity": None, "overload": {}, "server_log": {}}
    checks: list[Check] = []
    path = f"/classify?model={a.model}&top_k=5"
    LOGS.mkdir(parents=True, exist_ok=True)
    runs = [("default_timeout", a.request_timeout_s)]
    if a.short_timeout_s > 0:
        runs.append(("short_timeout", a.short_timeout_s))
    rate = 0.0
    for name, timeout_s in runs:
        log_path = LOGS / f"server-{name.replace('_', '-')}.log"
        label = f"overload ({timeout_s:g} s timeout)"
        async with service(a, timeout_s, log_path) as (port, process):
            if name == "default_timeout":
                # On the first server only: the second differs in its request timeout alone.
                rate = await odd_and_capacity(a, port, process, path, images, out, checks)
            if process.poll() is not None or rate <= 0:
                checks.append(
                    Check(
                        f"{label}: server alive and serving",
                        False,
                        f"exit status {process.poll()}, rate {rate:g}; see {log_path}",
                    )
                )
            else:
                print(
                    f"overload, request timeout {timeout_s:g} s: open loop at {rate:.0f} req/s "
                    f"for {a.overload_seconds:g} s ..."
                )
                # The client waits longer than the server may: a lost request is the server's.
                with balancer(a, port, LOGS / f"nginx-{name.replace('_', '-')}") as lb_port:
                    run = await overload(
                        port,
                        process.pid,
                        path,
                        images,
                        rate,
                        a,
                        timeout_s + a.client_margin_s,
                        lb_port,
                    )
                run = {"through_nginx": lb_port is not None, **run}
                run = {"request_timeout_s": timeout_s, **run}
                out["overload"][name] = run
                checks += overload_checks(label, run, a.refusal_bound_ms)
                alive = process.poll() is None
                checks.append(Check(f"{label}: server alive at the end", alive, ""))
        out["server_log"][name] = log_summary(log_path)
        checks.append(log_check(f"server ({timeout_s:g} s timeout)", out["server_log"][name]))
        if rate <= 0:
            break
    out["checks"] = [asdict(c) for c in checks]
    return out


def bound(ms: float | None) -> str:
    return "10 s+" if ms is None else f"{ms:g} ms"


def summary(out: dict[str, Any]) -> str:
    lines: list[str] = []
    odd = out["odd_images"]
    if odd is None:
        lines.append("odd images: skipped")
    else:
        lines.append(
            f"odd images: {odd['files']} files x {len(odd['params'])} query strings x "
            f"{odd['walks']} walks = {odd['requests']} requests in {odd['seconds']} s"
        )
        first: dict[str, str] = {}
        for n, p in enumerate(odd["params"]):
            found = odd["by_params"][p]
            counts = ", ".join(f"{s}: {c}" for s, c in found["statuses"].items())
            lines.append(f"  [{p}] {counts}")
            for status, files in found["non_200"].items():
                for f in files:
                    # The first query string lists every file; the others only what differs.
                    if n == 0:
                        first[f["file"]] = status
                        lines.append(f"    {status}  {f['file']:<44} {f['detail']}")
                    elif first.get(f["file"]) != status:
                        lines.append(f"    {status}  {f['file']:<44} {f['detail']}  (differs)")
        slow = ", ".join(f"{s['file']} [{s['params']}] {s['ms']} ms" for s in odd["slowest"][:3])
        lines.append(f"  slowest: {slow}")
        lines.append(
            f"  server RSS MiB before/after each walk: {odd['rss_mib']} "
            f"(growth {odd['rss_growth_mib']:+}, after the first walk "
            f"{odd['rss_growth_after_first_walk_mib']:+})"
        )
    if cap := out["capacity"]:
        lines.append(
            f"capacity (closed loop, concurrency {cap['concurrency']}): "
            f"{cap['img_per_s']:.1f} img/s, p50 {cap['latency_ms_p50']:.1f} ms, "
            f"p99 {cap['latency_ms_p99']:.1f} ms"
        )
    for name, run in out["overload"].items():
        r = run["load"]
        lat = r["latency_ms"]
        lines.append(
            f"overload [{name}, server timeout {run['request_timeout_s']:g} s]: target "
            f"{r['rate_target']:.0f} req/s, arrivals at {r['arrival_rate']:.0f} req/s, sent "
            f"{r['sent']} ({r['not_sent_in_flight_cap']} not: client cap), answered "
            f"{r['answered']}, lost {r['lost']} (client CPU {r['client_cpu_s_per_s']:.2f} cores)"
        )
        lines.append(f"  statuses {r['statuses']}  goodput {r['goodput_img_per_s']:.1f} img/s")
        server = run["server_duration_ms"]
        for status in sorted(lat):
            q, own = lat[status], server.get(status)
            mine = (
                f"server-side p50 <= {bound(own['p50_at_most'])}, "
                f"p99 <= {bound(own['p99_at_most'])}"
                if own
                else "not in the server's histogram"
            )
            lines.append(
                f"  {status}: p50 {q['p50']:.1f} ms  p99 {q['p99']:.1f} ms  max {q['max']:.1f} ms"
                f"   ({mine})"
            )
        lines.append(
            f"  503 Retry-After: {r['retry_after_503'] or 'no 503s'}; in flight at most "
            f"{r['max_in_flight_seen']}; server RSS MiB {run['rss_mib_before']} -> peak "
            f"{run['rss_mib_peak']} -> {run['rss_mib_after']}"
        )
        lines.append(
            f"  server: {run['server_cpu_cores']:.2f} cores busy, at most "
            f"{run['server_sockets_peak']} sockets open (accepted connections)"
        )
        lines.append(f"  outstanding each second of sending: {r['in_flight_each_second']}")
        if r["lost"]:
            lines.append(f"  lost: {r['lost_reasons']}")
        after = run["recovery"]
        lines.append(
            f"  afterwards: /healthz {after['healthz']}, a photo {after['classify']} in "
            f"{after['classify_ms']} ms, queue depth {after['queue_depth']}"
        )
    for name, log in out["server_log"].items():
        lines.append(
            f"server log [{name}]: {log['levels']}, {log['non_json_lines']} lines not JSON "
            f"(native libraries, Python warnings), {log['tracebacks']} tracebacks"
        )
    checks = out["checks"]
    lines.append(f"checks: {sum(c['passed'] for c in checks)}/{len(checks)} passed")
    for c in checks:
        lines.append(f"  {'PASS' if c['passed'] else 'FAIL'}  {c['name']}: {c['detail']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repo", type=Path, default=ROOT / "model_repo")
    p.add_argument("--model", default="demo-shapes")
    p.add_argument(
        "--odd-params",
        nargs="+",
        default=["resize=crop", "resize=fit&rollout=png"],
        help="query strings; each odd image is sent once with each",
    )
    p.add_argument("--odd-walks", type=int, default=3, help="passes over the folder (0: skip)")
    p.add_argument("--odd-timeout-s", type=float, default=30.0, help="client timeout per file")
    p.add_argument("--capacity-concurrency", type=int, default=16)
    p.add_argument("--capacity-seconds", type=float, default=15.0)
    p.add_argument("--overload-factor", type=float, default=4.0, help="x the measured capacity")
    p.add_argument("--overload-seconds", type=float, default=30.0, help="per overload run")
    p.add_argument("--max-requests", type=int, default=40_000, help="per overload run")
    p.add_argument(
        "--max-in-flight",
        type=int,
        default=4096,
        help="the client's bound on outstanding requests (arrivals beyond it are not sent)",
    )
    p.add_argument("--queue-images", type=int, default=256, help="VIT_SERVE_MAX_QUEUE_IMAGES")
    p.add_argument("--request-timeout-s", type=float, default=30.0, help="the server's")
    p.add_argument(
        "--short-timeout-s",
        type=float,
        default=2.0,
        help="a second overload run with this server request timeout (0: none)",
    )
    p.add_argument(
        "--refusal-bound-ms",
        type=float,
        default=1000.0,
        help="a 503 should be immediate: its p99 above this fails a check",
    )
    p.add_argument(
        "--client-margin-s",
        type=float,
        default=30.0,
        help="the client's timeout is the server's request timeout plus this",
    )
    p.add_argument(
        "--through-nginx",
        action="store_true",
        help="send the overload through deploy/nginx/nginx.conf (max_conns sheds at nginx)",
    )
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "hostile.json")
    a = p.parse_args(argv)
    if a.odd_walks < 0:
        p.error("--odd-walks must be 0 (skip) or more")

    images, source = load_images()
    print(f"load with {source}")
    started = time.perf_counter()
    out = asyncio.run(bench(a, images))
    text = summary(out)
    print(text)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(
        json.dumps(
            {
                "date": datetime.now(UTC).isoformat(timespec="seconds"),
                "model": a.model,
                "images": source,
                "machine": machine_info(),
                "config": {k: (shown(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
                "seconds": round(time.perf_counter() - started, 1),
                **out,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {a.out}")
    if not all(c["passed"] for c in out["checks"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
