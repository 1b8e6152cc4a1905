"""OutputThread: a worker's output side, off its step loop (torch-free).

    loop thread:   step k ──submit──▶ step k+1 ──submit──▶ ...     (schedule, run the model)
    output thread:          handle(k) ─────────▶ handle(k+1)        (detokenize, stop strings, send chunks)

The loop hands each step's raw results over and goes straight into the next step; the output thread
handles items one at a time, in the order submitted. `submit(item)` waits while `max_lag` items are
still unhandled, so with the default of 1 the loop starts step k+2 only after step k was handled: a
stop string found in step k costs at most the one step computed meanwhile. Items submitted with
wait=False (bookkeeping: a request's route, an abort) never wait.

A `handle` that raises stops the thread: the error is logged and kept, and the next submit() (or
check()) raises it on the loop thread, so the worker goes down as it does when a rank dies. Its
requests are then re-placed by their gateways; none is left waiting on a thread that is gone.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

log = logging.getLogger(__name__)

_CLOSE = object()


class OutputThreadError(RuntimeError):
    pass


class OutputThread:
    def __init__(self, handle: Callable[[object], None], name: str = "outputs", max_lag: int = 1,
                 timeout: float = 60.0):
        """`timeout`: how long submit() waits for the thread to catch up before it calls it stuck."""
        self._handle, self.max_lag, self.timeout = handle, max_lag, timeout
        self._cond = threading.Condition()
        self._items: deque = deque()
        self._unhandled = 0
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, item, wait: bool = True) -> None:
        with self._cond:
            if wait:
                deadline = time.monotonic() + self.timeout
                while self._unhandled >= self.max_lag and self.error is None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise OutputThreadError(f"the output thread handled nothing for {self.timeout:.0f}s")
                    self._cond.wait(left)
            self.check()
            self._items.append(item)
            self._unhandled += 1
            self._cond.notify_all()

    def check(self) -> None:
        """Raises (on the caller's thread) the error that stopped the output thread, if one did."""
        if self.error is not None:
            raise OutputThreadError(f"the output thread failed: {self.error!r}") from self.error

    def close(self, timeout: float = 5.0) -> None:
        """Handles what was submitted, then stops the thread (waits up to `timeout`). Idempotent."""
        with self._cond:
            self._items.append(_CLOSE)
            self._cond.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("the output thread did not stop within %.0fs", timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._items:
                    self._cond.wait(1.0)
                item = self._items.popleft()
            if item is _CLOSE:
                return
            try:
                self._handle(item)
            except BaseException as e:  # noqa: BLE001 (kept, and raised on the loop thread)
                log.exception("the output thread failed; the worker goes down")
                with self._cond:
                    self.error = e
                    self._cond.notify_all()
                return
            with self._cond:
                self._unhandled -= 1
                self._cond.notify_all()
