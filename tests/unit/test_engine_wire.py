"""What crosses the engine's process boundary: shared-memory blocks and the messages' values."""

from __future__ import annotations

import asyncio
import os

import msgpack
import numpy as np
import pytest

from app.engine import Description, ModelDescription, Readiness, VersionDescription
from app.engine import wire as wire
from app.engine.arena import PAGE, Arena, Layout
from app.engine.batches import OverloadedError
from app.models.repository import ModelNotReadyError, Unavailable, UnknownModelError
from app.models.spec import RolloutParams
from app.runtime.providers import CPU, TENSORRT, Placement
from tests.support import make_spec


def test_blocks_are_allocated_first_fit_and_merged_when_freed() -> None:
    arena = Arena.create(16 * PAGE)
    blocks = [arena.alloc(1), arena.alloc(PAGE + 1), arena.alloc(3 * PAGE)]
    assert blocks == [0, PAGE, 3 * PAGE]
    a, b, c = (x for x in blocks if x is not None)
    assert arena.alloc(11 * PAGE) is None  # 10 pages left
    arena.free(b, PAGE + 1)
    assert arena.alloc(2 * PAGE) == PAGE  # the hole, first fit
    arena.free(PAGE, 2 * PAGE)
    arena.free(a, 1)
    arena.free(c, 3 * PAGE)
    assert arena.used == 0
    assert arena.alloc(16 * PAGE) == 0  # all merged back into one block


def test_the_other_side_reads_and_writes_the_same_block() -> None:
    owner = Arena.create(1 << 20)
    engine = Arena.attach(os.dup(owner.fd), owner.size)  # as after SCM_RIGHTS
    layout = Layout(grids=((2, 3), (4, 4)), patch_dim=12, classes=5, rollout=True)
    block = owner.alloc(layout.size)
    assert block is not None
    rng = np.random.default_rng(0)
    sent = [rng.integers(0, 256, (gh, gw, 12), dtype=np.uint8) for gh, gw in layout.grids]
    for view, patches in zip(owner.patches(block, layout), sent, strict=True):
        view[...] = patches
    for got, patches in zip(engine.patches(block, layout), sent, strict=True):
        np.testing.assert_array_equal(got, patches)
    engine.logits(block, layout)[...] = np.arange(10, dtype=np.float32).reshape(2, 5)
    engine.probs(block, layout)[...] = 0.2
    engine.rollouts(block, layout)[1][...] = 7.0
    np.testing.assert_array_equal(owner.logits(block, layout)[1], [5, 6, 7, 8, 9])
    assert (owner.probs(block, layout) == 0.2).all()
    assert owner.rollouts(block, layout)[1].shape == (4, 4)
    assert (owner.rollouts(block, layout)[1] == 7.0).all()
    # The regions do not overlap: the patches are intact after the outputs were written.
    np.testing.assert_array_equal(owner.patches(block, layout)[1], sent[1])


@pytest.mark.parametrize(
    "error",
    [
        UnknownModelError("model 'x' is not in the model repository"),
        ModelNotReadyError("model 'y' is not ready: broken"),
        OverloadedError("the server is overloaded (inference queue full at 4 images)"),
    ],
)
def test_an_error_is_raised_again_as_its_own_class(error: Exception) -> None:
    with pytest.raises(type(error)) as raised:
        wire.raise_error(wire.error_of(error))
    assert raised.value.args == error.args


def test_an_unexpected_error_is_a_runtime_error_with_no_detail_leaked() -> None:
    with pytest.raises(RuntimeError, match="KeyError in the engine; it is logged there"):
        wire.raise_error(wire.error_of(KeyError("secret")))


def test_the_description_and_readiness_survive_the_trip() -> None:
    spec = make_spec()
    described = Description(
        default_model="tiny",
        models=(
            ModelDescription(
                "tiny",
                2,
                (
                    VersionDescription(
                        2,
                        spec,
                        Placement(CPU, ((CPU, 9),), ((CPU, 3),), TENSORRT, "why"),
                        True,
                        "int8",
                    ),
                ),
                128,
            ),
        ),
        not_ready=(Unavailable("other", None, "no graph"),),
        replica_not_ready=None,
    )
    message = wire.unpack(wire.pack({"description": wire.description_of(described)}))
    assert wire.description_from(message["description"]) == described
    ready = Readiness(False, "loading", loaded=False)
    assert wire.readiness_from(wire.readiness_of(ready)) == ready
    params = RolloutParams("max", 0.5)
    assert wire.rollout_from(wire.rollout_of(params)) == params


class _Transport(asyncio.Transport):
    """What a Link writes, and whether it was aborted."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.aborted = False
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True


def _link() -> tuple[wire.Link, _Transport, list[dict[str, object]], list[object]]:
    received: list[dict[str, object]] = []
    lost: list[object] = []
    link = wire.Link(received.append, lost.append)
    transport = _Transport()
    link.connection_made(transport)
    return link, transport, received, lost


def test_messages_are_read_back_whole_however_the_stream_is_cut() -> None:
    link, transport, received, _ = _link()
    stream = wire.pack({"op": "a", "n": 1}) + wire.pack({"op": "b", "data": b"\0" * 9})
    for i in range(len(stream)):  # one byte a read: every cut inside a message
        link.data_received(stream[i : i + 1])
    link.data_received(stream)  # and both in one read
    assert received == [{"op": "a", "n": 1}, {"op": "b", "data": b"\0" * 9}] * 2
    assert not transport.aborted


def test_what_is_sent_in_one_turn_leaves_in_one_write() -> None:
    async def turn() -> list[bytes]:
        link, transport, _, _ = _link()
        for n in range(3):
            link.send({"id": n, "ok": True})
        assert transport.writes == []  # not yet: at the start of the next turn
        await asyncio.sleep(0)
        link.send({"id": 3, "ok": True})
        await asyncio.sleep(0)
        return transport.writes

    first, second = asyncio.run(turn())
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(first)
    assert list(unpacker) == [{"id": n, "ok": True} for n in range(3)]
    assert wire.unpack(second) == {"id": 3, "ok": True}


@pytest.mark.parametrize("data", [msgpack.packb([1, 2]), b"\xc1", b"\x81\xc1"])
def test_a_stream_that_is_not_messages_drops_the_link(data: bytes) -> None:
    link, transport, received, _ = _link()
    link.data_received(wire.pack({"op": "a"}) + data + wire.pack({"op": "b"}))
    assert transport.aborted
    assert received[:1] == [{"op": "a"}]
    assert {"op": "b"} not in received


def test_a_message_over_the_limit_drops_the_link(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire, "MAX_MESSAGE_BYTES", 1024)
    link, transport, received, _ = _link()
    link.data_received(wire.pack({"op": "big", "data": b"\0" * 4096}))
    assert transport.aborted
    assert received == []
