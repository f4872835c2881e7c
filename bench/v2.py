"""The Open Inference Protocol's front doors beside /classify, side by side on one server.

    .venv/bin/python -m bench.v2                                   # the demo model
    .venv/bin/python -m bench.export_tiny     # ViT-Ti/16 at 224, then:
    .venv/bin/python -m bench.v2 --repo build/bench_repo --model vit-ti16

One `python -m app.server` serves all four doors (HTTP and, on VIT_SERVE_GRPC_PORT, gRPC); one
image per request, closed loop at each concurrency, in rounds whose order rotates so that a
noisy minute on a shared machine falls on every door (figures: medians over the rounds):

- grpc-patches: gRPC ModelInfer with UINT8 patches [1, gh, gw, P*P*C] that the client made
  beforehand (the training preprocessing, as the server's `crop`): no decoding on the server;
- grpc-bytes: gRPC ModelInfer with the encoded image, BYTES [1];
- v2-binary: POST /v2/models/<model>/infer, the image as BYTES in the binary data extension;
- classify: POST /classify, multipart/form-data.

The V2 doors ask for `probabilities` (binary); /classify answers its top 5 as JSON. Clients are
lean (pre-serialised requests; gRPC through one channel without protobuf on the client side),
as they share the machine's cores with the server. Reported: img/s, p50, p99, the server's CPU
time per image and its event loop's (the main thread, where HTTP, gRPC and the batcher's
scheduling run). Writes bench/results/v2_<model>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import struct
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from app.grpc.proto import grpc_service_pb2 as pb
from app.pipeline.preprocess import prepare
from bench.harness import (
    DEMO_MODEL,
    DEMO_REPO,
    HOST,
    RESULTS,
    Connection,
    LoadResult,
    find_model,
    free_port,
    load_images,
    measured_load,
    median_of,
    service,
    write_results,
)

CONCURRENCY = (1, 16, 64)
DOORS = ("grpc-patches", "grpc-bytes", "v2-binary", "classify")
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"

Call = Callable[[int], Awaitable[bool]]  # send request `i`, True when answered OK


@dataclass
class Report:
    model: str
    repo: Path
    images: str
    concurrency: list[int]
    rounds: int
    doors: dict[str, str]
    results: dict[str, list[LoadResult]]


def _bytes_tensor(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data


def grpc_requests(
    model: str, images: Sequence[bytes], patches: Sequence[np.ndarray]
) -> dict[str, list[bytes]]:
    """Serialised ModelInferRequests: once with the patches, once with the encoded images."""

    def request(name: str, datatype: str, shape: list[int], raw: bytes) -> bytes:
        message = pb.ModelInferRequest(model_name=model, raw_input_contents=[raw])
        message.inputs.add(name=name, datatype=datatype, shape=shape)
        message.outputs.add(name="probabilities")
        return message.SerializeToString()

    return {
        "grpc-patches": [request("patches", "UINT8", [1, *p.shape], p.tobytes()) for p in patches],
        "grpc-bytes": [request("image", "BYTES", [1], _bytes_tensor(b)) for b in images],
    }


def http_requests(model: str, images: Sequence[bytes]) -> dict[str, list[bytes]]:
    """Whole HTTP/1.1 requests, head and body, for the two HTTP doors."""

    def v2(image: bytes) -> bytes:
        header = (
            '{"inputs":[{"name":"image","shape":[1],"datatype":"BYTES","parameters":'
            f'{{"binary_data_size":{len(image) + 4}}}}}],'
            '"outputs":[{"name":"probabilities","parameters":{"binary_data":true}}]}'
        ).encode()
        body = header + _bytes_tensor(image)
        head = (
            f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: {HOST}\r\n"
            "Content-Type: application/octet-stream\r\n"
            f"Inference-Header-Content-Length: {len(header)}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body

    def classify(image: bytes) -> bytes:
        boundary = uuid.uuid4().hex
        body = (
            (
                f"--{boundary}\r\n"
                'Content-Disposition: form-data; name="image"; filename="a.jpg"\r\n'
                "Content-Type: image/jpeg\r\n\r\n"
            ).encode()
            + image
            + f"\r\n--{boundary}--\r\n".encode()
        )
        head = (
            f"POST /classify?model={model}&top_k=5 HTTP/1.1\r\nHost: {HOST}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body

    return {"v2-binary": [v2(b) for b in images], "classify": [classify(b) for b in images]}


@contextlib.asynccontextmanager
async def grpc_door(port: int, requests: list[bytes]) -> Any:
    channel = grpc.aio.insecure_channel(
        f"{HOST}:{port}", options=[("grpc.max_receive_message_length", -1)]
    )
    # No serialisers: the requests are bytes already, and the answers are not parsed.
    infer = channel.unary_unary(MODEL_INFER, None, None)

    async def session() -> Any:
        async def call(i: int) -> bool:
            try:
                await infer(requests[i % len(requests)], timeout=120)
            except grpc.aio.AioRpcError:
                return False
            return True

        return call, None

    try:
        yield session
    finally:
        await channel.close(None)


@contextlib.asynccontextmanager
async def http_door(port: int, requests: list[bytes]) -> Any:
    async def session() -> Any:
        conn = await Connection.open(port)

        async def call(i: int) -> bool:
            conn.writer.write(requests[i % len(requests)])
            await conn.writer.drain()
            reply = await conn.receive()
            return reply.status == 200

        return call, conn

    yield session


async def closed_loop(
    name: str, session: Any, concurrency: int, requests: int, max_seconds: float, pid: int
) -> LoadResult:
    """`requests` calls (or as many as fit in `max_seconds`) from `concurrency` workers, each
    sending its next when answered; the server's CPU and its main thread's around it."""
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    errors = sent = 0
    stop_at = time.monotonic() + max_seconds

    async def worker() -> None:
        nonlocal sent, errors
        call, conn = await session()
        try:
            while sent < requests and time.monotonic() < stop_at:
                i = sent
                sent += 1
                t0 = time.perf_counter()
                ok = await call(i)
                latencies.append(time.perf_counter() - t0)
                statuses["ok" if ok else "error"] += 1
                errors += not ok
        finally:
            if conn is not None:
                await conn.close()

    return await measured_load(
        name,
        concurrency,
        [worker() for _ in range(concurrency)],
        pid,
        latencies,
        statuses,
        lambda: (sent, errors, 0),
    )


async def run(
    http_port: int,
    grpc_port: int,
    pid: int,
    requests_by_door: dict[str, list[bytes]],
    concurrency: Sequence[int],
    requests: int,
    max_seconds: float,
    rounds: int,
) -> dict[str, list[LoadResult]]:
    results: dict[str, list[LoadResult]] = {door: [] for door in DOORS}
    async with contextlib.AsyncExitStack() as stack:
        sessions = {}
        for door in DOORS:
            make = (
                grpc_door(grpc_port, requests_by_door[door])
                if door.startswith("grpc")
                else (http_door(http_port, requests_by_door[door]))
            )
            sessions[door] = await stack.enter_async_context(make)
        for c in concurrency:
            for door in DOORS:  # warm-up at this concurrency
                await closed_loop(door, sessions[door], c, max(2 * c, 20), 10, pid)
            done: dict[str, list[LoadResult]] = {door: [] for door in DOORS}
            per_round = max(1, math.ceil(requests / rounds))
            for r in range(rounds):
                for door in DOORS[r % len(DOORS) :] + DOORS[: r % len(DOORS)]:
                    done[door].append(
                        await closed_loop(
                            door, sessions[door], c, per_round, max_seconds / rounds, pid
                        )
                    )
            for door in DOORS:
                result = median_of(done[door])
                print(result.line())
                results[door].append(result)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repo", type=Path, default=DEMO_REPO)
    parser.add_argument("--model", default=DEMO_MODEL)
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY))
    parser.add_argument("--requests", type=int, default=1500, help="per door and level")
    parser.add_argument("--max-seconds", type=float, default=24.0, help="per door and level")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, help="default: bench/results/v2_<model>.json")
    args = parser.parse_args(argv)

    model = find_model(args.repo, args.model)
    images = load_images(20)
    patches = [
        prepare(
            body,
            model.spec,
            "crop",
            name="bench",
            max_pixels=40_000_000,
            fit_max_tokens=2 * model.spec.architecture.native_tokens,
        ).patches
        for body in images.bodies
    ]
    requests = {
        **grpc_requests(args.model, images.bodies, patches),
        **http_requests(args.model, images.bodies),
    }
    grpc_port = free_port()
    env = {"VIT_SERVE_GRPC_PORT": str(grpc_port)}
    load_before = os.getloadavg()
    with service(args.repo, args.model, env=env) as server:
        results = asyncio.run(
            run(
                server.port,
                grpc_port,
                server.pid,
                requests,
                args.concurrency,
                args.requests,
                args.max_seconds,
                args.rounds,
            )
        )
    report = Report(
        model=args.model,
        repo=args.repo,
        images=images.source,
        concurrency=list(args.concurrency),
        rounds=args.rounds,
        doors={
            "grpc-patches": "gRPC ModelInfer, UINT8 patches made by the client (crop)",
            "grpc-bytes": "gRPC ModelInfer, the encoded image as BYTES",
            "v2-binary": "REST /v2 infer, the image as BYTES in the binary data extension",
            "classify": "POST /classify, multipart/form-data, top_k=5",
        },
        results=results,
    )
    # The machine's load beside the run: on a shared machine, other work takes cores from the
    # server and the client alike (CPU time per image moves less than img/s and latency).
    notes = {"loadavg_1_5_15_before": load_before, "loadavg_1_5_15_after": os.getloadavg()}
    write_results(args.out or RESULTS / f"v2_{args.model}.json", report, notes)


if __name__ == "__main__":
    main()
