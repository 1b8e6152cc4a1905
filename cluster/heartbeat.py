"""Load sampling for a worker's heartbeats: counts steps and their time between beats. Torch-free."""

from __future__ import annotations

import time

from cluster.registry import Load, Registry


class Heartbeat:
    def __init__(self, registry: Registry | None, worker_id: str, interval: float = 0.5):
        self.registry, self.worker_id, self.interval = registry, worker_id, interval
        self._next = 0.0
        self._steps, self._step_s = 0, 0.0
        self._tokens = self._seqs = 0

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
        load = Load(self.worker_id, time.time(), st["num_waiting"], st["num_running"], st["num_free_blocks"],
                    st["num_blocks"], 1e3 * self._step_s / self._steps if self._steps else 0.0, self._steps,
                    pending_transfers, st["num_queued_tokens"], self._tokens, self._seqs)
        self._steps, self._step_s = 0, 0.0
        self._tokens = self._seqs = 0
        self.registry.heartbeat(load)
        return load
