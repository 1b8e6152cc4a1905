"""ZeroMQ sockets read straight from an asyncio loop's reader callbacks (torch-free).

zmq.asyncio wraps every recv in a Future and wakes a task per message; for the hot request paths
(placements, heartbeats, token chunks) a plain socket whose handler runs synchronously in the
loop's reader callback costs a fraction of that. The ZeroMQ FD is edge-triggered: the callback
drains while EVENTS says POLLIN, and a socket that is also sent on must be re-checked after a send
(`kick`), since the send may consume the edge.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import zmq

log = logging.getLogger(__name__)


class Reader:
    def __init__(self, loop: asyncio.AbstractEventLoop, sock: zmq.Socket, handle: Callable[[bytes | list], None],
                 multipart: bool = False, burst: int = 1000):
        self.loop, self.sock, self.handle, self.multipart, self.burst = loop, sock, handle, multipart, burst
        self.fd = sock.getsockopt(zmq.FD)
        self._scheduled = False
        loop.add_reader(self.fd, self._ready)
        self.kick()  # messages that arrived before the reader was added

    def kick(self) -> None:
        """Re-check the socket soon (after a send on it, or to continue a long burst)."""
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self._ready)

    def _ready(self) -> None:
        self._scheduled = False
        sock = self.sock
        for _ in range(self.burst):
            try:
                if not sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    return
                msg = sock.recv_multipart(zmq.NOBLOCK) if self.multipart else sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError:  # closed
                return
            try:
                self.handle(msg)
            except Exception:  # a handler's bug must not stop the socket
                log.exception("handling a message")
        self.kick()  # a long burst: let the loop breathe, then go on

    def close(self) -> None:
        try:
            self.loop.remove_reader(self.fd)
        except (ValueError, OSError):
            pass
