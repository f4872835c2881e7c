"""Hostile input: odd and broken image files, then open-loop overload at 4x capacity.

    .venv/bin/python -m bench.hostile                          # about 3 minutes
    .venv/bin/python -m bench.hostile --odd-walks 0 --through-nginx \\
        --out bench/results/hostile_nginx.json

Reports answers by status, requests lost, latencies (the client's, and the service's histogram),
memory, CPU and recovery, with the checks of what the service promises (no 5xx for bad input,
nothing lost, Retry-After, recovery, a clean log; exit 1 when one fails). Writes
bench/results/hostile.json; the servers' logs go to build/hostile/.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from bench import nginx
from bench.harness import (
    DEMO_MODEL,
    DEMO_REPO,
    RESULTS,
    ROOT,
    Connection,
    Histogram,
    LoadResult,
    OpenLoopResult,
    Sample,
    Server,
    Target,
    cpu_seconds,
    get,
    load_images,
    matching,
    mib,
    open_loop,
    open_sockets,
    rss_bytes,
    scrape,
    service,
    shown,
    side_by_side,
    total,
    write_results,
)

ODD_IMAGES = ROOT.parent / "shared" / "testdata" / "odd-images"
LOGS = ROOT / "build" / "hostile"
DETAIL_CHARS = 80
DURATION = "vit_serve_request_duration_seconds"


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


# --- odd images -----------------------------------------------------------------------------


@dataclass(frozen=True)
class OddAnswer:
    file: str
    params: str
    status: int | None  # None: no answer (client timeout or a broken connection)
    detail: str  # the start of the error message; "" for a 200
    seconds: float
    failure: str | None = None


@dataclass
class FileDetail:
    file: str
    detail: str


@dataclass
class ParamsAnswers:
    """One query string's answers on the first walk."""

    statuses: dict[str, int]
    non_200: dict[str, list[FileDetail]]  # status -> the files answered with it


@dataclass
class Inconsistent:
    params: str
    file: str
    statuses: list[str]  # a file's statuses over the walks, when they differ


@dataclass
class Slow:
    file: str
    params: str
    ms: float


@dataclass
class OddImages:
    folder: str
    files: int
    params: list[str]
    walks: int
    requests: int
    seconds: float
    by_params: dict[str, ParamsAnswers]
    status_5xx: int
    no_answer: list[OddAnswer]
    inconsistent: list[Inconsistent]
    slowest: list[Slow]
    healthz_after: int
    rss_mib: list[float]  # before the first walk, then after each
    rss_growth_mib: float
    rss_growth_after_first_walk_mib: float


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


async def odd_images(server: Server, params: list[str], walks: int, timeout_s: float) -> OddImages:
    files = sorted(f for f in ODD_IMAGES.iterdir() if f.is_file())
    rss = [rss_bytes(server.pid)]
    answers: list[list[OddAnswer]] = []
    t0 = time.perf_counter()
    for _ in range(walks):
        walk = [
            await post_file(server.port, server.path, f, p, timeout_s)
            for p in params
            for f in files
        ]
        answers.append(walk)
        rss.append(rss_bytes(server.pid))
    seconds = time.perf_counter() - t0
    every = [a for walk in answers for a in walk]
    status_sets: dict[tuple[str, str], set[int | None]] = {}
    for a in every:
        status_sets.setdefault((a.params, a.file), set()).add(a.status)
    by_params: dict[str, ParamsAnswers] = {}
    for p in params:
        mine = [a for a in answers[0] if a.params == p]
        non_200: dict[str, list[FileDetail]] = {}
        for a in mine:
            if a.status != 200:
                non_200.setdefault(str(a.status), []).append(FileDetail(a.file, a.detail))
        by_params[p] = ParamsAnswers(
            dict(sorted(Counter(str(a.status) for a in mine).items())),
            dict(sorted(non_200.items())),
        )
    slowest = sorted(every, key=lambda a: a.seconds, reverse=True)[:5]
    return OddImages(
        folder=shown(ODD_IMAGES),
        files=len(files),
        params=params,
        walks=walks,
        requests=len(every),
        seconds=round(seconds, 1),
        by_params=by_params,
        status_5xx=sum(1 for a in every if a.status is not None and a.status >= 500),
        no_answer=[a for a in every if a.status is None],
        inconsistent=[
            Inconsistent(p, f, sorted(str(s) for s in found))
            for (p, f), found in sorted(status_sets.items())
            if len(found) > 1
        ],
        slowest=[Slow(a.file, a.params, round(a.seconds * 1e3, 1)) for a in slowest],
        healthz_after=(await get(server.port, "/healthz")).status,
        rss_mib=[mib(r) for r in rss],
        rss_growth_mib=mib(rss[-1] - rss[0]),
        rss_growth_after_first_walk_mib=mib(rss[-1] - rss[1]),
    )


def odd_checks(odd: OddImages) -> list[Check]:
    lost = odd.no_answer
    return [
        Check("odd images: no 5xx", odd.status_5xx == 0, f"{odd.status_5xx} 5xx"),
        Check(
            "odd images: every request answered (no timeout, no broken connection)",
            not lost,
            ", ".join(f"{a.file} ({a.failure})" for a in lost[:5]) or "all answered",
        ),
        Check(
            "odd images: the same status for a file on every walk",
            not odd.inconsistent,
            f"{len(odd.inconsistent)} files differ",
        ),
        Check("odd images: /healthz 200 afterwards", odd.healthz_after == 200, "checked"),
    ]


# --- overload -------------------------------------------------------------------------------


@dataclass
class ServerQuantiles:
    """The service's own histogram: bucket bounds (ms) holding the p50 and p99 (None: above the
    largest). Its clock starts when its handler first sees a request, so the gap to the
    client's figures is time spent before: listen backlog, socket buffers, the event loop."""

    count: float
    p50_at_most: float | None
    p99_at_most: float | None


def server_side(before: list[Sample], after: list[Sample]) -> dict[str, ServerQuantiles]:
    """/classify's duration per status between two scrapes."""
    found: dict[str, ServerQuantiles] = {}
    statuses = {
        s.labels["status"] for s in matching(after, f"{DURATION}_bucket", route="/classify")
    }
    for status in sorted(statuses):
        labels = {"route": "/classify", "status": status}
        h = Histogram.of(after, DURATION, **labels).since(Histogram.of(before, DURATION, **labels))
        count = next(reversed(h.buckets.values()))
        if count:
            p50, p99 = h.at_most(0.5), h.at_most(0.99)
            found[status] = ServerQuantiles(
                count,
                None if p50 is None else round(p50 * 1e3, 1),
                None if p99 is None else round(p99 * 1e3, 1),
            )
    return found


@dataclass
class Recovery:
    """After the storm: liveness, one ordinary request, and the queue (None: no answer)."""

    healthz: int | None = None
    classify: int | None = None
    classify_ms: float | None = None
    queue_depth: float | None = None
    error: str | None = None


async def recovery(server: Server, photo: bytes) -> Recovery:
    found = Recovery()
    conn: Connection | None = None
    try:
        async with asyncio.timeout(30):
            found.healthz = (await get(server.port, "/healthz")).status
            conn = await Connection.open(server.port)
            t0 = time.perf_counter()
            found.classify = (await conn.exchange("POST", server.path, photo)).status
            found.classify_ms = round((time.perf_counter() - t0) * 1e3, 1)
            found.queue_depth = total(await scrape(server.port), "vit_serve_queue_depth")
    except Exception as exc:  # reported with the figures: the check fails on the None
        found.error = f"{type(exc).__name__}: {exc}"[:DETAIL_CHARS]
    finally:
        if conn is not None:
            await conn.close()
    return found


@dataclass
class OverloadRun:
    request_timeout_s: float
    through_nginx: bool
    load: OpenLoopResult
    server_duration_ms: dict[str, ServerQuantiles]
    client_timeout_s: float
    recovery: Recovery
    server_cpu_cores: float
    server_sockets_peak: int
    rss_mib_before: float
    rss_mib_peak: float
    rss_mib_after: float


async def overload(
    server: Server,
    target: Target,
    images: list[bytes],
    rate: float,
    a: argparse.Namespace,
    request_timeout_s: float,
) -> OverloadRun:
    """Open loop at `rate` to `target` (the server, or nginx in front of it); the server's own
    figures are read from the server either way. The client waits longer than the server may:
    a lost request is the server's."""
    client_timeout_s = request_timeout_s + a.client_margin_s
    rss_before = rss_peak = rss_bytes(server.pid)
    sockets_peak = 0
    before = await scrape(server.port)
    cpu0, t0 = cpu_seconds(server.pid), time.perf_counter()
    task = asyncio.create_task(
        open_loop(
            target,
            images,
            rate,
            a.overload_seconds,
            a.max_requests,
            client_timeout_s,
            a.max_in_flight,
        )
    )
    while not task.done():
        rss_peak = max(rss_peak, rss_bytes(server.pid))
        sockets_peak = max(sockets_peak, open_sockets(server.pid))
        await asyncio.wait({task}, timeout=1)
    result = task.result()
    server_cpu = (cpu_seconds(server.pid) - cpu0) / (time.perf_counter() - t0)
    return OverloadRun(
        request_timeout_s=request_timeout_s,
        through_nginx=target.port != server.port,
        load=result,
        server_duration_ms=server_side(before, await scrape(server.port)),
        client_timeout_s=client_timeout_s,
        recovery=await recovery(server, images[0]),
        server_cpu_cores=round(server_cpu, 2),
        server_sockets_peak=sockets_peak,
        rss_mib_before=mib(rss_before),
        rss_mib_peak=mib(rss_peak),
        rss_mib_after=mib(rss_bytes(server.pid)),
    )


def overload_checks(name: str, run: OverloadRun) -> list[Check]:
    """What the service promises under overload. Its latencies are reported, not checked: a
    bound on time is the machine's as much as the service's."""
    r, after = run.load, run.recovery
    other = {s: n for s, n in r.statuses.items() if s not in ("200", "503", "504")}
    missing = r.retry_after_503.get("missing", 0)
    return [
        Check(
            f"{name}: every request answered once (lost 0)",
            r.lost == 0,
            f"{r.lost} lost {r.lost_reasons}" if r.lost else f"{r.sent} answered",
        ),
        Check(f"{name}: only 200, 503 or 504", not other, f"others: {other}" if other else "yes"),
        Check(
            f"{name}: every 503 carries Retry-After",
            missing == 0,
            f"{missing} without" if missing else f"{r.statuses.get('503', 0)} 503s, all with",
        ),
        Check(
            f"{name}: the client sent every arrival",
            r.not_sent_in_flight_cap == 0,
            f"{r.not_sent_in_flight_cap} not sent (client in-flight cap)",
        ),
        Check(
            f"{name}: recovered (/healthz 200, a photo 200, queue empty)",
            after.healthz == 200 and after.classify == 200 and after.queue_depth == 0,
            f"healthz {after.healthz}, photo {after.classify} in {after.classify_ms} ms, "
            f"queue {after.queue_depth}",
        ),
    ]


# --- the server's log -----------------------------------------------------------------------


@dataclass
class LogSummary:
    """JSON lines by level, and the rest: what native code and Python's warnings print."""

    path: str
    levels: dict[str, int]
    first_errors: list[str]
    non_json_lines: int
    tracebacks: int
    non_json_most_common: list[tuple[str, int]]


def log_summary(path: Path) -> LogSummary:
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
    return LogSummary(
        path=shown(path),
        levels=dict(levels),
        first_errors=errors,
        non_json_lines=sum(other.values()),
        tracebacks=sum(n for text, n in other.items() if text.startswith("Traceback")),
        non_json_most_common=other.most_common(5),
    )


def log_check(name: str, log: LogSummary) -> Check:
    # Lines that are not JSON (libtiff's messages, Pillow's warnings) are counted, not failed:
    # a crash in native code also kills the server, which its own check sees.
    bad = log.levels.get("ERROR", 0) + log.levels.get("CRITICAL", 0) + log.tracebacks
    return Check(
        f"{name}: no ERROR and no traceback in the server log",
        bad == 0,
        f"{bad}: {log.first_errors[:2]}" if bad else f"levels {log.levels}",
    )


# --- main -----------------------------------------------------------------------------------


@dataclass
class HostileReport:
    model: str
    images: str
    config: dict[str, object]
    seconds: float = 0.0
    odd_images: OddImages | None = None
    capacity: LoadResult | None = None
    overload_rate: float | None = None
    overload: dict[str, OverloadRun] = field(default_factory=dict)
    server_log: dict[str, LogSummary] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)


@contextlib.contextmanager
def balancer(a: argparse.Namespace, server: Server, work: Path) -> Iterator[Target]:
    """Where the overload goes: the server, or with --through-nginx Debian's nginx configured
    by deploy/nginx/nginx.conf in front of it."""
    if not a.through_nginx:
        yield server.target()
        return
    with nginx.in_front([f"127.0.0.1:{server.port}"], work) as port:
        yield replace(server.target(), port=port)


async def odd_and_capacity(
    a: argparse.Namespace, server: Server, images: list[bytes], report: HostileReport
) -> float:
    """Section 1, and the capacity that section 2 overloads: returns the overload rate."""
    if a.odd_walks == 0:
        print("odd images: skipped (--odd-walks 0)")
    elif ODD_IMAGES.is_dir():
        print(f"odd images: walking {ODD_IMAGES} {a.odd_walks} times ...")
        report.odd_images = await odd_images(server, a.odd_params, a.odd_walks, a.odd_timeout_s)
        report.checks += odd_checks(report.odd_images)
    else:
        print(f"odd images: skipped, {ODD_IMAGES} is absent")
    if not server.alive():
        return 0.0
    print(f"capacity: closed loop at concurrency {a.capacity_concurrency} ...")
    (report.capacity,) = await side_by_side(
        [server.target()], images, a.capacity_concurrency, 10**6, a.capacity_seconds, rounds=1
    )
    rate: float = a.overload_factor * report.capacity.img_per_s
    report.overload_rate = round(rate, 1)
    return rate


async def bench(a: argparse.Namespace, images: list[bytes], report: HostileReport) -> None:
    LOGS.mkdir(parents=True, exist_ok=True)
    runs = [("default_timeout", a.request_timeout_s)]
    if a.short_timeout_s > 0:
        runs.append(("short_timeout", a.short_timeout_s))
    rate = 0.0
    for name, timeout_s in runs:
        log_path = LOGS / f"server-{name.replace('_', '-')}.log"
        label = f"overload ({timeout_s:g} s timeout)"
        settings = {
            "VIT_SERVE_MAX_QUEUE_IMAGES": str(a.queue_images),
            "VIT_SERVE_REQUEST_TIMEOUT_S": str(timeout_s),
        }
        with service(a.repo, a.model, settings, log_path) as server:
            if name == "default_timeout":
                # On the first server only: the second differs in its request timeout alone.
                rate = await odd_and_capacity(a, server, images, report)
            if not server.alive() or rate <= 0:
                detail = f"exit status {server.process.poll()}, rate {rate:g}; see {log_path}"
                report.checks.append(Check(f"{label}: server alive and serving", False, detail))
            else:
                print(
                    f"overload, request timeout {timeout_s:g} s: open loop at {rate:.0f} req/s "
                    f"for {a.overload_seconds:g} s ..."
                )
                with balancer(a, server, LOGS / f"nginx-{name.replace('_', '-')}") as target:
                    run = await overload(server, target, images, rate, a, timeout_s)
                report.overload[name] = run
                report.checks += overload_checks(label, run)
                alive = server.alive()
                report.checks.append(Check(f"{label}: server alive at the end", alive, ""))
        report.server_log[name] = log_summary(log_path)
        report.checks.append(
            log_check(f"server ({timeout_s:g} s timeout)", report.server_log[name])
        )
        if rate <= 0:
            break


def bound(ms: float | None) -> str:
    return "10 s+" if ms is None else f"{ms:g} ms"


def summary(report: HostileReport) -> str:
    lines: list[str] = []
    odd = report.odd_images
    if odd is None:
        lines.append("odd images: skipped")
    else:
        lines.append(
            f"odd images: {odd.files} files x {len(odd.params)} query strings x "
            f"{odd.walks} walks = {odd.requests} requests in {odd.seconds} s"
        )
        first: dict[str, str] = {}
        for n, p in enumerate(odd.params):
            found = odd.by_params[p]
            counts = ", ".join(f"{s}: {c}" for s, c in found.statuses.items())
            lines.append(f"  [{p}] {counts}")
            for status, files in found.non_200.items():
                for f in files:
                    # The first query string lists every file; the others only what differs.
                    if n == 0:
                        first[f.file] = status
                        lines.append(f"    {status}  {f.file:<44} {f.detail}")
                    elif first.get(f.file) != status:
                        lines.append(f"    {status}  {f.file:<44} {f.detail}  (differs)")
        slow = ", ".join(f"{s.file} [{s.params}] {s.ms} ms" for s in odd.slowest[:3])
        lines.append(f"  slowest: {slow}")
        lines.append(
            f"  server RSS MiB before/after each walk: {odd.rss_mib} (growth "
            f"{odd.rss_growth_mib:+}, after the first walk {odd.rss_growth_after_first_walk_mib:+})"
        )
    if cap := report.capacity:
        lines.append(f"capacity (closed loop): {cap.line().strip()}")
    for name, run in report.overload.items():
        r = run.load
        lines.append(
            f"overload [{name}, server timeout {run.request_timeout_s:g} s]: target "
            f"{r.rate_target:.0f} req/s, arrivals at {r.arrival_rate:.0f} req/s, sent "
            f"{r.sent} ({r.not_sent_in_flight_cap} not: client cap), answered "
            f"{r.answered}, lost {r.lost} (client CPU {r.client_cpu_s_per_s:.2f} cores)"
        )
        lines.append(f"  statuses {r.statuses}  goodput {r.goodput_img_per_s:.1f} img/s")
        for status, q in r.latency_ms.items():
            own = run.server_duration_ms.get(status)
            mine = (
                f"server-side p50 <= {bound(own.p50_at_most)}, p99 <= {bound(own.p99_at_most)}"
                if own
                else "not in the server's histogram"
            )
            lines.append(
                f"  {status}: p50 {q.p50:.1f} ms  p99 {q.p99:.1f} ms  max {q.max:.1f} ms   ({mine})"
            )
        lines.append(
            f"  503 Retry-After: {r.retry_after_503 or 'no 503s'}; in flight at most "
            f"{r.max_in_flight_seen}; server RSS MiB {run.rss_mib_before} -> peak "
            f"{run.rss_mib_peak} -> {run.rss_mib_after}"
        )
        lines.append(
            f"  server: {run.server_cpu_cores:.2f} cores busy, at most "
            f"{run.server_sockets_peak} sockets open (accepted connections)"
        )
        lines.append(f"  outstanding each second of sending: {r.in_flight_each_second}")
        if r.lost:
            lines.append(f"  lost: {r.lost_reasons}")
        after = run.recovery
        lines.append(
            f"  afterwards: /healthz {after.healthz}, a photo {after.classify} in "
            f"{after.classify_ms} ms, queue depth {after.queue_depth}"
        )
    for name, log in report.server_log.items():
        lines.append(
            f"server log [{name}]: {log.levels}, {log.non_json_lines} lines not JSON "
            f"(native libraries, Python warnings), {log.tracebacks} tracebacks"
        )
    checks = report.checks
    lines.append(f"checks: {sum(c.passed for c in checks)}/{len(checks)} passed")
    for c in checks:
        lines.append(f"  {'PASS' if c.passed else 'FAIL'}  {c.name}: {c.detail}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repo", type=Path, default=DEMO_REPO)
    p.add_argument("--model", default=DEMO_MODEL)
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
    p.add_argument("--out", type=Path, default=RESULTS / "hostile.json")
    a = p.parse_args(argv)
    if a.odd_walks < 0:
        p.error("--odd-walks must be 0 (skip) or more")

    images = load_images()
    print(f"load with {images.source}")
    report = HostileReport(a.model, images.source, dict(vars(a)))
    started = time.perf_counter()
    asyncio.run(bench(a, images.bodies, report))
    report.seconds = round(time.perf_counter() - started, 1)
    print(summary(report))
    write_results(a.out, report)
    return 0 if all(c.passed for c in report.checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
