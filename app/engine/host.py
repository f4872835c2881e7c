"""The engine process's side of the boundary: the engine, served to front-end processes.

Each front end connects over a Unix socket (an abstract address: nothing on the filesystem),
hands over its shared memory (app/engine/arena.py) with its first message, and then sends
admissions, jobs, cancellations and releases (app/engine/wire.py). The host answers each one,
and pushes the engine's state (readiness, description) to every front end when it changes. A
front end that goes away has its jobs cancelled and its permits released at once: its request
places come back, and its shared memory goes with the last mapping.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import app.engine.wire as wire
from app.core.errors import ServiceError
from app.engine.arena import Arena, Layout
from app.engine.batches import Output, Refused
from app.engine.engine import Engine, Job, Permit

log = logging.getLogger(__name__)

HELLO_BYTES = 64 * 1024


@dataclass(eq=False)
class _FrontEnd:
    number: int
    pid: int
    arena: Arena
    link: wire.Link
    permits: dict[int, Permit] = field(default_factory=dict)
    # By job id: each image's future, or the one task of a job with encoded images.
    jobs: dict[int, list[asyncio.Future[Any]]] = field(default_factory=dict)

    answered: list[list[Any]] = field(default_factory=list)  # [job id, waits], this turn

    def send(self, message: dict[str, Any]) -> None:
        self.link.send(message)

    def answer(self, ident: int, waits: list[float]) -> None:
        """A job done: its answer goes with the others done in this turn of the loop, in one
        message (a batch's jobs end together)."""
        if not self.answered:
            asyncio.get_running_loop().call_soon(self._send_answers)
        self.answered.append([ident, waits])

    def _send_answers(self) -> None:
        jobs, self.answered = self.answered, []
        self.link.send({"op": "done", "jobs": jobs})


def _refuse(front: _FrontEnd, ident: Any, exc: BaseException, what: str) -> None:
    """A failed operation's answer: its error, raised again as its own class on the other
    side; logged here unless it is one of the service's (a 4xx or 503 that says why)."""
    if not isinstance(exc, ServiceError):
        log.error("%s failed in the engine", what, exc_info=exc)
    front.send({"id": ident, "error": wire.error_of(exc)})


def _write_back(
    arena: Arena, block: int, layout: Layout, outcomes: Sequence[Output | Refused]
) -> tuple[list[float], list[list[Any]]]:
    """A job's outputs into its block, row by row; each row's queue wait (0 where refused),
    and the refused rows with their reasons."""
    logits = arena.logits(block, layout)
    probs = arena.probs(block, layout)
    maps = arena.rollouts(block, layout) if layout.rollout else []
    waits = [0.0] * len(outcomes)
    refused: list[list[Any]] = []
    for i, outcome in enumerate(outcomes):
        if isinstance(outcome, Refused):
            refused.append([i, outcome.reason])
            continue
        logits[i] = outcome.logits
        probs[i] = outcome.probs
        if layout.rollout and outcome.rollout is not None:
            maps[i][...] = outcome.rollout
        waits[i] = outcome.queued_s
    return waits, refused


def _receive_hello(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """The first message and the descriptors that came with it (blocking; in a thread)."""
    conn.setblocking(True)
    conn.settimeout(10.0)
    data, fds, _, _ = socket.recv_fds(conn, HELLO_BYTES, 4)
    if not data:
        raise wire.ProtocolError("no hello")
    message = wire.unpack(data)
    if message.get("op") != "hello":
        raise wire.ProtocolError("the first message is not a hello")
    return message, fds


class EngineHost:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._front_ends: dict[int, _FrontEnd] = {}
        self._numbers = itertools.count(1)
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        engine.table.on_change = self.changed

    async def start(self, address: str) -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(wire.socket_address(address))
        listener.listen(64)
        listener.setblocking(False)
        self._listener = listener
        self._accepting = asyncio.get_running_loop().create_task(self._accept(), name="accept")

    async def stop(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
        if self._listener is not None:
            self._listener.close()
        for front in list(self._front_ends.values()):
            front.link.close()

    def state(self) -> dict[str, Any]:
        return {
            "op": "state",
            "readiness": wire.readiness_of(self.engine.readiness()),
            "description": wire.description_of(self.engine.describe()),
        }

    def changed(self) -> None:
        """What is served changed (a reload, a broken version, the engine started): tell every
        front end, before any answer that depends on it."""
        state = self.state()
        for front in self._front_ends.values():
            front.send(state)

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._listener is not None
        while True:
            conn, _ = await loop.sock_accept(self._listener)
            task = loop.create_task(self._serve(conn), name="front-end")
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)

    async def _serve(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            hello, fds = await loop.run_in_executor(None, _receive_hello, conn)
        except (OSError, wire.ProtocolError, ValueError) as exc:
            log.warning("a front end's hello failed: %s", exc)
            conn.close()
            return
        if len(fds) != 1:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            conn.close()
            return
        conn.setblocking(False)
        arena = Arena.attach(fds[0], int(hello["size"]))
        ended: asyncio.Future[None] = loop.create_future()
        front: _FrontEnd | None = None

        def received(message: dict[str, Any]) -> None:
            assert front is not None
            try:
                self._dispatch(front, message)
            except wire.ProtocolError as exc:
                front.link.abort(exc)

        def lost(exc: BaseException | None) -> None:
            if exc is not None:
                log.warning("front end %d: %s", front.number if front else 0, exc)
            if not ended.done():
                ended.set_result(None)

        _, link = await loop.connect_accepted_socket(lambda: wire.Link(received, lost), sock=conn)
        front = _FrontEnd(next(self._numbers), int(hello["pid"]), arena, link)
        self._front_ends[front.number] = front
        log.info("front end %d (pid %d) connected", front.number, front.pid)
        front.send({**self.state(), "op": "welcome"})
        try:
            await ended
        finally:
            self._gone(front)

    def _gone(self, front: _FrontEnd) -> None:
        """A front end went away: its jobs are cancelled and its places come back."""
        self._front_ends.pop(front.number, None)
        for job in list(front.jobs.values()):
            for future in job:
                future.cancel()
        for permit in front.permits.values():
            permit.release()
        front.permits.clear()
        front.link.close()
        log.info("front end %d (pid %d) disconnected", front.number, front.pid)

    def _dispatch(self, front: _FrontEnd, message: dict[str, Any]) -> None:
        op = message.get("op")
        ident = message.get("id")
        try:
            if op == "admit":
                permit = self.engine.admit_now(message["model"], message["version"])
                front.permits[permit.number] = permit
                served = permit.served
                front.send(
                    {
                        "id": ident,
                        "permit": permit.number,
                        "name": served.name,
                        "version": served.version,
                    }
                )
            elif op == "release":
                for number in message["permits"]:
                    held = front.permits.pop(int(number), None)
                    if held is not None:
                        held.release()
            elif op == "infer":
                self._infer(front, message)
            elif op == "cancel":
                for future in front.jobs.get(int(message["job"]), ()):
                    future.cancel()
            elif op == "lookup":
                served = self.engine.lookup_now(message["model"], message["version"])
                front.send({"id": ident, "name": served.name, "version": served.version})
            elif op == "reload":
                asyncio.get_running_loop().create_task(self._reload(front, ident))
            elif op in ("introspect", "attention"):
                asyncio.get_running_loop().create_task(self._introspect(front, message))
            elif op == "stats":
                front.send(
                    {
                        "id": ident,
                        "queued": self.engine.queued,
                        "capacity": self.engine.queue_capacity,
                    }
                )
            else:
                raise wire.ProtocolError(f"unknown operation {op!r}")
        except wire.ProtocolError:
            raise
        except Exception as exc:
            _refuse(front, ident, exc, f"operation {op!r}")

    def _infer(self, front: _FrontEnd, message: dict[str, Any]) -> None:
        ident = int(message["id"])
        try:
            permit = front.permits.get(int(message["permit"]))
            if permit is None:
                raise RuntimeError("a job under a permit this front end does not hold")
            sizes = message.get("encoded_bytes")
            layout = Layout(
                grids=tuple((int(h), int(w)) for h, w in message["grids"]),
                patch_dim=int(message["patch_dim"]),
                classes=int(message["classes"]),
                rollout=message["rollout"] is not None,
                encoded=tuple(int(n) for n in sizes) if sizes else (),
            )
            block = int(message["block"])
            encoded = []
            if sizes:
                # The encoded images' bytes are copied out of the block: the decoder may hold
                # them past a cancellation, when the front end frees the block.
                views = front.arena.encoded(block, layout)
                encoded = [
                    wire.encoded_from(plan, bytes(data))
                    for plan, data in zip(message["encoded"], views, strict=True)
                ]
            job = Job(
                front.arena.patches(block, layout),
                wire.rollout_from(message["rollout"]),
                float(message["deadline"]),
                encoded,
            )
            if encoded:  # the device decoder's path: its refusals come back per image
                task = asyncio.get_running_loop().create_task(
                    self._infer_encoded(front, ident, block, layout, permit, job)
                )
                front.jobs[ident] = [task]
                return
            futures = self.engine.submit(permit, job)
        except Exception as exc:
            _refuse(front, ident, exc, "a job")
            return
        front.jobs[ident] = futures
        waiting = len(futures)

        def done(_: asyncio.Future[Output]) -> None:
            nonlocal waiting
            waiting -= 1
            if waiting == 0:
                self._answer(front, ident, block, layout, futures)

        for future in futures:
            future.add_done_callback(done)

    def _answer(
        self,
        front: _FrontEnd,
        ident: int,
        block: int,
        layout: Layout,
        futures: list[asyncio.Future[Output]],
    ) -> None:
        """Every image of a job is answered: its outputs into the block, or the first image's
        error (in the images' order, as in one process)."""
        front.jobs.pop(ident, None)
        for future in futures:
            if future.cancelled():
                front.send({"id": ident, "error": {"type": "", "message": "cancelled"}})
                return
            exc = future.exception()
            if exc is not None:
                _refuse(front, ident, exc, "a job")
                return
        try:
            waits, _ = _write_back(front.arena, block, layout, [f.result() for f in futures])
        except Exception as exc:
            _refuse(front, ident, exc, "writing a job's outputs back")
            return
        front.answer(ident, waits)

    async def _infer_encoded(
        self, front: _FrontEnd, ident: int, block: int, layout: Layout, permit: Permit, job: Job
    ) -> None:
        try:
            result = await self.engine.infer(permit, job)
            outcomes = [*result.outputs, *result.decoded]  # the block's rows: patches first
            waits, refused = _write_back(front.arena, block, layout, outcomes)
            front.send({"id": ident, "waits": waits, "refused": refused})
        except asyncio.CancelledError:
            front.send({"id": ident, "error": {"type": "", "message": "cancelled"}})
        except Exception as exc:
            _refuse(front, ident, exc, "a job")
        finally:
            front.jobs.pop(ident, None)

    async def _introspect(self, front: _FrontEnd, message: dict[str, Any]) -> None:
        ident = message["id"]
        try:
            if message["op"] == "introspect":
                result = await self.engine.introspect(
                    message["model"], message["version"], message["grid"]
                )
            else:
                permit = front.permits.get(int(message["permit"]))
                if permit is None:
                    raise RuntimeError("an image under a permit this front end does not hold")
                patches = np.frombuffer(message["patches"], np.uint8).reshape(message["shape"])
                size = (int(message["image_size"][0]), int(message["image_size"][1]))
                result = await self.engine.attention_distance(permit, patches, size)
        except Exception as exc:
            _refuse(front, ident, exc, "introspection")
            return
        front.send({"id": ident, "result": result})

    async def _reload(self, front: _FrontEnd, ident: Any) -> None:
        try:
            report = await self.engine.reload()
        except Exception as exc:
            _refuse(front, ident, exc, "a reload")
            return
        front.send({"id": ident, "report": wire.report_of(report)})
