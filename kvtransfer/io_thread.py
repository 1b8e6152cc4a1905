"""A thread that owns ZeroMQ sockets: other threads hand it callables through a queue and a wake-up
pipe, so no caller ever blocks on the network. Subclasses add sockets to `poller` and handle them in
`on_readable`; `on_tick` runs after every poll (at least every POLL_MS)."""

from __future__ import annotations

import logging
import os
import queue
import threading

import zmq

log = logging.getLogger(__name__)

POLL_MS = 50


class IOThread:
    """A thread that owns sockets; other threads submit callables that run on it."""

    def __init__(self, name: str):
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._stop = threading.Event()
        self._wake_pending = False  # a wake-up byte is in the pipe (or about to be): no need for another
        self.ctx = zmq.Context.instance()
        self.poller = zmq.Poller()
        self.poller.register(self._wake_r, zmq.POLLIN)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self):
        self._thread.start()

    def submit(self, fn) -> None:
        self._tasks.put(fn)
        # one wake-up per drain, not per task (a pipe write costs tens of us and wakes the thread).
        # No wake-up is lost: the I/O thread clears the flag before it drains the queue, and we put
        # before we look at the flag.
        if not self._wake_pending:
            self._wake_pending = True
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass

    def on_io_thread(self) -> bool:
        """Whether the caller is this I/O thread (which may use the sockets directly)."""
        return threading.get_ident() == self._thread.ident

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self.submit(lambda: None)
        self._thread.join(timeout)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _run(self):
        while not self._stop.is_set():
            try:
                events = dict(self.poller.poll(POLL_MS))
            except zmq.ZMQError:
                break
            if self._wake_r in events:
                try:
                    os.read(self._wake_r, 4096)
                except BlockingIOError:
                    pass
            self._wake_pending = False
            while True:
                try:
                    fn = self._tasks.get_nowait()
                except queue.Empty:
                    break
                self._guard(fn)
            for sock, ev in events.items():
                if sock is not self._wake_r and ev & zmq.POLLIN:
                    self._guard(lambda s=sock: self.on_readable(s))
            self._guard(self.on_tick)
        self.close_sockets()

    def _guard(self, fn):
        try:
            fn()
        except Exception:  # the I/O thread must survive anything a peer sends
            log.exception("KV transport I/O error (ignored)")

    def on_readable(self, sock) -> None: ...

    def on_tick(self) -> None: ...

    def close_sockets(self) -> None: ...
