"""Load sampling for a worker's heartbeats: counts steps and their time between beats. Torch-free."""

from __future__ import annotations

import time
from collections import deque
from contextlib import AbstractContextManager, nullcontext

from common.registry import Load, Registry


class SloWindow:
    """SLO attainment as one worker sees it, over the last `window_s`: TTFT from a request's arrival
    at the prefill (or colocated) worker to its first token; TPOT from the decode worker's admission
    to the last token, per token. The hops before the worker (HTTP, placement) are not in it: the
    gateway's histograms have the client's view."""

    def __init__(self, window_s: float = 60.0):
        self.window_s = window_s
        self._events: dict[str, deque] = {"ttft": deque(), "tpot": deque()}

    def record(self, kind: str, seconds: float, target_ms: float | None, now: float | None = None) -> None:
        if target_ms is None:
            return  # a request without that SLO: nothing to attain
        self._events[kind].append((time.monotonic() if now is None else now, seconds * 1e3 <= target_ms))

    def counts(self, now: float | None = None) -> dict[str, tuple[int, int]]:
        """kind -> (met, total) within the window."""
        now = time.monotonic() if now is None else now
        out = {}
        for kind, ev in self._events.items():
            while ev and ev[0][0] < now - self.window_s:
                ev.popleft()
            out[kind] = (sum(met for _, met in ev), len(ev))
        return out


class Heartbeat:
    def __init__(self, registry: Registry | None, worker_id: str, interval: float = 0.5,
                 kv_lock: AbstractContextManager | None = None):
        """`kv_lock`: held while the engine's block manager is read for KV events (a decode worker's
        reservations change it from another thread)."""
        self.registry, self.worker_id, self.interval = registry, worker_id, interval
        self.kv_lock = kv_lock if kv_lock is not None else nullcontext()
        self._kv_started = False
        self.kv_sent_bytes = self.kv_received_bytes = 0  # the worker adds what its transfers moved
        self._next = 0.0
        self._steps, self._step_s = 0, 0.0
        self._tokens = self._seqs = 0
        self.slo = SloWindow()

    def step_done(self, seconds: float, tokens: int = 0, seqs: int = 0) -> None:
        self._steps += 1
        self._step_s += seconds
        self._tokens += tokens
        self._seqs += seqs

    def maybe_beat(self, engine, pending_transfers: int = 0, now: float | None = None) -> Load | None:
        now = time.monotonic() if now is None else now
        if self.registry is None or now < self._next:
            return None
        self._next = now + self.interval
        st = engine.stats()
        slo = self.slo.counts(now)
        load = Load(self.worker_id, time.time(), st["num_waiting"], st["num_running"], st["num_free_blocks"],
                    st["num_blocks"], 1e3 * self._step_s / self._steps if self._steps else 0.0, self._steps,
                    pending_transfers, st["num_queued_tokens"], self._tokens, self._seqs,
                    *slo["ttft"], *slo["tpot"], st.get("prompt_tokens_total", 0), st.get("prefix_hit_tokens_total", 0),
                    self.kv_sent_bytes, self.kv_received_bytes, st.get("spec_proposed_tokens_total", 0),
                    st.get("spec_accepted_tokens_total", 0))
        self._steps, self._step_s = 0, 0.0
        self._tokens = self._seqs = 0
        self.registry.heartbeat(load)
        self._publish_kv(engine)
        return load

    def _publish_kv(self, engine) -> None:
        """The prefix cache's changes since the last beat, for the coordinators' KV index: a snapshot
        first, after an overflow, or when the agent asks for one."""
        bm = getattr(engine, "block_manager", None)
        if bm is None or not bm.enable_prefix_caching:
            return
        with self.kv_lock:
            stored, removed, overflowed = bm.enable_events().drain()
            if overflowed or not self._kv_started or self.registry.kv_snapshot_wanted():
                stored, removed, snapshot = bm.cached_hashes(), [], True
            else:
                snapshot = False
        self._kv_started = True
        if snapshot or stored or removed:
            self.registry.kv_events(stored, removed, snapshot)
