"""Placement policies: pure functions of the cluster's live view (no I/O, no etcd, no torch).

DESIGN.md §6. Cost models (DistServe's form): prefill time of n prompt tokens a + b*n + c*n^2;
decode step time base + per_seq*batch + per_token*total_context. For a request the `slo` policy
predicts, per prefill worker, TTFT = queue wait + prefill + first-layer transfer, and per decode
worker the step time after adding it, which must stay within the TPOT SLO of the new request *and*
of every request already running there. P and D are chosen independently (TTFT depends on P alone,
TPOT on D alone), so a placement is O(P + D). The pair with the most slack wins; none: rejected
early with a reason (HTTP 429 upstream), as Mooncake does. `least-loaded` and `round-robin` are the
baselines.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class PrefillCost:
    a: float = 0.005  # seconds
    b: float = 2e-4  # seconds per token
    c: float = 0.0  # seconds per token^2

    def seconds(self, n: int) -> float:
        return self.a + self.b * n + self.c * n * n


@dataclass(frozen=True)
class DecodeCost:
    base: float = 0.02
    per_seq: float = 0.001
    per_token: float = 1e-6  # per token of context summed over the batch

    def step_seconds(self, batch: int, total_context: int) -> float:
        return self.base + self.per_seq * batch + self.per_token * total_context


@dataclass
class PrefillWorkerState:
    worker_id: str
    cost: PrefillCost = field(default_factory=PrefillCost)
    queued_tokens: int = 0  # prompt tokens waiting or being computed there
    healthy: bool = True  # False: suspect (missed heartbeats) or draining: no new work
    transfer_s_per_token: float = 0.0  # first layer's KV on the wire, per prompt token


@dataclass
class RunningRequest:
    context: int
    tpot_slo: float


@dataclass
class DecodeWorkerState:
    worker_id: str
    cost: DecodeCost = field(default_factory=DecodeCost)
    running: list[RunningRequest] = field(default_factory=list)
    free_tokens: int = 1 << 30  # KV capacity left
    max_batch: int = 256
    healthy: bool = True

    @property
    def total_context(self) -> int:
        return sum(r.context for r in self.running)

    @property
    def tightest_tpot(self) -> float:
        return min((r.tpot_slo for r in self.running), default=float("inf"))


@dataclass(frozen=True)
class PlacementRequest:
    prompt_tokens: int
    max_tokens: int
    ttft_slo: float = float("inf")  # seconds
    tpot_slo: float = float("inf")


@dataclass(frozen=True)
class Placement:
    prefill: str
    decode: str
    predicted_ttft: float
    predicted_tpot: float


@dataclass(frozen=True)
class Rejection:
    reason: str
    retry_after: float = 1.0  # seconds


def predicted_ttft(p: PrefillWorkerState, req: PlacementRequest) -> float:
    wait = p.cost.seconds(p.queued_tokens) if p.queued_tokens else 0.0
    return wait + p.cost.seconds(req.prompt_tokens) + p.transfer_s_per_token * req.prompt_tokens


def predicted_tpot(d: DecodeWorkerState, req: PlacementRequest) -> float:
    return d.cost.step_seconds(len(d.running) + 1, d.total_context + req.prompt_tokens)


def _fits(d: DecodeWorkerState, req: PlacementRequest) -> bool:
    """Room for the prompt's KV: the reservation D makes. Its batch limit and the request's growth are
    soft (D queues beyond max_num_seqs and preempts when KV runs out), so they are preferences."""
    return d.healthy and d.free_tokens >= req.prompt_tokens


def _candidates(decodes: list[DecodeWorkerState], req: PlacementRequest) -> list[DecodeWorkerState]:
    """Decode workers worth considering, best tier first: room for the whole request in the batch;
    room for the prompt; and, for a request without SLOs, the healthy worker with the most free KV
    (the load reports are a beat old; if it really is full it refuses, and the gateway retries
    shortly): requests without SLOs wait rather than fail, as in vLLM. A request with SLOs is rejected
    early instead (Mooncake)."""
    fits = [d for d in decodes if _fits(d, req)]
    whole = [d for d in fits if len(d.running) < d.max_batch and d.free_tokens >= req.prompt_tokens + req.max_tokens]
    if whole or fits:
        return whole or fits
    if req.ttft_slo == float("inf") and req.tpot_slo == float("inf"):
        healthy = [d for d in decodes if d.healthy]
        return [max(healthy, key=lambda d: (d.free_tokens, d.worker_id))] if healthy else []
    return []


class Policy:
    name = "base"

    def place(self, req: PlacementRequest, prefills: list[PrefillWorkerState],
              decodes: list[DecodeWorkerState]) -> Placement | Rejection:
        raise NotImplementedError


class RoundRobin(Policy):
    name = "round-robin"

    def __init__(self):
        self._p = self._d = 0

    def place(self, req, prefills, decodes):
        ps = [p for p in prefills if p.healthy]
        ds = _candidates(decodes, req)
        if not ps or not ds:
            return Rejection("no healthy prefill worker" if not ps else "no decode worker has room")
        p, d = ps[self._p % len(ps)], ds[self._d % len(ds)]
        self._p, self._d = self._p + 1, self._d + 1
        return Placement(p.worker_id, d.worker_id, predicted_ttft(p, req), predicted_tpot(d, req))


class LeastLoaded(Policy):
    name = "least-loaded"

    def place(self, req, prefills, decodes):
        ps = [p for p in prefills if p.healthy]
        ds = _candidates(decodes, req)
        if not ps or not ds:
            return Rejection("no healthy prefill worker" if not ps else "no decode worker has room")
        p = min(ps, key=lambda w: (w.queued_tokens, w.worker_id))
        d = min(ds, key=lambda w: (len(w.running), w.total_context, w.worker_id))
        return Placement(p.worker_id, d.worker_id, predicted_ttft(p, req), predicted_tpot(d, req))


class SloAware(Policy):
    name = "slo"

    def place(self, req, prefills, decodes):
        best_p, p_slack, best_ttft = None, -1.0, float("inf")
        for p in prefills:
            if not p.healthy:
                continue
            ttft = predicted_ttft(p, req)
            slack = 1.0 - ttft / req.ttft_slo if req.ttft_slo != float("inf") else 1.0 / (1.0 + ttft)
            if ttft <= req.ttft_slo and slack > p_slack:
                best_p, p_slack, best_ttft = p, slack, ttft
        if best_p is None:
            fastest = min((predicted_ttft(p, req) for p in prefills if p.healthy), default=None)
            why = "no healthy prefill worker" if fastest is None else \
                f"no prefill worker can meet TTFT {req.ttft_slo * 1e3:.0f} ms (best predicted {fastest * 1e3:.0f} ms)"
            return Rejection(why, retry_after=max(1.0, fastest or 1.0))
        best_d, d_slack, best_tpot = None, -1.0, float("inf")
        candidates = _candidates(decodes, req)
        if not candidates:
            return Rejection("no healthy decode worker" if not any(d.healthy for d in decodes)
                             else "no decode worker has room for the prompt's KV")
        for d in candidates:
            tpot = predicted_tpot(d, req)
            limit = min(req.tpot_slo, d.tightest_tpot)  # nobody already running may be pushed over
            if tpot > limit:
                continue
            slack = 1.0 - tpot / limit if limit != float("inf") else 1.0 / (1.0 + tpot)
            if slack > d_slack:
                best_d, d_slack, best_tpot = d, slack, tpot
        if best_d is None:
            return Rejection(f"no decode worker can take it within TPOT {req.tpot_slo * 1e3:.0f} ms "
                             "without breaking a running request's SLO")
        return Placement(best_p.worker_id, best_d.worker_id, best_ttft, best_tpot)


POLICIES = {"slo": SloAware, "least-loaded": LeastLoaded, "round-robin": RoundRobin}


def make_policy(name: str) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"placement policy {name!r} is not one of {sorted(POLICIES)}")
    return POLICIES[name]()


def apply(placement: Placement, req: PlacementRequest, prefills: dict[str, PrefillWorkerState],
          decodes: dict[str, DecodeWorkerState]) -> None:
    """Counts a placement in the live view until the workers' next heartbeats confirm it, so a burst
    does not pile onto one worker."""
    prefills[placement.prefill].queued_tokens += req.prompt_tokens
    d = decodes[placement.decode]
    d.running.append(RunningRequest(req.prompt_tokens, req.tpot_slo))
    d.free_tokens -= req.prompt_tokens
