"""Closing a listening socket without resetting a client that has connected.

Closing (or `shutdown`) a listening socket resets the connections in its accept queue and those
half-way through their handshake: their clients have connected, may have sent a request, and
would see it end in a reset. So, in order:
1. `refuse_new_handshakes`: a socket filter drops new SYNs (Linux). A client that connects now
   retries its SYN a second later and finds the port closed: refused at connect. Handshakes
   already under way complete (their ACKs pass) and join the accept queue.
2. A moment for those handshakes, while the event loop goes on accepting and serving.
3. `stop_listening`: take what is left in the accept queue, then `shutdown(SHUT_RD)`.
"""

from __future__ import annotations

import contextlib
import ctypes
import socket
import struct

# Time for handshakes that began before the filter to complete: one round trip, with room.
HANDSHAKE_GRACE_S = 0.2

_SO_ATTACH_FILTER = 26  # Linux's <asm-generic/socket.h>; not in Python's socket module
# Classic BPF over the TCP header (a TCP socket's filter sees it at offset 0): drop a segment
# whose flags have SYN without ACK (a new connection), keep every other whole.
_LD_B_ABS, _AND_K, _JEQ_K, _RET_K = 0x30, 0x54, 0x15, 0x06
_DROP_NEW_SYNS = (
    (_LD_B_ABS, 0, 0, 13),  # A = the flags byte
    (_AND_K, 0, 0, 0x12),  # A &= SYN | ACK
    (_JEQ_K, 0, 1, 0x02),  # SYN alone?
    (_RET_K, 0, 0, 0),  # drop
    (_RET_K, 0, 0, 0xFFFFFFFF),  # keep
)
_PROGRAM = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *i) for i in _DROP_NEW_SYNS))


def refuse_new_handshakes(listeners: list[socket.socket]) -> bool:
    """Drop new SYNs on `listeners`; False where the system has no socket filters (then the
    listener closes with only `stop_listening`'s ordering)."""
    fprog = struct.pack("HL", len(_DROP_NEW_SYNS), ctypes.addressof(_PROGRAM))
    try:
        for listener in listeners:
            listener.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)
    except OSError:
        return False
    return True


def stop_listening(listeners: list[socket.socket]) -> list[socket.socket]:
    """Take every connection the kernel has accepted on `listeners`, then stop listening:
    `shutdown(SHUT_RD)` (Linux) stops the socket whatever other descriptors of it the event
    loop holds, and from then on a connect is refused."""
    accepted: list[socket.socket] = []
    for listener in listeners:
        listener.setblocking(False)
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:  # BlockingIOError: the queue is empty
                break
            conn.setblocking(False)
            accepted.append(conn)
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RD)
    return accepted
