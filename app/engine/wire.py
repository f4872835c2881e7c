"""The engine's messages across a process boundary: framing, and what each plain value becomes.

A message is a msgpack map, back to back with the others on a Unix stream socket between one
front-end process and the engine process (`Link`: msgpack frames itself). Tensors never travel
here: they are written into the front end's shared memory (app/engine/arena.py) and named by
offset and shape. What does travel: admissions, a job's grids, deadline and rollout
parameters, errors (by class name and message, raised again on the other side as the same
class), reload reports, and the engine's state (readiness and description), pushed to every
front end whenever it changes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, cast

import msgpack

from app.core.errors import ServiceError, service_errors
from app.engine.engine import (
    Description,
    ModelDescription,
    Readiness,
    VersionDescription,
)
from app.engine.table import ReloadReport
from app.models.repository import Unavailable
from app.models.spec import ModelSpec, RolloutParams
from app.runtime.devicedecode import EncodedImage
from app.runtime.providers import Placement

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # a description with many large label lists fits


def socket_address(address: str) -> str:
    """ "@name" is Linux's abstract namespace (nothing on the filesystem), written as the
    command lines can carry it; anything else is a path."""
    return "\0" + address[1:] if address.startswith("@") else address


class ProtocolError(RuntimeError):
    """The other side sent something that is not a message of this protocol."""


def pack(message: dict[str, Any]) -> bytes:
    body: bytes = msgpack.packb(message, use_bin_type=True)
    return body


def unpack(body: bytes) -> dict[str, Any]:
    """One whole message (the hello, which comes alone with the shared memory's descriptor)."""
    try:
        message = msgpack.unpackb(body, raw=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise ProtocolError(f"not a message: {exc}") from exc
    if not isinstance(message, dict):
        raise ProtocolError("a message is a map")
    return message


class Link(asyncio.Protocol):
    """One end of a front end's connection to the engine.

    msgpack frames itself, so the stream is the messages back to back: each read hands every
    whole message in it to `received`, in order, with no wait between them. What is sent in one
    turn of the event loop leaves in one write at the start of the next: a batch's answers, or
    a front end's admissions, releases and jobs, cost one system call, not one each.
    """

    def __init__(
        self,
        received: Callable[[dict[str, Any]], None],
        lost: Callable[[BaseException | None], None],
    ) -> None:
        self._received = received
        self._lost = lost
        self._unpacker = msgpack.Unpacker(raw=False, max_buffer_size=MAX_MESSAGE_BYTES)
        self._transport: asyncio.Transport | None = None
        self._out: list[bytes] = []
        self._flushing = False

    @property
    def open(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            self._unpacker.feed(data)
            for message in self._unpacker:
                if not isinstance(message, dict):
                    raise ProtocolError("a message is a map")
                self._received(message)
        except (ProtocolError, ValueError, msgpack.UnpackException) as exc:
            # ValueError: msgpack's BufferFull and ExtraData, and bad data, derive from it.
            self.abort(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._out.clear()
        self._lost(exc)

    def send(self, message: dict[str, Any]) -> None:
        if not self.open:
            return
        self._out.append(pack(message))
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flushing = False
        out, self._out = self._out, []
        if out and self._transport is not None and not self._transport.is_closing():
            self._transport.write(out[0] if len(out) == 1 else b"".join(out))

    def close(self) -> None:
        """Send what is pending, then close."""
        self._flush()
        if self._transport is not None:
            self._transport.close()

    def abort(self, exc: BaseException) -> None:
        """The other side broke the protocol: drop the connection (`lost` is told why)."""
        log.warning("engine link: %s", exc)
        if self._transport is not None:
            self._transport.abort()


# --- errors ------------------------------------------------------------------------------------


def error_of(exc: BaseException) -> dict[str, str]:
    if isinstance(exc, ServiceError):
        return {"type": type(exc).__name__, "message": exc.message}
    return {"type": "", "message": f"{type(exc).__name__} in the engine; it is logged there"}


def raise_error(error: dict[str, str]) -> None:
    """The engine's error raised again here, as its own class where it is one of the service's
    (so every door maps it to the same status); RuntimeError (a 500) otherwise."""
    cls = service_errors().get(error.get("type", ""))
    if cls is None:
        raise RuntimeError(error.get("message", "the engine failed"))
    raise cls(error.get("message", ""))


# --- values --------------------------------------------------------------------------------------


def rollout_of(params: RolloutParams | None) -> list[Any] | None:
    return None if params is None else [params.head_fusion, params.discard_ratio]


def rollout_from(value: list[Any] | None) -> RolloutParams | None:
    return None if value is None else RolloutParams(value[0], float(value[1]))


def readiness_of(readiness: Readiness) -> dict[str, Any]:
    return {"ready": readiness.ready, "reason": readiness.reason, "loaded": readiness.loaded}


def readiness_from(value: dict[str, Any]) -> Readiness:
    return Readiness(bool(value["ready"]), value["reason"], bool(value["loaded"]))


def _placement_of(placement: Placement) -> dict[str, Any]:
    return {
        "provider": placement.provider,
        "nodes": [list(n) for n in placement.nodes],
        "compute": [list(n) for n in placement.compute],
        "wanted": placement.wanted,
        "fallback": placement.fallback,
    }


def _placement_from(value: dict[str, Any]) -> Placement:
    return Placement(
        value["provider"],
        tuple((p, int(n)) for p, n in value["nodes"]),
        tuple((p, int(n)) for p, n in value["compute"]),
        value["wanted"],
        value["fallback"],
    )


def _unavailable_of(u: Unavailable) -> list[Any]:
    return [u.model, u.version, u.reason]


def _unavailable_from(value: list[Any]) -> Unavailable:
    return Unavailable(value[0], value[1], value[2])


def description_of(description: Description) -> dict[str, Any]:
    return {
        "default_model": description.default_model,
        "replica_not_ready": description.replica_not_ready,
        "decoder": description.decoder,
        "not_ready": [_unavailable_of(u) for u in description.not_ready],
        "models": [
            {
                "name": m.name,
                "default_version": m.default_version,
                "max_tokens": m.max_tokens,
                "versions": [
                    {
                        "version": v.version,
                        "spec": v.spec.model_dump(mode="json"),
                        "placement": _placement_of(v.placement),
                        "rollout": v.rollout,
                        "form": v.form,
                        "decode": v.decode,
                    }
                    for v in m.versions
                ],
            }
            for m in description.models
        ],
    }


def description_from(value: dict[str, Any]) -> Description:
    return Description(
        default_model=value["default_model"],
        models=tuple(
            ModelDescription(
                name=m["name"],
                default_version=m["default_version"],
                versions=tuple(
                    VersionDescription(
                        version=v["version"],
                        spec=ModelSpec.model_validate(v["spec"]),
                        placement=_placement_from(v["placement"]),
                        rollout=v["rollout"],
                        form=v["form"],
                        decode=v["decode"],
                    )
                    for v in m["versions"]
                ),
                max_tokens=m["max_tokens"],
            )
            for m in value["models"]
        ),
        not_ready=tuple(_unavailable_from(u) for u in value["not_ready"]),
        replica_not_ready=value["replica_not_ready"],
        decoder=value["decoder"],
    )


def report_of(report: ReloadReport) -> dict[str, Any]:
    return {
        "loaded": report.loaded,
        "unloaded": report.unloaded,
        "unchanged": report.unchanged,
        "failed": [_unavailable_of(u) for u in report.failed],
    }


def report_from(value: dict[str, Any]) -> ReloadReport:
    return ReloadReport(
        loaded=list(value["loaded"]),
        unloaded=list(value["unloaded"]),
        unchanged=list(value["unchanged"]),
        failed=[_unavailable_from(u) for u in value["failed"]],
    )


def encoded_of(image: EncodedImage) -> list[Any]:
    """An encoded image's plan (its bytes travel in shared memory)."""
    return [
        image.name,
        image.orientation,
        list(image.image_size),
        list(image.size),
        None if image.box is None else list(image.box),
        list(image.grid),
        image.patch_size,
        image.interpolation,
    ]


def encoded_from(value: list[Any], data: bytes) -> EncodedImage:
    name, orientation, image_size, size, box, grid, patch_size, interpolation = value
    return EncodedImage(
        data=data,
        name=name,
        orientation=int(orientation),
        image_size=(int(image_size[0]), int(image_size[1])),
        size=(int(size[0]), int(size[1])),
        box=None if box is None else (int(box[0]), int(box[1]), int(box[2]), int(box[3])),
        grid=(int(grid[0]), int(grid[1])),
        patch_size=int(patch_size),
        interpolation=interpolation,
    )
