"""The coordinator's live view of the workers: registrations (etcd) + load (ZeroMQ heartbeats).

Pure bookkeeping with injected time, so it is tested without sockets. A worker is
- live: registered and heard from within `suspect_after` seconds;
- suspect: registered but silent longer: it gets no new work, and gateways are told so they can move
  its requests;
- dead: its registration is gone (lease expired or deregistered).
Placements are counted against a worker (queued prompt tokens, running requests) until a heartbeat
sampled after the placement confirms the worker has seen it, so a burst does not overfill one worker,
or until the placement's prediction says it is over there (its first token for P, its last for D):
with heartbeats 0.2 s apart, a placement that took a few milliseconds would otherwise stay queued in
the view long after it left the queue, and every request placed meanwhile would be predicted to wait
for it. A heartbeat's own queued tokens likewise count until the worker's cost model says it has
worked through them (from the time the sample was taken).

A placement (`place`, the leader's per request) builds no list of workers: each worker has one
PrefillWorkerState and one DecodeLoad record, updated in place by the inputs above, and is filed in
sorted indexes (coordinator/candidates.py) that the policies walk. `prefill_states` / `decode_states`
build the full lists the policies' reference `place` scans (`place(..., scan=True)`, tests, benchmarks).
"""

from __future__ import annotations

import heapq
import itertools
import weakref
from dataclasses import dataclass, field, fields

from common.registry import Load, WorkerInfo
from coordinator.candidates import INF, SIDES, Candidates, SortedIndex, by_heartbeat, in_scan_order
from coordinator.policy import (
    DecodeCost,
    DecodeLoad,
    DecodeWorkerState,
    Placement,
    PlacementRequest,
    Policy,
    PrefillCost,
    PrefillWorkerState,
    Rejection,
    RunningRequest,
    predicted_tpot,
    predicted_ttft,
    to_compute,
)


@dataclass
class _Pending:
    at: float  # placement time (coordinator clock)
    prompt_tokens: int
    max_tokens: int
    tpot_slo: float
    queued: bool = True  # still counted in P's queue (until its predicted first token)
    queue_tokens: int = 0  # what P computes of it (the prompt less what P had cached)
    running: bool = True  # still counted in D's batch (until its predicted last token)


@dataclass
class _Sampled:
    """The last heartbeat's queue: counted until the cost model says it has been worked through."""
    tokens: int = 0
    prompts: int = 0
    queued: bool = True


@dataclass(eq=False)
class WorkerView:
    info: WorkerInfo
    load: Load | None = None
    heard_at: float = 0.0  # coordinator clock of the last heartbeat
    pending: list[_Pending] = field(default_factory=list)
    sampled: _Sampled = field(default_factory=_Sampled)
    draining: bool = False
    order: int = 0  # registration sequence: the order a scan meets workers in (ties go to the first)
    prefill: PrefillWorkerState | None = None  # its load as the policies rank it, kept current (healthy
    decode: DecodeLoad | None = None  # stays True: placements see only the workers healthy then)
    filed: dict = field(default_factory=dict, repr=False)  # SortedIndex -> (group, entry)


def shape_of(info: WorkerInfo) -> str:
    """A worker's shape, as profiles are keyed in etcd: <role>-tp<T>-pp<P>."""
    return f"{info.role}-tp{info.tp}-pp{info.pp}"


class LiveView:
    def __init__(self, suspect_after: float = 1.0, kv_bandwidth_gb_s: float = 2.0):
        """`kv_bandwidth_gb_s`: what KV pages move at between workers, for the time a prompt's pages take
        (policy.predicted_ttft's transfer term; ~2 GB/s is the ZeroMQ path on loopback here)."""
        if kv_bandwidth_gb_s <= 0:
            raise ValueError(f"kv_bandwidth_gb_s = {kv_bandwidth_gb_s!r}: must be > 0")
        self.suspect_after = suspect_after
        self.kv_bandwidth = kv_bandwidth_gb_s * 1e9
        self.workers: dict[str, WorkerView] = {}
        self.shape_profiles: dict[tuple[str, str], dict] = {}  # (model, shape) -> stored profile
        # one instance per distinct cost model, so the indexes' keys compare them by identity
        self._costs: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self.prefill_costs: dict[str, PrefillCost] = {}  # by worker id (from profiles)
        self.decode_costs: dict[str, DecodeCost] = {}
        self._order = itertools.count()
        self._indexes: dict[str, dict] = {side: {} for side in SIDES}  # side -> {key: SortedIndex}
        self._floors: dict[tuple, object] = {}  # (side, group) -> least cost coefficients there
        self._models: dict[str, int] = {}  # model -> registered workers serving it
        self._ends: list[tuple] = []  # heap of (time, seq, view, pending, side): a prediction says it is over
        self._seq = itertools.count()
        # always kept, as counts and health need them; a placement does not move them
        self._steady = {side: (self.index(side, in_scan_order, of_view=True),
                               self.index(side, by_heartbeat, of_view=True)) for side in SIDES}

    # ---- inputs ----------------------------------------------------------------------------------
    def registered(self, info: WorkerInfo, now: float) -> None:
        wid = info.worker_id
        v = self.workers.get(wid)
        if v is None:
            v = self.workers[wid] = WorkerView(info, heard_at=now, order=next(self._order))
        else:
            self._count_model(v.info.model, -1)
            v.info = info
        self._count_model(info.model, 1)
        # the stored profile of the worker's (model, shape) wins over its own start-up one: workers of
        # one shape share one cost model (their own measurements differ only by noise)
        prof = self.shape_profiles.get((info.model, shape_of(info))) or info.profile or {}
        if prof.get("prefill"):
            self.prefill_costs[wid] = self._cost(PrefillCost(**prof["prefill"]))
        if prof.get("decode"):
            self.decode_costs[wid] = self._cost(DecodeCost(**prof["decode"]))
        v.prefill = PrefillWorkerState(wid, self.prefill_costs.get(wid) or self._cost(PrefillCost()),
                                       transfer_s_per_token=self._transfer(info))
        v.decode = DecodeLoad(wid, self.decode_costs.get(wid) or self._cost(DecodeCost()))
        self._floors.clear()
        self._recount(v)

    def _transfer(self, info: WorkerInfo) -> float:
        """Seconds a prompt token's KV (every layer) takes on the wire from this worker."""
        return info.layout.token_bytes() / self.kv_bandwidth

    def _cost(self, c):
        """The one instance of cost model `c` (equal models are the same object)."""
        return self._costs.setdefault(c, c)

    def deregistered(self, worker_id: str) -> WorkerView | None:
        """The worker is dead (its lease is gone). Returns what was known of it."""
        self.prefill_costs.pop(worker_id, None)
        self.decode_costs.pop(worker_id, None)
        v = self.workers.pop(worker_id, None)
        if v is not None:
            self._count_model(v.info.model, -1)
            self._floors.clear()
            self._refile(v)
        return v

    def heartbeat(self, load: Load, now: float, sampled_at: float | None = None) -> None:
        """`sampled_at`: when the worker took the sample, on the coordinator's clock (defaults to
        `now`); placements made before it are now included in the load and stop being counted."""
        v = self.workers.get(load.worker_id)
        if v is None:
            return  # not (or no longer) registered: ignored
        self.expire(now)  # also keeps the heap of ends short while no placement comes
        v.load, v.heard_at = load, now
        cutoff = now if sampled_at is None else sampled_at
        kept = []
        for p in v.pending:
            if p.at > cutoff:
                kept.append(p)
            else:  # confirmed: its ends come to nothing
                p.queued = p.running = False
        v.pending = kept
        v.sampled.queued = False
        v.sampled = _Sampled(load.queued_tokens, max(load.num_waiting, 1) if load.queued_tokens else 0)
        if load.queued_tokens:
            c = v.prefill.cost
            end = cutoff + c.queue_seconds(load.queued_tokens, max(load.num_waiting, 1), v.prefill.step_tokens)
            heapq.heappush(self._ends, (end, next(self._seq), v, v.sampled, "queued"))
        self._recount(v)

    def shape_profile(self, model: str, shape: str, profile: dict | None, now: float) -> None:
        """The stored cost model of (model, shape) changed (etcd profiles/): every such worker uses it."""
        key = (model, shape)
        if profile:
            self.shape_profiles[key] = profile
        else:
            self.shape_profiles.pop(key, None)
        for v in list(self.workers.values()):
            if v.info.model == model and shape_of(v.info) == shape:
                self.registered(v.info, now)

    def placed(self, placement: Placement, req: PlacementRequest, now: float) -> None:
        first = now + placement.predicted_ttft
        last = first + max(req.max_tokens - 1, 0) * placement.predicted_tpot
        for wid in dict.fromkeys((placement.prefill, placement.decode)):  # colocated: one worker, counted once
            v = self.workers.get(wid)
            if v is not None:
                role = v.info.role
                pend = _Pending(now, req.prompt_tokens, req.max_tokens, req.tpot_slo,
                                queued=role in SIDES["prefill"], running=role in SIDES["decode"])
                v.pending.append(pend)
                if pend.queued:
                    heapq.heappush(self._ends, (first, next(self._seq), v, pend, "queued"))
                    pend.queue_tokens = to_compute(v.prefill, req)
                    v.prefill.queued_tokens += pend.queue_tokens
                    v.prefill.queued_prompts += 1
                if pend.running:
                    heapq.heappush(self._ends, (last, next(self._seq), v, pend, "running"))
                    d = v.decode
                    d.num_running += 1
                    d.total_context += req.prompt_tokens
                    d.free_tokens -= req.prompt_tokens  # reservations: the prompt's KV
                    d.tightest_tpot = min(d.tightest_tpot, req.tpot_slo)
                self._refile(v, load_only=True)

    def drain(self, worker_id: str, draining: bool = True) -> bool:
        v = self.workers.get(worker_id)
        if v is None:
            return False
        v.draining = draining
        self._refile(v)
        return True

    # ---- placement -------------------------------------------------------------------------------
    def place(self, policy: Policy, req: PlacementRequest, now: float, model: str = "", exclude=(),
              scan: bool = False) -> tuple[Placement | Rejection, bool]:
        """One placement decision, counted against its workers if placed: on a prefill and a decode
        worker while there is a healthy one of each, else on one colocated worker (its prefill queue
        and its decode batch must both do). Returns it and whether it is colocated. `scan`: the
        policy's reference `place` on full lists of states (as fast path and benchmarks compare)."""
        exclude = frozenset(exclude)
        self.expire(now)
        if scan:
            return self._place_by_scan(policy, req, now, model, exclude)
        ps = Candidates(self, "prefill", ("prefill",), model, now, exclude)
        ds = Candidates(self, "decode", ("decode",), model, now, exclude)
        colocated = False
        if not (ps.exists() and ds.exists()):
            cp = Candidates(self, "prefill", ("colocated",), model, now, exclude)
            if cp.exists():
                ps, ds, colocated = cp, Candidates(self, "decode", ("colocated",), model, now, exclude), True
            elif ps.exists() or ds.exists():
                return self._cover(req, now, model, exclude)
        result = policy.place_in(req, ps, ds)
        if colocated and isinstance(result, Placement) and result.decode != result.prefill:
            result = policy.place_in(req, ps.only(result.decode), ds)
        if isinstance(result, Placement):
            self.placed(result, req, now)
            colocated = result.prefill == result.decode  # also: a decode worker prefilling locally
        return result, colocated

    def _place_by_scan(self, policy, req, now, model, exclude):
        prefills = self.prefill_states(now, ("prefill",), model, exclude)
        decodes = self.decode_states(now, ("decode",), model, exclude)
        colocated = False
        if not (any(p.healthy for p in prefills) and any(d.healthy for d in decodes)):
            cp = self.prefill_states(now, ("colocated",), model, exclude)
            if any(p.healthy for p in cp):
                prefills, decodes, colocated = cp, self.decode_states(now, ("colocated",), model, exclude), True
            elif any(p.healthy for p in prefills) or any(d.healthy for d in decodes):
                return self._cover(req, now, model, exclude)
        if colocated:
            healthy = {d.worker_id for d in decodes if d.healthy}
            prefills = [p for p in prefills if p.worker_id in healthy]
            result = policy.place(req, prefills, decodes)
            if isinstance(result, Placement) and result.decode != result.prefill:
                result = policy.place(req, [p for p in prefills if p.worker_id == result.decode], decodes)
        else:
            result = policy.place(req, prefills, decodes)
        if isinstance(result, Placement):
            self.placed(result, req, now)
            colocated = result.prefill == result.decode
        return result, colocated

    def _cover(self, req: PlacementRequest, now: float, model: str, exclude) -> tuple[Placement | Rejection, bool]:
        """Role cover: no healthy prefill + decode pair and no colocated worker, so one worker of the
        role that is left serves the whole request: a prefill worker decodes too, or a decode worker
        prefills too (both run the whole engine). Best effort: no SLO is checked (the alternative is no
        service); the least loaded such worker takes it."""
        ps = [p for p in self.prefill_states(now, ("prefill",), model, exclude) if p.healthy]
        if ps:
            p = min(ps, key=lambda p: predicted_ttft(p, req))  # the first registered among equals
            result: Placement | Rejection = Placement(p.worker_id, p.worker_id, predicted_ttft(p, req), 0.0)
        else:
            ds = [d for d in self.decode_states(now, ("decode",), model, exclude)
                  if d.healthy and d.free_tokens >= req.prompt_tokens]
            if not ds:
                return Rejection("no healthy prefill worker, and no decode worker has room for the prompt"), True
            d = min(ds, key=lambda d: (d.num_running, d.total_context))
            result = Placement(d.worker_id, d.worker_id, 0.0, predicted_tpot(d, req))
        self.placed(result, req, now)
        return result, True

    def expire(self, now: float) -> None:
        """Stops counting the placements whose predicted first token (at P) or last token (at D) is past,
        and the queued tokens of heartbeats the workers should have worked through."""
        touched = {}
        while self._ends and self._ends[0][0] <= now:
            _, _, v, what, side = heapq.heappop(self._ends)
            if not getattr(what, side):  # confirmed by a heartbeat, or a heartbeat since
                continue
            setattr(what, side, False)
            if self.workers.get(v.info.worker_id) is not v:
                continue
            if side == "queued":  # what _recount would count less, taken off in place
                tokens, prompts = (what.tokens, what.prompts) if isinstance(what, _Sampled) else (what.queue_tokens, 1)
                v.prefill.queued_tokens -= tokens
                v.prefill.queued_prompts -= prompts
            else:
                d = v.decode
                d.num_running -= 1
                d.total_context -= what.prompt_tokens
                d.free_tokens += what.prompt_tokens
            touched.setdefault(id(v), (v, set()))[1].add("prefill" if side == "queued" else "decode")
        for v, sides in touched.values():
            v.pending = [p for p in v.pending if p.queued or p.running]
            if "decode" in sides:
                v.decode.tightest_tpot = min((p.tpot_slo for p in v.pending if p.running), default=INF)
            self._refile(v, load_only=True, sides=sides)

    # ---- queries ---------------------------------------------------------------------------------
    def suspects(self, now: float) -> list[str]:
        return [wid for wid, v in self.workers.items() if now - v.heard_at > self.suspect_after]

    def _healthy(self, v: WorkerView, now: float) -> bool:
        return not v.draining and now - v.heard_at <= self.suspect_after and v.load is not None

    @staticmethod
    def _wanted(v: WorkerView, roles: tuple[str, ...], model: str, exclude) -> bool:
        return v.info.role in roles and (not model or v.info.model == model) and v.info.worker_id not in exclude

    def models(self) -> set[str]:
        return set(self._models)

    def prefill_states(self, now: float, roles: tuple[str, ...] = ("prefill", "colocated"), model: str = "",
                       exclude=()) -> list[PrefillWorkerState]:
        self.expire(now)
        return [self.prefill_state(v, now) for v in self.workers.values() if self._wanted(v, roles, model, exclude)]

    def decode_states(self, now: float, roles: tuple[str, ...] = ("decode", "colocated"), model: str = "",
                      exclude=()) -> list[DecodeWorkerState]:
        self.expire(now)
        return [self.decode_state(v, now) for v in self.workers.values() if self._wanted(v, roles, model, exclude)]

    def prefill_state(self, v: WorkerView, now: float) -> PrefillWorkerState:
        wid = v.info.worker_id
        queued, prompts = _queue(v)
        return PrefillWorkerState(wid, self.prefill_costs.get(wid, PrefillCost()), queued, self._healthy(v, now),
                                  self._transfer(v.info), queued_prompts=prompts)

    def decode_state(self, v: WorkerView, now: float) -> DecodeWorkerState:
        wid, load = v.info.worker_id, v.load
        running = [RunningRequest(0, float("inf"))] * (load.num_running if load else 0)
        running += [RunningRequest(p.prompt_tokens, p.tpot_slo) for p in v.pending if p.running]
        free = (load.free_blocks * v.info.block_size if load else 0) \
            - sum(p.prompt_tokens for p in v.pending if p.running)  # reservations: the prompt's KV
        return DecodeWorkerState(wid, self.decode_costs.get(wid, DecodeCost()), running, free,
                                 healthy=self._healthy(v, now))

    # ---- indexes (coordinator/candidates.py) -----------------------------------------------------
    def index(self, side: str, key, of_view: bool = False) -> SortedIndex:
        """The index of `side` sorted by key(record) (key(view) `of_view`), built on first use and kept
        current from then on."""
        idx = self._indexes[side].get(key)
        if idx is None:
            idx = self._indexes[side][key] = SortedIndex(key if of_view else _of_record(key, side))
            for v in self.workers.values():
                idx.file(v, self._group(v, side))
        return idx

    def floor(self, side: str, groups) -> PrefillWorkerState | DecodeLoad:
        """A record of `side` whose cost coefficients are each the least among the registered workers
        of `groups`."""
        recs = []
        for g in groups:
            rec = self._floors.get((side, g))
            if rec is None:
                rec = self._floors[(side, g)] = _least([getattr(v, side) for v in self.workers.values()
                                                        if (v.info.model, v.info.role) == g])
            recs.append(rec)
        return _least(recs)

    def _group(self, v: WorkerView, side: str) -> tuple[str, str] | None:
        """Where v is filed on `side`: under (model, role) once heard from, unless draining."""
        if v.info.role in SIDES[side] and v.load is not None and not v.draining \
                and self.workers.get(v.info.worker_id) is v:
            return (v.info.model, v.info.role)
        return None

    def _refile(self, v: WorkerView, load_only: bool = False, sides=SIDES) -> None:
        """Files v anew in every index (of `sides`); `load_only`: only its load changed (a placement)."""
        for side in sides:
            indexes = self._indexes[side]
            group = self._group(v, side)
            for idx in indexes.values():
                if not (load_only and idx in self._steady[side]):
                    idx.file(v, group)

    def _recount(self, v: WorkerView, load_only: bool = False) -> None:
        """v's records from its last heartbeat and its placements since (what prefill_state /
        decode_state list), then refiled."""
        load, pending = v.load, [p for p in v.pending if p.running]
        prompts = sum(p.prompt_tokens for p in pending)
        v.prefill.queued_tokens, v.prefill.queued_prompts = _queue(v)
        d = v.decode
        d.num_running = (load.num_running if load else 0) + len(pending)
        d.total_context = prompts  # what the heartbeat counts is of unknown context: 0
        d.free_tokens = (load.free_blocks * v.info.block_size if load else 0) - prompts
        d.tightest_tpot = min((p.tpot_slo for p in pending), default=INF)
        self._refile(v, load_only)

    def _count_model(self, model: str, n: int) -> None:
        left = self._models.get(model, 0) + n
        if left:
            self._models[model] = left
        else:
            self._models.pop(model, None)


def _queue(v: WorkerView) -> tuple[int, int]:
    """Prompt tokens queued at v and the prompts they are of: the last heartbeat's (its waiting prompts;
    one if only a prompt mid-prefill is left) and the placements counted since."""
    pending = [p for p in v.pending if p.queued]
    tokens, prompts = (v.sampled.tokens, v.sampled.prompts) if v.sampled.queued else (0, 0)
    return tokens + sum(p.queue_tokens for p in pending), prompts + len(pending)


def _of_record(key, side: str):
    return lambda v: key(getattr(v, side))


def _least(recs: list):
    """A record like recs[0] with each cost coefficient (and transfer rate) the least among recs."""
    if len(recs) == 1:
        return recs[0]
    cost = recs[0].cost
    least = type(cost)(*(min(getattr(r.cost, f.name) for r in recs) for f in fields(cost)))
    if isinstance(recs[0], PrefillWorkerState):
        return PrefillWorkerState("", least, transfer_s_per_token=min(r.transfer_s_per_token for r in recs))
    return DecodeLoad("", least)
