"""The cluster's KV index: which worker's prefix cache holds which block, from the workers' KVEvents.
Pure bookkeeping, torch-free.

    worker w: KVEvents(seq, stored=[h...], removed=[h...])  ──▶  apply  ──▶  holders[h] ∋ w
    Place(block_hashes=[h0, h1, ...])  ──▶  match  ──▶  {w: leading blocks w holds}

A hash names a block *and its whole prefix* (engine/block_manager.py chains them), so a worker holds
the first k blocks of a prompt iff it holds h0..h(k-1); `match` walks the prompt's hashes once,
dropping workers as they stop matching.

What the index says is a hint, never the truth: an entry may be stale (evicted since, its event lost
or not sent yet), or missing. The worker that gets a request looks its prefix up in its own cache and
computes what it does not find, so a wrong entry costs time, never a token. Hence the rules here are
cheap ones: a message older than the last one applied from that worker is dropped (a reordered
`removed` must not undo a newer `stored`); a new incarnation (restart) forgets the worker's entries;
a snapshot replaces them; each worker holds at most `max_per_worker` entries (the oldest go first), so
memory stays bounded whatever a worker sends.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from common.coordinator_protocol import KVEvents


class KVIndex:
    def __init__(self, max_per_worker: int = 1 << 18):
        self.max_per_worker = max_per_worker
        self._holders: dict[int, set[str]] = {}  # block hash -> workers that hold it
        self._held: dict[str, dict[int, None]] = {}  # worker -> its hashes, oldest first
        self._seq: dict[str, tuple[int, int]] = {}  # worker -> (incarnation, last seq applied)
        self.metrics: Counter = Counter()

    def __len__(self) -> int:
        return sum(len(h) for h in self._held.values())

    def workers(self) -> set[str]:
        return set(self._held)

    def held_by(self, worker_id: str) -> int:
        return len(self._held.get(worker_id, ()))

    def apply(self, ev: KVEvents) -> bool:
        """Applies one worker's events; False when dropped (older than what was applied, or a stale
        incarnation)."""
        wid = ev.worker_id
        inc, last = self._seq.get(wid, (None, 0))
        if inc is not None and (ev.incarnation < inc or (ev.incarnation == inc and ev.seq <= last)):
            self.metrics["kv_events_stale"] += 1
            return False
        if inc is not None and ev.incarnation != inc:
            self.forget(wid)  # restarted: its cache started empty
        elif inc is not None and ev.seq != last + 1 and not ev.snapshot:
            self.metrics["kv_events_gaps"] += 1  # some were lost: entries may be stale until a snapshot
        self._seq[wid] = (ev.incarnation, ev.seq)
        if ev.snapshot and ev.part == 0:
            self._drop_entries(wid)
        held = self._held.setdefault(wid, {})
        for h in ev.removed:
            if h in held:
                del held[h]
                self._unhold(h, wid)
        for h in ev.stored:
            if h in held:
                continue
            held[h] = None
            self._holders.setdefault(h, set()).add(wid)
        while len(held) > self.max_per_worker:  # the oldest first
            h = next(iter(held))
            del held[h]
            self._unhold(h, wid)
            self.metrics["kv_entries_dropped"] += 1
        self.metrics["kv_events_applied"] += 1
        return True

    def forget(self, worker_id: str) -> None:
        """The worker is gone (dead, deregistered, restarted)."""
        self._drop_entries(worker_id)
        self._held.pop(worker_id, None)
        self._seq.pop(worker_id, None)

    def match(self, block_hashes: list[int], workers: Iterable[str] | None = None) -> dict[str, int]:
        """For each worker (of `workers`, if given) holding the first block: how many leading blocks of
        `block_hashes` it holds. Workers holding none are absent."""
        if not block_hashes:
            return {}
        active = set(self._holders.get(block_hashes[0], ()))
        if workers is not None:
            active &= set(workers)
        out: dict[str, int] = {}
        for i in range(1, len(block_hashes)):
            if not active:
                return out
            holders = self._holders.get(block_hashes[i], ())
            for w in [w for w in active if w not in holders]:
                out[w] = i
                active.discard(w)
        for w in active:
            out[w] = len(block_hashes)
        return out

    def _drop_entries(self, worker_id: str) -> None:
        for h in self._held.get(worker_id, ()):
            self._unhold(h, worker_id)
        if worker_id in self._held:
            self._held[worker_id] = {}

    def _unhold(self, h: int, worker_id: str) -> None:
        s = self._holders.get(h)
        if s is not None:
            s.discard(worker_id)
            if not s:
                del self._holders[h]
