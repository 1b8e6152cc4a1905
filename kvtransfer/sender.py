"""The sending side's per-request state machine (run by the prefill driver).

    Reserving ──Reserved(ok)──▶ Transferring ──Ack(ok)──▶ Done
        │ no room / no answer        │ Ack(not ok) / no Ack in time / abort
        ▼                            ▼
      Failed ◀───────────────────────┘         `release()` runs exactly once, whatever the ending

Each state has a deadline; the prefill worker never holds pages forever.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout

from kvtransfer.outgoing import OutgoingTransfer
from kvtransfer.pages import RankCaches
from kvtransfer.plan import KVLayout, plan_transfer
from kvtransfer.transport import KVTransport


class TransferState(enum.Enum):
    RESERVING = "reserving"
    TRANSFERRING = "transferring"
    DONE = "done"
    FAILED = "failed"


class SendTransfer:
    def __init__(self, client: KVTransport, request_id: str, attempt: int, num_tokens: int, src: KVLayout,
                 dst: KVLayout, endpoints: list[str], release: Callable[[], None],
                 reserve_timeout: float = 5.0, ack_timeout: float = 10.0, block_hashes: list[int] = (),
                 hash_root: int = 0, wait_s: float = 0.0):
        """`block_hashes` (from `hash_root`): the prompt's full blocks; the receiver keeps the leading
        ones it holds (`held`), and only the rest is sent. `wait_s`: how long the receiver should wait
        for the pages (Reserve.wait_s; 0: its own timeout)."""
        self.client = client
        self.request_id, self.attempt, self.num_tokens = request_id, attempt, num_tokens
        self.src, self.dst, self.endpoints = src, dst, endpoints
        self.plan = plan_transfer(src, dst)  # raises IncompatibleLayouts before anything is sent
        self._release = release
        self._released = threading.Event()
        self.reserve_timeout, self.ack_timeout = reserve_timeout, ack_timeout
        self.state = TransferState.RESERVING
        self.reason = ""
        self.dst_block_ids: list[int] = []
        self.block_hashes, self.hash_root = list(block_hashes), hash_root
        self.held = 0  # leading blocks the receiver already holds
        self.wait_s = wait_s
        self._ack = None
        self._ack_deadline: float | None = None

    def reserve(self) -> bool:
        return self._reserved(self.client.reserve(self.endpoints[0], self.request_id, self.attempt,
                                                  self.num_tokens, self.src, self.reserve_timeout,
                                                  self.block_hashes, self.hash_root, self.wait_s))

    def _reserved(self, reply) -> bool:
        if not reply.ok:
            self._fail(reply.reason)
            return False
        self.dst_block_ids, self.held = reply.block_ids, reply.held
        self._ack = self.client.expect_ack(self.request_id, self.attempt)
        self.state = TransferState.TRANSFERRING
        return True

    def start_reserve(self, now: float | None = None) -> None:
        """Non-blocking `reserve`: sends the Reserve; `poll_reserve` tells how it ended."""
        import time
        self._reserve = self.client.reserve_async(self.endpoints[0], self.request_id, self.attempt, self.num_tokens,
                                                  self.src, self.block_hashes, self.hash_root, self.wait_s)
        self._reserve_deadline = (time.monotonic() if now is None else now) + self.reserve_timeout

    def poll_reserve(self, now: float | None = None) -> bool | None:
        """None while waiting; True once reserved (Transferring); False when refused, unanswered in time
        or aborted (Failed, `reason` says why)."""
        import time
        if self.state != TransferState.RESERVING:
            return self.state == TransferState.TRANSFERRING
        if self._reserve.done():
            return self._reserved(self._reserve.result())
        if (time.monotonic() if now is None else now) >= self._reserve_deadline:
            self.client.forget_reserve(self.request_id, self.attempt)
            self._fail(f"no answer within {self.reserve_timeout} s")
            return False
        return None

    def outgoing(self, rank: int, client: KVTransport, caches: RankCaches,
                 src_block_ids: list[int]) -> OutgoingTransfer:
        """The pages that source rank `rank` sends (layer by layer) for this request."""
        return OutgoingTransfer(client, caches, self.plan, rank, self.request_id, self.attempt, self.endpoints,
                                src_block_ids[self.held:len(self.dst_block_ids)], self.dst_block_ids[self.held:])

    def finish(self) -> bool:
        """Waits (at most ack_timeout) for the receiver's Ack; frees the pages either way."""
        if self.state != TransferState.TRANSFERRING:
            return self.state == TransferState.DONE
        try:
            ack = self._ack.result(self.ack_timeout)
        except FutureTimeout:
            self.client.abort(self.endpoints[0], self.request_id, self.attempt, "no ack")
            self._fail("no ack (timeout)")
            return False
        if not ack.ok:
            self._fail(ack.reason)
            return False
        self.state = TransferState.DONE
        self._release_once()
        return True

    def poll(self, now: float | None = None) -> bool:
        """Non-blocking `finish`: True once the transfer has ended (Done or Failed; pages released).
        The Ack deadline counts from the first poll after the pages were queued."""
        import time
        if self.state not in (TransferState.TRANSFERRING,):
            return True
        now = time.monotonic() if now is None else now
        if self._ack_deadline is None:
            self._ack_deadline = now + self.ack_timeout
        if self._ack.done():
            return self.finish()
        if now >= self._ack_deadline:
            self.client.abort(self.endpoints[0], self.request_id, self.attempt, "no ack")
            self._fail("no ack (timeout)")
            return True
        return False

    def release_with(self, release: Callable[[], None]) -> None:
        """Replaces what runs when the transfer ends (e.g. free pages pinned after reserving)."""
        self._release = release

    def refused(self) -> str | None:
        """While transferring: the receiver's reason if it already gave up (an early Ack(not ok))."""
        if self.state == TransferState.TRANSFERRING and self._ack.done() and not self._ack.result().ok:
            return self._ack.result().reason
        return None

    def abort(self, reason: str) -> None:
        if self.state == TransferState.RESERVING and getattr(self, "_reserve", None) is not None:
            self.client.forget_reserve(self.request_id, self.attempt)  # no future left waiting for a reply
        if self.state in (TransferState.RESERVING, TransferState.TRANSFERRING):  # D frees what it holds
            self.client.abort(self.endpoints[0], self.request_id, self.attempt, reason)
        if self.state in (TransferState.RESERVING, TransferState.TRANSFERRING):
            self._fail(reason)

    def _fail(self, reason: str) -> None:
        self.state = TransferState.FAILED
        self.reason = reason
        self._release_once()

    def _release_once(self) -> None:
        if not self._released.is_set():
            self._released.set()
            self._release()
