"""The receiving side of KV transfers, one rank's part: which frames it still expects, validation,
and writing pages into its caches (the driver's reservations and the request's state machine are
kvtransfer/reservations.py).

No socket here: the transport calls in (from its I/O threads; everything is behind a lock).
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch

from common.kv_layout import ITEMSIZE
from kvtransfer.frames import Staged, host_buffer
from kvtransfer.pages import RankCaches, from_buffer
from kvtransfer.plan import KVLayout, items_to, kv_dtypes_compatible, plan_transfer
from kvtransfer.protocol import Pages

log = logging.getLogger(__name__)


class Landed:
    """A payload received into the places `RankReceiver.landing` named: the byte count of each frame
    (recv_into reports a frame's full size even when it was longer than its place), and whether more
    frames followed than there were places; `staged`: the places were a host staging buffer
    (`Staged`), not the cache itself."""

    def __init__(self, sizes: list[int], extra: bool = False, staged: Staged | None = None):
        self.sizes, self.extra, self.staged = sizes, extra, staged


@dataclass
class _Expected:
    attempt: int
    block_ids: list[int]
    block_t: torch.Tensor
    frames: set[tuple[int, int, int, int]]  # (src_rank, layer, h0, h1) still to come
    deadline: float


class RankReceiver:
    """One destination rank: validates frames and writes them into its caches."""

    def __init__(self, rank: int, layout: KVLayout, caches: RankCaches,
                 on_done: Callable[[str, int, int, bool, str], None], metrics: Counter | None = None,
                 stage_frames: bool | None = None):
        """`stage_frames`: receive ZeroMQ frames into a host staging buffer and copy them into the cache
        from there (None: when the cache is not in host memory, i.e. on a GPU; True also for a CPU
        cache, to test that path); otherwise frames of whole blocks land in the cache itself."""
        self.rank = rank
        on_host = caches.caches[0].device.type == "cpu"
        self.stage_frames = not on_host if stage_frames is None else stage_frames
        if not on_host and not self.stage_frames:
            raise ValueError("frames for a cache off the host go through a staging buffer (stage_frames)")
        self.layout = layout
        self.caches = caches
        self.on_done = on_done
        self.metrics = metrics if metrics is not None else Counter()
        self._lock = threading.Lock()
        self._expected: dict[str, _Expected] = {}
        # the requests whose pages are being written into their blocks right now, by thread (a
        # transport thread, between `landing` or the checks of `on_pages` and the end of the write):
        # `cancel` from another thread waits for them, so blocks are never freed under a write
        self._writing: dict[int, tuple[str, int]] = {}  # thread -> (request_id, attempt)
        # writers told by `cancel` to stop (a stream's reader receiving pages straight into the cache
        # checks `may_write` between reads): the wait in `cancel` then lasts one read, not a transfer
        self._revoked: set[int] = set()
        self._written = threading.Condition(self._lock)

    def expect(self, request_id: str, attempt: int, block_ids: list[int], src_layout: KVLayout,
               deadline: float) -> None:
        frames = {(it.src_rank, layer, it.heads[0], it.heads[1])
                  for it in items_to(plan_transfer(src_layout, self.layout), self.rank)
                  for layer in range(*it.layers)}
        with self._lock:
            self._expected[request_id] = _Expected(
                attempt, list(block_ids), torch.tensor(block_ids, dtype=torch.long, device=self.caches.caches[0].device),
                frames, deadline)
        if not frames:  # this rank holds nothing the sender sends (cannot happen with a valid plan)
            self._finish(request_id, attempt, True, "")

    def cancel(self, request_id: str, attempt: int, timeout: float = 5.0) -> None:
        """Forgets the request; once this returns no frame of it is written here any more (a write in
        progress on a transport thread is revoked and waited for, at most `timeout`), so its blocks
        may be freed."""
        with self._lock:
            e = self._expected.get(request_id)
            if e is not None and e.attempt == attempt:
                del self._expected[request_id]
            me = threading.get_ident()

            def others_writing() -> bool:
                return any(w == (request_id, attempt) and tid != me for tid, w in self._writing.items())
            if others_writing():
                self._revoked.update(tid for tid, w in self._writing.items() if w == (request_id, attempt) and tid != me)
                if not self._written.wait_for(lambda: not others_writing(), timeout):
                    log.error("a write of %s's pages outlasted %.0f s; its blocks are freed anyway",
                              request_id, timeout)

    def _done_writing(self) -> None:
        with self._lock:
            me = threading.get_ident()
            self._revoked.discard(me)
            if self._writing.pop(me, None) is not None:
                self._written.notify_all()

    def abandon_landing(self) -> None:
        """The frames `landing` named places for never reached `on_pages` (the socket failed), or
        the caller stops writing them (`may_write` said so)."""
        self._done_writing()

    def may_write(self) -> bool:
        """For a thread receiving into the places `landing` named, between reads: False once `cancel`
        has revoked the write (the request's blocks are about to be freed): write no more, and call
        `abandon_landing` at once."""
        return threading.get_ident() not in self._revoked

    def on_pages(self, msg: Pages, payload) -> None:
        """Validates a frame against the expectation and writes it; a bad frame fails the request.

        Locks: the checks hold this receiver's lock; the write does not, but marks the request as
        being written (`cancel` waits for it). The mark is cleared before `on_done` runs, which may take
        the reservations' lock, under which another thread may be waiting in `cancel`."""
        try:
            verdict, problem = self._admit(msg, payload)
        except BaseException:
            self._done_writing()  # (a marker `landing` set must not outlive this message)
            raise
        if verdict is None:
            self._done_writing()
            if problem is not None:
                log.warning("request %s attempt %d: %s; transfer failed", msg.request_id, msg.attempt, problem)
                self.on_done(msg.request_id, msg.attempt, self.rank, False, problem)
            return
        e, complete = verdict
        try:
            if isinstance(payload, Landed) and payload.staged is not None:
                self._write(msg, e, payload.staged.frames())
                self._synchronize()  # the pages are in the cache before anyone hears they are
                self.metrics["frames_staged"] += msg.num_layers
            elif isinstance(payload, Landed):
                self.metrics["frames_in_place"] += msg.num_layers  # already in the cache
            else:
                self._write(msg, e, payload)
        except Exception as err:  # out of memory, a device error: that transfer fails, nothing else
            self._done_writing()
            log.exception("request %s attempt %d: writing pages failed", msg.request_id, msg.attempt)
            self.cancel(msg.request_id, msg.attempt)
            self.on_done(msg.request_id, msg.attempt, self.rank, False, f"writing pages failed: {err}")
            return
        self._done_writing()
        self.metrics["frames_ok"] += msg.num_layers
        self.metrics["messages_ok"] += 1
        self.metrics["bytes_received"] += msg.nbytes
        if complete:
            self._finish(msg.request_id, msg.attempt, True, "")

    def _admit(self, msg: Pages, payload) -> tuple[tuple[_Expected, bool] | None, str | None]:
        """on_pages' checks, under the lock: ((expectation, last frame?), None) to write it, marked as
        being written; (None, None) to drop it (no such request); (None, why) when it fails the request."""
        with self._lock:
            e = self._expected.get(msg.request_id)
            if e is None or e.attempt != msg.attempt:
                self.metrics["frames_unknown_request"] += msg.num_layers
                return None, None  # late frames of a failed attempt, or never reserved: dropped
            keys = _keys(msg)
            problem = self._header_problem(msg, e, keys) or _payload_problem(msg, payload)
            if problem is not None:
                self.metrics["frames_bad"] += 1
                del self._expected[msg.request_id]
                return None, problem
            e.frames.difference_update(keys)
            complete = not e.frames
            if complete:
                del self._expected[msg.request_id]
            self._writing[threading.get_ident()] = (msg.request_id, msg.attempt)
            return (e, complete), None

    def _synchronize(self) -> None:
        device = self.caches.caches[0].device
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()

    def _write(self, msg: Pages, e, payload) -> None:
        """`payload`: a tensor (torch.distributed), or the ZeroMQ frames (checked by `_frames_fit`):
        buffers, or byte tensors of a staging buffer."""
        if isinstance(payload, torch.Tensor):
            self.caches.insert(msg.layer, msg.heads, e.block_t, payload)
            return
        per_layer = len(payload) // msg.num_layers
        with warnings.catch_warnings():  # (~20 us: not for pages already landed in place)
            warnings.simplefilter("ignore")  # read-only ZeroMQ buffers: we only read them
            for i in range(msg.num_layers):
                frames = payload[i * per_layer:(i + 1) * per_layer]
                if msg.runs:
                    frames = [from_buffer(f, msg.dtype, [len(f) // _itemsize(msg.dtype)]) for f in frames]
                    self.caches.insert_runs(msg.layer + i, msg.heads, e.block_ids, msg.runs, frames)
                else:
                    self.caches.insert(msg.layer + i, msg.heads, e.block_t, from_buffer(frames[0], msg.dtype, msg.shape))

    def _header_problem(self, msg: Pages, e: _Expected, keys: list) -> str | None:
        """Why a Pages header does not fit its request's expectation (frames, blocks, dtype, block shape),
        or None."""
        if not all(key in e.frames for key in keys):
            return f"unexpected frame {next(key for key in keys if key not in e.frames)}"
        if msg.block_ids != e.block_ids:
            return "frame names blocks that were not reserved for it"
        # float pages of another float dtype are cast on insert; quantized pages only into the same format
        takes = msg.dtype == self.layout.page_dtype or \
            (self.layout.kv_cache_dtype == "auto" and kv_dtypes_compatible(msg.dtype, self.layout.dtype))
        if not takes or msg.shape[3:] != [self.layout.block_size, self.layout.row_width]:
            return f"frame dtype/shape {msg.dtype} {msg.shape} does not match this cache ({self.layout.page_dtype})"
        return None

    def _expected_for(self, msg: Pages) -> _Expected | None:
        """The expectation `msg` fits (request, attempt, `_header_problem`'s checks, this rank's
        layers), under the lock; else None."""
        e = self._expected.get(msg.request_id)
        last = msg.layer + msg.num_layers - 1
        if e is None or e.attempt != msg.attempt or self._header_problem(msg, e, _keys(msg)) is not None or \
                not self.caches.layer_start <= msg.layer <= last < self.caches.layer_start + len(self.caches.caches):
            return None
        return e

    def landing(self, msg: Pages) -> list | None:
        """Where the payload frames of a Pages message (ZeroMQ) land, in the order the sender sends
        them: writable byte views of the cache blocks reserved for it (whole-block runs, K then V per
        run), or of a staging buffer (`Staged`: a GPU cache, `stage_frames`); None when they cannot
        land (not expected, a mismatch, partial heads in place: `on_pages` decides, with its checks
        and counters). Changes nothing: `on_pages(msg, Landed(...))` does the bookkeeping once the
        frames are in."""
        if self.stage_frames:
            with self._lock:
                if self._expected_for(msg) is None:  # the sizes are then bounded by the reservation
                    return None
            sizes = frame_sizes(msg)
            try:
                staged = Staged(host_buffer(sum(sizes), self.caches.caches[0].device), sizes)
            except RuntimeError as e:  # no page-locked memory to be had: through ZeroMQ's buffers instead
                log.warning("no staging buffer of %d bytes (%s); frames go the slow way", sum(sizes), e)
                return None
            return staged
        # pages of another dtype are cast as `on_pages` writes them, so they cannot land as they come
        if not msg.runs or msg.heads[0] != self.caches.head_start or msg.dtype != self.layout.page_dtype or \
                msg.heads[1] - msg.heads[0] != self.caches.num_heads or sum(msg.runs) != len(msg.block_ids):
            return None
        layers = range(msg.layer, msg.layer + msg.num_layers)
        with self._lock:
            e = self._expected_for(msg)
            if e is None:
                return None
            views = []
            for layer in layers:
                cache = self.caches.byte_view(layer)
                for kv in (0, 1):
                    i = 0
                    for n in msg.runs:
                        b = e.block_ids[i]
                        views.append(cache[kv, b:b + n])
                        i += n
            if not all(v.flags.c_contiguous for v in views):
                return None
            self._writing[threading.get_ident()] = (msg.request_id, msg.attempt)  # recv_into writes into its blocks
            return views

    def expire(self, now: float) -> None:
        with self._lock:
            late = [(rid, e.attempt) for rid, e in self._expected.items() if e.deadline <= now]
            for rid, _ in late:
                del self._expected[rid]
        for rid, attempt in late:
            self.metrics["transfers_timed_out"] += 1
            self._finish(rid, attempt, False, "timed out waiting for KV frames")

    def _finish(self, request_id: str, attempt: int, ok: bool, reason: str) -> None:
        self.on_done(request_id, attempt, self.rank, ok, reason)

    @property
    def num_pending(self) -> int:
        return len(self._expected)


def _itemsize(dtype: str) -> int:
    return ITEMSIZE[dtype]


def _keys(msg: Pages) -> list[tuple[int, int, int, int]]:
    """The (src_rank, layer, h0, h1) frames a Pages message carries, one per layer."""
    return [(msg.src_rank, layer, msg.heads[0], msg.heads[1]) for layer in range(msg.layer, msg.layer + msg.num_layers)]


def frame_sizes(msg: Pages) -> list[int]:
    """The payload frames' sizes a ZeroMQ Pages message announces. Per layer: K then V of each run
    (`msg.runs`), or one frame of the layer's pages."""
    per_layer = msg.nbytes // msg.num_layers
    if msg.runs:
        per_block = per_layer // (2 * len(msg.block_ids))
        return [n * per_block for n in msg.runs] * (2 * msg.num_layers)
    return [per_layer] * msg.num_layers


def _payload_problem(msg: Pages, payload) -> str | None:
    """Why the payload does not match its header (frames landed, ZeroMQ frames, a tensor), or None."""
    if isinstance(payload, Landed):
        return "payload frames do not match the header" if payload.extra or not _frames_fit(msg, payload.sizes) \
            else None
    if isinstance(payload, list):
        return None if _frames_fit(msg, payload) else "payload frames do not match the header"
    if _nbytes(payload) != msg.nbytes:
        return f"payload of {_nbytes(payload)} bytes, header says {msg.nbytes}"
    return None


def _frames_fit(msg: Pages, frames: list) -> bool:
    """`frames`: the ZeroMQ payload frames, or their sizes (received in place)."""
    return [f if isinstance(f, int) else len(f) for f in frames] == frame_sizes(msg)


def _nbytes(payload) -> int:
    if payload is None:
        return 0
    if isinstance(payload, torch.Tensor):
        return payload.numel() * payload.element_size()
    return len(payload)
