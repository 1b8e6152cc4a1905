"""The coordinator's live view of the workers: registrations (etcd) + load (ZeroMQ heartbeats).

Pure bookkeeping with injected time, so it is tested without sockets. A worker is
- live: registered and heard from within `suspect_after` seconds;
- suspect: registered but silent longer: it gets no new work, and gateways are told so they can move
  its requests;
- dead: its registration is gone (lease expired or deregistered).
Placements are counted against a worker (queued prompt tokens, running requests) until a heartbeat
sampled after the placement confirms the worker has seen it, so a burst does not overfill one worker.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cluster.registry import Load, WorkerInfo
from coordinator.policy import (DecodeCost, DecodeWorkerState, Placement, PlacementRequest, PrefillCost,
                                PrefillWorkerState, RunningRequest)


@dataclass
class _Pending:
    at: float  # placement time (coordinator clock)
    prompt_tokens: int
    max_tokens: int
    tpot_slo: float


@dataclass
class WorkerView:
    info: WorkerInfo
    load: Load | None = None
    heard_at: float = 0.0  # coordinator clock of the last heartbeat
    pending: list[_Pending] = field(default_factory=list)
    draining: bool = False


class LiveView:
    def __init__(self, suspect_after: float = 1.0):
        self.suspect_after = suspect_after
        self.workers: dict[str, WorkerView] = {}
        self.prefill_costs: dict[str, PrefillCost] = {}  # by worker id (from profiles)
        self.decode_costs: dict[str, DecodeCost] = {}

    # ---- inputs ----------------------------------------------------------------------------------
    def registered(self, info: WorkerInfo, now: float) -> None:
        v = self.workers.get(info.worker_id)
        if v is None:
            self.workers[info.worker_id] = WorkerView(info, heard_at=now)
        else:
            v.info = info
        prof = info.profile or {}
        if prof.get("prefill"):
            self.prefill_costs[info.worker_id] = PrefillCost(**prof["prefill"])
        if prof.get("decode"):
            self.decode_costs[info.worker_id] = DecodeCost(**prof["decode"])

    def deregistered(self, worker_id: str) -> WorkerView | None:
        """The worker is dead (its lease is gone). Returns what was known of it."""
        self.prefill_costs.pop(worker_id, None)
        self.decode_costs.pop(worker_id, None)
        return self.workers.pop(worker_id, None)

    def heartbeat(self, load: Load, now: float, sampled_at: float | None = None) -> None:
        """`sampled_at`: when the worker took the sample, on the coordinator's clock (defaults to
        `now`); placements made before it are now included in the load and stop being counted."""
        v = self.workers.get(load.worker_id)
        if v is None:
            return  # not (or no longer) registered: ignored
        v.load, v.heard_at = load, now
        cutoff = now if sampled_at is None else sampled_at
        v.pending = [p for p in v.pending if p.at > cutoff]

    def placed(self, placement: Placement, req: PlacementRequest, now: float) -> None:
        for wid in (placement.prefill, placement.decode):
            v = self.workers.get(wid)
            if v is not None:
                v.pending.append(_Pending(now, req.prompt_tokens, req.max_tokens, req.tpot_slo))

    def drain(self, worker_id: str, draining: bool = True) -> bool:
        v = self.workers.get(worker_id)
        if v is None:
            return False
        v.draining = draining
        return True

    # ---- queries ---------------------------------------------------------------------------------
    def suspects(self, now: float) -> list[str]:
        return [wid for wid, v in self.workers.items() if now - v.heard_at > self.suspect_after]

    def _healthy(self, v: WorkerView, now: float) -> bool:
        return not v.draining and now - v.heard_at <= self.suspect_after and v.load is not None

    @staticmethod
    def _wanted(v: WorkerView, roles: tuple[str, ...], model: str, exclude) -> bool:
        return v.info.role in roles and (not model or v.info.model == model) and v.info.worker_id not in exclude

    def models(self) -> set[str]:
        return {v.info.model for v in self.workers.values()}

    def prefill_states(self, now: float, roles: tuple[str, ...] = ("prefill", "colocated"), model: str = "",
                       exclude=()) -> list[PrefillWorkerState]:
        out = []
        for wid, v in self.workers.items():
            if not self._wanted(v, roles, model, exclude):
                continue
            queued = (v.load.queued_tokens if v.load else 0) + sum(p.prompt_tokens for p in v.pending)
            out.append(PrefillWorkerState(wid, self.prefill_costs.get(wid, PrefillCost()), queued,
                                          self._healthy(v, now)))
        return out

    def decode_states(self, now: float, roles: tuple[str, ...] = ("decode", "colocated"), model: str = "",
                      exclude=()) -> list[DecodeWorkerState]:
        out = []
        for wid, v in self.workers.items():
            if not self._wanted(v, roles, model, exclude):
                continue
            load = v.load
            running = [RunningRequest(0, float("inf"))] * (load.num_running if load else 0)
            running += [RunningRequest(p.prompt_tokens, p.tpot_slo) for p in v.pending]
            free = (load.free_blocks * v.info.block_size if load else 0) \
                - sum(p.prompt_tokens for p in v.pending)  # reservations: the prompt's KV
            out.append(DecodeWorkerState(wid, self.decode_costs.get(wid, DecodeCost()), running, free,
                                         healthy=self._healthy(v, now)))
        return out
