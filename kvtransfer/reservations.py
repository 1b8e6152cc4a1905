"""The decode driver's reservations: blocks for an incoming transfer, the ranks told what to expect,
and the request's state until every rank has its pages.

    Reserve ──▶ Reserving: blocks allocated, every rank told what to expect (deadline = now + timeout,
                or the sender's `wait_s` when longer: its queue ahead of the prompt, capped at MAX_WAIT_S)
            ──▶ Transferring: frames arrive at each rank; a rank is done when it has every frame the
                plan routes to it
            ──▶ Done: all ranks done -> Ack(ok) to the sender, on_ready(request) for the scheduler
            ──▶ Failed: timeout, bad frame, abort, a rank failing -> blocks freed, Ack(not ok)

No socket here: the transport calls in (from its I/O threads; everything is behind a lock). The ranks'
own bookkeeping is kvtransfer/receiver.py.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from kvtransfer.plan import IncompatibleLayouts, KVLayout, plan_transfer
from kvtransfer.protocol import VERSION, Ack, Reserve, Reserved
from kvtransfer.receiver import RankReceiver

log = logging.getLogger(__name__)
MAX_WAIT_S = 300.0  # the longest a sender may ask a reservation to wait for its pages (Reserve.wait_s)


class BlockPoolReserver:
    """`reserve_fn`/`release_fn` for `Reservations` over an engine BlockManager.

    Each reservation is a placeholder sequence holding the blocks for `num_tokens`; the decode worker
    takes it over (`take`) when the transfer is done, so the request starts with its KV in place.
    """

    def __init__(self, block_manager, lock=None):
        """`lock`: shared with whoever else changes the block manager (the engine's loop): reservations
        arrive on the KV thread."""
        from engine.sampling_params import SamplingParams
        from engine.sequence import Sequence

        self.bm = block_manager
        self.lock = lock if lock is not None else threading.RLock()
        self._seq_cls, self._params = Sequence, SamplingParams()
        self.held: dict[str, object] = {}

    def reserve(self, request_id: str, num_tokens: int, attempt: int = 0, prefix_hashes: list[int] = (),
                hash_root: int = 0) -> tuple[list[int], int] | None:
        """Blocks for `num_tokens` and how many of the first already hold the prompt's KV: the leading
        `prefix_hashes` this cache holds (decode-side reuse across turns; never the whole prompt: the
        last block is always received), when they chain from this cache's root."""
        with self.lock:
            old = self.held.pop(request_id, None)
            if old is not None:  # an older attempt's landed KV nobody claimed: the newer attempt supersedes it
                self.bm.free(old[1])
            seq = self._seq_cls(request_id, 0, [0] * num_tokens, num_tokens, self._params)
            cached = self.bm.cached_prefix(prefix_hashes, (num_tokens - 1) // self.bm.block_size) \
                if hash_root == self.bm.root_hash else []
            if not self.bm.allocate_slots(seq, num_tokens - len(cached) * self.bm.block_size, cached):
                return None
            self.held[request_id] = (attempt, seq)
            return list(seq.block_ids), len(cached)

    def release(self, request_id: str, attempt: int | None = None) -> None:
        """Frees the held KV of `request_id` (of that attempt only, when one is named)."""
        with self.lock:
            h = self.held.get(request_id)
            if h is not None and (attempt is None or h[0] == attempt):
                del self.held[request_id]
                self.bm.free(h[1])

    def take(self, request_id: str, attempt: int | None = None):
        """The held placeholder sequence (its blocks now the caller's), or None if that attempt's is gone."""
        with self.lock:
            h = self.held.get(request_id)
            if h is None or (attempt is not None and h[0] != attempt):
                return None
            del self.held[request_id]
            return h[1]


@dataclass
class _Reservation:
    attempt: int
    block_ids: list[int]
    sender: bytes  # the sender driver's connection identity, for the Ack
    ranks_left: set[int] = field(default_factory=set)
    deadline: float = 0.0
    held: int = 0  # leading blocks already held here (not sent)


@dataclass
class _Undo:
    request_id: str
    res: _Reservation
    ack_reason: str | None  # None: no Ack owed
    done: threading.Event


class Reservations:
    """The decode driver's table of incoming transfers (Reserving -> Transferring -> Done | Failed)."""

    def __init__(self, layout: KVLayout, ranks: list[RankReceiver],
                 reserve_fn: Callable[..., tuple[list[int], int] | None], release_fn: Callable[[str, int], None],
                 send_ack: Callable[[bytes, Ack], None],
                 on_ready: Callable[[str, int, list[int]], None] = lambda *a: None,
                 timeout: float = 10.0, metrics: Counter | None = None,
                 refuse: Callable[[str, int], str | None] = lambda rid, attempt: None):
        """`refuse(request_id, attempt)`: a reason to turn a reservation down (e.g. already aborted)."""
        self.layout = layout
        self.ranks = ranks
        self.reserve_fn, self.release_fn = reserve_fn, release_fn
        self.send_ack, self.on_ready = send_ack, on_ready
        self.refuse = refuse
        self.timeout = timeout
        self.metrics = metrics if metrics is not None else Counter()
        self._lock = threading.Lock()
        self._table: dict[str, _Reservation] = {}
        self._undoing: dict[str, threading.Event] = {}  # failed reservations whose ranks are being cancelled

    def on_reserve(self, sender: bytes, msg: Reserve) -> Reserved:
        def no(reason: str) -> Reserved:
            self.metrics["reserve_refused"] += 1
            return Reserved(VERSION, msg.request_id, msg.attempt, False, [], reason)

        try:
            src = KVLayout.from_spec(msg.layout)
            plan_transfer(src, self.layout)
        except (IncompatibleLayouts, ValueError) as e:
            return no(f"incompatible layout: {e}")
        if msg.num_tokens <= 0:
            return no(f"num_tokens = {msg.num_tokens} must be positive")
        reason = self.refuse(msg.request_id, msg.attempt)
        if reason:
            return no(reason)
        wait_until = time.monotonic() + 2 * self.timeout
        while True:
            with self._lock:
                undoing = self._undoing.get(msg.request_id)
                if undoing is None:
                    old = self._table.get(msg.request_id)
                    if old is not None and old.attempt >= msg.attempt:
                        return no(f"duplicate reservation (attempt {old.attempt} is in flight)")
                    if old is None:
                        got = self.reserve_fn(msg.request_id, msg.num_tokens, msg.attempt, msg.block_hashes,
                                              msg.hash_root)
                        if got is None:
                            return no("no room")
                        block_ids, n_held = got
                        deadline = time.monotonic() + max(self.timeout, min(msg.wait_s, MAX_WAIT_S))
                        self._table[msg.request_id] = _Reservation(msg.attempt, block_ids, sender,
                                                                   {r.rank for r in self.ranks}, deadline, n_held)
                        break
                    undo = self._drop_locked(msg.request_id, "superseded by a newer attempt")
            if undoing is not None:  # an older attempt's ranks are being cancelled: its blocks are not
                if not undoing.wait(max(0.0, wait_until - time.monotonic())):  # free to reuse until then
                    return no("an earlier attempt of this request is still being cancelled")
            else:
                self._undo(undo)
        told, late = 0, None  # ranks told (one that times out counts: it may take its Expect late)
        try:
            for r in self.ranks:
                told += 1
                r.expect(msg.request_id, msg.attempt, block_ids[n_held:], src, deadline)  # only what is sent
        except TimeoutError as e:  # another rank of this worker did not answer: refuse, free
            late = e
        undo = None
        with self._lock:
            held = self._holds(msg.request_id, msg.attempt)
            if held and late is not None:
                undo = self._drop_locked(msg.request_id, str(late), ack=False)
        if undo is not None:
            self._undo(undo)
        if not held:  # aborted (its blocks freed) while the ranks were being told, maybe before some of
            for r in self.ranks[:told]:  # them were: the abort's cancels missed those, so untell them here
                r.cancel(msg.request_id, msg.attempt)
        if late is not None:
            return no(f"decode worker not ready: {late}")
        if not held:
            return no("aborted while reserving")
        self.metrics["reserved"] += 1
        self.metrics["blocks_held"] += n_held
        return Reserved(VERSION, msg.request_id, msg.attempt, True, block_ids, held=n_held)

    def _holds(self, request_id: str, attempt: int) -> bool:
        res = self._table.get(request_id)
        return res is not None and res.attempt == attempt

    def on_rank_done(self, request_id: str, attempt: int, rank: int, ok: bool, reason: str) -> None:
        with self._lock:
            res = self._table.get(request_id)
            if res is None or res.attempt != attempt:
                return
            if ok:
                res.ranks_left.discard(rank)
                if res.ranks_left:
                    return
                del self._table[request_id]
            else:
                undo = self._drop_locked(request_id, f"rank {rank}: {reason}")
        if not ok:
            self._undo(undo)
            return
        self.metrics["transfers_ok"] += 1
        self.metrics["blocks_received"] += len(res.block_ids) - res.held
        self.send_ack(res.sender, Ack(VERSION, request_id, attempt, True))
        self.on_ready(request_id, attempt, res.block_ids)

    def on_abort(self, request_id: str, attempt: int, reason: str, notify_sender: bool = False) -> None:
        """The sender gave up (no Ack owed), or, with `notify_sender`, someone else aborted the request
        here (the requester): the sender gets Ack(not ok) and frees its pages at once."""
        undo = None
        with self._lock:
            res = self._table.get(request_id)
            if res is not None and res.attempt == attempt:
                undo = self._drop_locked(request_id, f"aborted: {reason}", ack=notify_sender)
        if undo is not None:
            self._undo(undo)

    def expire(self, now: float) -> None:
        with self._lock:
            undos = [self._drop_locked(rid, "timed out")
                     for rid in [rid for rid, r in self._table.items() if r.deadline <= now]]
        for undo in undos:
            self._undo(undo)

    def _drop_locked(self, request_id: str, reason: str, ack: bool = True) -> _Undo:
        """Takes a failed reservation out of the table (under the lock); `_undo` then cancels it at the
        ranks, frees its blocks and acks the sender, outside the lock: a remote rank's cancel may wait
        seconds for a dead follower, and nothing else should wait with it. Until `_undo` is done a newer
        attempt of the request waits (`_undoing`): the old blocks are not free before every rank has
        stopped writing them."""
        res = self._table.pop(request_id)
        self.metrics["transfers_failed"] += 1
        log.warning("KV transfer of %s (attempt %d) failed: %s", request_id, res.attempt, reason)
        done = self._undoing[request_id] = threading.Event()
        return _Undo(request_id, res, reason if ack else None, done)

    def _undo(self, undo: _Undo) -> None:
        rid, res = undo.request_id, undo.res
        try:
            for r in self.ranks:
                r.cancel(rid, res.attempt)
            self.release_fn(rid, res.attempt)
        finally:
            with self._lock:
                if self._undoing.get(rid) is undo.done:
                    del self._undoing[rid]
            undo.done.set()
        if undo.ack_reason is not None:
            self.send_ack(res.sender, Ack(VERSION, rid, res.attempt, False, undo.ack_reason))

    @property
    def num_pending(self) -> int:
        return len(self._table)
