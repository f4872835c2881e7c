"""The engine as a front-end process sees it: `EngineClient` over the Unix socket to the engine.

`RemoteEngine` connects to the engine process (app/engine/host.py), hands it this process's
shared memory, and keeps the engine's state as last pushed (readiness and description: the
same answer in every front end). `admit` and `infer` are a round trip each; a job's patches
are written into shared memory and its outputs read back from it, and a job cancelled here
(a deadline, a client gone) is cancelled there. While the engine is away (restarting after a
crash) the replica is not ready, and every request, in flight or new, gets a 503; the client
reconnects by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import NDArray

import app.engine.wire as wire
from app.core.errors import NotReadyError
from app.engine.arena import Arena, Layout
from app.engine.batches import Output, OverloadedError, Refused
from app.engine.engine import (
    Description,
    EngineResult,
    Job,
    Permit,
    Readiness,
    ServedVersion,
)
from app.engine.table import ReloadReport
from app.models.repository import ModelNotReadyError

log = logging.getLogger(__name__)

AWAY_MESSAGE = "the engine process is not running (it is being restarted); retry"
RECONNECT_S = 0.2


class RemoteEngine:
    def __init__(self, address: str, arena_bytes: int) -> None:
        self.address = address
        self.arena = Arena.create(arena_bytes)
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._held: set[int] = set()  # permit numbers the engine now connected gave
        self._releases: list[int] = []  # to send at the end of this turn of the loop
        self._link: wire.Link | None = None
        self._readiness = Readiness(False, AWAY_MESSAGE, loaded=False)
        self._description = Description(None, (), (), None)
        self._connected = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._closing = False

    # --- the connection ------------------------------------------------------------------------

    async def start(self, timeout_s: float, stopping: Callable[[], bool] = lambda: False) -> None:
        """Connect (and keep reconnecting); wait up to `timeout_s` for the first state, or
        until `stopping()` says this process is asked to exit (then RuntimeError: a front end
        told to stop while the engine was still starting must not wait for it)."""
        self._runner = asyncio.get_running_loop().create_task(self._run(), name="engine-link")
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not self._connected.is_set() and asyncio.get_running_loop().time() < deadline:
            if stopping():
                await self.stop()
                raise RuntimeError("asked to stop before the engine process was reached")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._connected.wait(), 0.1)

    async def stop(self) -> None:
        self._closing = True
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        if self._link is not None:
            self._link.close()

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(wire.socket_address(self.address))
            hello = wire.pack({"op": "hello", "pid": os.getpid(), "size": self.arena.size})
            socket.send_fds(sock, [hello], [self.arena.fd])
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        return sock

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closing:
            try:
                sock = self._connect()
            except OSError:
                await asyncio.sleep(RECONNECT_S)
                continue
            ended: asyncio.Future[None] = loop.create_future()

            def lost(exc: BaseException | None, ended: asyncio.Future[None] = ended) -> None:
                if exc is not None:
                    log.warning("the engine connection failed: %s", exc)
                if not ended.done():
                    ended.set_result(None)

            _, link = await loop.create_unix_connection(
                lambda: wire.Link(self._received, lost), sock=sock
            )
            self._link = link
            try:
                await ended
            finally:
                self._lost(link)
            await asyncio.sleep(RECONNECT_S)

    def _lost(self, link: wire.Link) -> None:
        self._link = None
        self._held.clear()
        self._releases.clear()
        self._connected.clear()
        link.close()
        self._readiness = Readiness(False, AWAY_MESSAGE, loaded=False)
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(NotReadyError(AWAY_MESSAGE))
        if not self._closing:
            log.error("the engine process went away; requests get 503 until it is back")

    def _received(self, message: dict[str, Any]) -> None:
        op = message.get("op")
        if op in ("state", "welcome"):
            self._readiness = wire.readiness_from(message["readiness"])
            self._description = wire.description_from(message["description"])
            if op == "welcome":
                self._connected.set()
            return
        if op == "done":  # the jobs answered in one turn of the engine's loop
            for ident, waits in message["jobs"]:
                done = self._pending.pop(int(ident), None)
                if done is not None and not done.done():
                    done.set_result({"waits": waits})
            return
        future = self._pending.pop(int(message["id"]), None)
        if future is not None and not future.done():
            future.set_result(message)

    def _send(self, message: dict[str, Any]) -> None:
        if self._link is None or not self._connected.is_set():
            raise NotReadyError(AWAY_MESSAGE)
        self._link.send(message)

    async def _call(self, message: dict[str, Any]) -> dict[str, Any]:
        ident = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._send({**message, "id": ident})
        self._pending[ident] = future
        answer = await future
        if "error" in answer:
            wire.raise_error(answer["error"])
        return answer

    # --- EngineClient ----------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return False  # the engine decides, at admission

    def _served(self, name: str, version: int) -> ServedVersion:
        model = self._description.model(name)
        found = (
            None
            if model is None
            else next((v for v in model.versions if v.version == version), None)
        )
        if model is None or found is None:  # pushed before any answer about it: a reload's race
            raise ModelNotReadyError(f"model '{name}' version {version} is not served; retry")
        return ServedVersion(
            name, version, found.spec, found.rollout, model.max_tokens, found.decode == "gpu"
        )

    async def admit(self, model: str | None, version: int | None) -> Permit:
        answer = await self._call({"op": "admit", "model": model, "version": version})
        served = self._served(answer["name"], int(answer["version"]))
        number = int(answer["permit"])
        self._held.add(number)
        return Permit(number, served, self._release)

    def _release(self, permit: Permit) -> None:
        if permit.number not in self._held:
            return  # a place of an engine since restarted: the new one holds none of ours
        self._held.discard(permit.number)
        # The places freed in one turn of the loop go back in one message (a batch's answers
        # arrive together, and so do the requests they finish).
        if not self._releases:
            asyncio.get_running_loop().call_soon(self._send_releases)
        self._releases.append(permit.number)

    def _send_releases(self) -> None:
        permits, self._releases = self._releases, []
        with contextlib.suppress(NotReadyError):
            self._send({"op": "release", "permits": permits})

    async def lookup(self, model: str | None, version: int | None) -> ServedVersion:
        answer = await self._call({"op": "lookup", "model": model, "version": version})
        return self._served(answer["name"], int(answer["version"]))

    async def infer(self, permit: Permit, job: Job) -> EngineResult:
        served = permit.served
        arch = served.spec.architecture
        layout = Layout(
            grids=tuple((int(p.shape[0]), int(p.shape[1])) for p in job.patches),
            patch_dim=arch.patch_dim,
            classes=arch.num_classes,
            rollout=job.rollout is not None,
            encoded=tuple(len(e.data) for e in job.encoded),
        )
        block = self.arena.alloc(layout.size)
        if block is None:
            raise OverloadedError("the server is overloaded (shared memory full); retry shortly")
        freed = False

        def free() -> None:
            nonlocal freed
            if not freed:
                freed = True
                self.arena.free(block, layout.size)

        ident = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        try:
            for view, patches in zip(self.arena.patches(block, layout), job.patches, strict=True):
                view[...] = patches
            for target, image in zip(self.arena.encoded(block, layout), job.encoded, strict=True):
                target[:] = image.data  # the upload's bytes, as they came
            encoded = {}
            if job.encoded:
                encoded = {
                    "encoded": [wire.encoded_of(e) for e in job.encoded],
                    "encoded_bytes": list(layout.encoded),
                }
            self._send(
                {
                    **encoded,
                    "op": "infer",
                    "id": ident,
                    "permit": permit.number,
                    "block": block,
                    "grids": [list(g) for g in layout.grids],
                    "patch_dim": layout.patch_dim,
                    "classes": layout.classes,
                    "rollout": wire.rollout_of(job.rollout),
                    "deadline": job.deadline,
                }
            )
            self._pending[ident] = future
        except BaseException:
            free()
            raise
        try:
            answer = await future
        except asyncio.CancelledError:
            # The engine may be reading the patches now: the block is freed once it answers
            # (or the link is lost), through a stand-in for the future just cancelled.
            if ident in self._pending:
                late: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
                late.add_done_callback(lambda _: free())
                self._pending[ident] = late
            else:
                free()
            with contextlib.suppress(NotReadyError):
                self._send({"op": "cancel", "job": ident})
            raise
        except BaseException:
            free()
            raise
        try:
            if "error" in answer:
                wire.raise_error(answer["error"])
            logits = np.array(self.arena.logits(block, layout))
            probs = np.array(self.arena.probs(block, layout))
            maps = (
                [np.array(m) for m in self.arena.rollouts(block, layout)] if layout.rollout else []
            )
        finally:
            free()
        waits = answer["waits"]
        outputs = [
            Output(logits[i], probs[i], maps[i] if layout.rollout else None, float(waits[i]))
            for i in range(len(layout.grids))
        ]
        refused = {int(i): str(reason) for i, reason in answer.get("refused", ())}
        decoded: list[Output | Refused] = [
            Refused(refused[i]) if i in refused else Output(logits[i], probs[i], None, waits[i])
            for i in range(len(layout.grids), layout.images)
        ]
        return EngineResult(served.name, served.version, served.spec, outputs, decoded)

    def readiness(self) -> Readiness:
        return self._readiness

    def describe(self) -> Description:
        return self._description

    async def reload(self) -> ReloadReport:
        answer = await self._call({"op": "reload"})
        return wire.report_from(answer["report"])

    async def introspect(self, model: str, version: int | None, grid: str | None) -> dict[str, Any]:
        answer = await self._call(
            {"op": "introspect", "model": model, "version": version, "grid": grid}
        )
        result: dict[str, Any] = answer["result"]
        return result

    async def attention_distance(
        self, permit: Permit, patches: NDArray[np.uint8], image_size: tuple[int, int]
    ) -> dict[str, Any]:
        # One image, occasionally: inline, not through the shared memory.
        answer = await self._call(
            {
                "op": "attention",
                "permit": permit.number,
                "patches": np.ascontiguousarray(patches).tobytes(),
                "shape": list(patches.shape),
                "image_size": list(image_size),
            }
        )
        result: dict[str, Any] = answer["result"]
        return result

    async def stats(self) -> tuple[int, int]:
        """(images queued, the queue's capacity) now."""
        answer = await self._call({"op": "stats"})
        return int(answer["queued"]), int(answer["capacity"])
