"""Closing the listener (app/transport/listener.py): new handshakes refused first, connections the
kernel accepted taken, and a connect after the close refused rather than reset."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from app.transport.listener import refuse_new_handshakes, stop_listening


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield sock
    sock.close()


def test_a_filtered_listener_takes_no_new_handshake_but_its_connections_carry_on(
    listener: socket.socket,
) -> None:
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port), timeout=2)
    queued = socket.create_connection(("127.0.0.1", port), timeout=2)  # accepted by the kernel
    served, _ = listener.accept()
    assert refuse_new_handshakes([listener])
    client.sendall(b"ping")
    assert served.recv(4) == b"ping"  # an established connection is untouched
    with pytest.raises(TimeoutError):  # the SYN is dropped: no connection, no reset
        socket.create_connection(("127.0.0.1", port), timeout=0.3)
    taken = stop_listening([listener])
    assert len(taken) == 1  # the one waiting in the accept queue, not reset
    queued.sendall(b"request")
    assert taken[0].recv(7) == b"request"
    for sock in (client, queued, served, *taken):
        sock.close()


def test_a_connect_while_the_listener_closes_is_refused_not_reset(
    listener: socket.socket,
) -> None:
    port = listener.getsockname()[1]
    assert refuse_new_handshakes([listener])

    def close_soon() -> None:
        time.sleep(0.3)
        stop_listening([listener])

    threading.Thread(target=close_soon).start()
    # The dropped SYN is sent again about a second later, to a port no longer listening: the
    # connect is refused (a reset would be ConnectionResetError, a SYN left unanswered until
    # the timeout TimeoutError; the timeout only bounds a broken run, the SYN is sent again at
    # 1, 3 and 7 s).
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=10)
