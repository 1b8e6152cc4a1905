"""A discrete-event simulator of the disaggregated cluster (DESIGN.md §8). Pure Python, no I/O.

It places every request with the coordinator's own policy code (coordinator/policy.py) on states
built from the simulated workers, and times them with the same cost models the coordinator uses:

- prefill worker: continuous batching as the engine does it: a step takes the waiting prompts first
  come, first served, up to `prefill_step_tokens` tokens (the last one taken may be a chunk of its
  prompt: chunked prefill), and lasts a + b·(tokens) + c·Σ(its prompts' share of n²) (PrefillCost:
  a chunk from position s to e costs c·(e² - s²), so a prompt costs c·n² in all); a prompt's first
  token is out when its last chunk is done, and reaches the client `hop` later (the cost model's
  per-request overhead: gateway, placement, the token's way back);
  With pipeline stages (PrefillCost.stages), a step takes a + (b·tokens + c·Σ)/stages per stage and
  `stage_hop` between stages, and the next step starts when the first stage is free;
- KV transfer: `transfer_s_per_token` × n after the prefill (the whole KV, no overlap with the
  prefill: conservative), before the first token is out (TTFT) and decoding starts, as the policy
  predicts TTFT;
- decode worker: continuous batching; a step takes base + per_seq·B + per_token·(total context)
  (DecodeCost) and gives every running request one token; a request joins at the next step if its
  whole KV fits (`kv_capacity_tokens` >= prompt + output of everything running; no preemption is
  modelled), else it waits, first come first served.

Every later token also reaches the client `hop` after the decode step that made it (TPOT is
unchanged by it). The policy sees each worker as the live view would with perfect heartbeats: P's
queued tokens and prompts, D's running and waiting requests plus those placed there and not arrived
yet (their prompts' KV reserved). Requests the policy rejects count as failing their SLOs.
Everything is deterministic for a seed.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from dataclasses import dataclass, field

from coordinator.policy import (
    DecodeCost,
    DecodeWorkerState,
    Placement,
    PlacementRequest,
    PrefillCost,
    PrefillWorkerState,
    RunningRequest,
    make_policy,
)


@dataclass
class Workload:
    rate: float  # requests per second
    prompt_mean: float = 512
    output_mean: float = 128
    prompt_sigma: float = 0.0  # log-normal sigma (0: every request has the mean)
    output_sigma: float = 0.0
    arrival: str = "poisson"  # or "gamma", "uniform" (deterministic gaps)
    burstiness: float = 1.0
    samples: list[tuple[int, int]] | None = None  # (prompt, output) pairs from a dataset, cycled


@dataclass
class SimCluster:
    prefill: list[PrefillCost]  # one cost model per prefill worker
    decode: list[DecodeCost]
    kv_capacity_tokens: int = 1 << 30  # per decode worker
    transfer_s_per_token: float = 0.0
    max_batch: int = 256
    policy: str = "slo"
    prefill_step_tokens: int = 2048  # the prefill engine's token budget per step (max_num_batched_tokens)


@dataclass
class SimRequest:
    rid: int
    arrival: float
    prompt: int
    output: int
    ttft_slo: float
    tpot_slo: float
    first_token: float | None = None
    finish: float | None = None
    rejected: bool = False
    generated: int = 0
    hop: float = 0.0  # its prefill worker's: how much later than made each token reaches the client

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def tpot(self) -> float | None:
        if self.finish is None or self.first_token is None:
            return None
        return (self.finish - self.first_token) / max(self.output - 1, 1)

    def met(self) -> bool:
        return (not self.rejected and self.ttft is not None and self.tpot is not None
                and self.ttft <= self.ttft_slo and self.tpot <= self.tpot_slo)


@dataclass
class _Prefiller:
    cost: PrefillCost
    waiting: deque = field(default_factory=deque)  # [request, decode worker, tokens scheduled, computed]
    stepping: bool = False
    queued: int = 0  # prompt tokens not computed yet (waiting or in the step under way)

    def state(self, i: int, cluster: SimCluster) -> PrefillWorkerState:
        return PrefillWorkerState(str(i), self.cost, self.queued, True, cluster.transfer_s_per_token,
                                  len(self.waiting), cluster.prefill_step_tokens)


@dataclass
class _Decoder:
    cost: DecodeCost
    running: list[SimRequest] = field(default_factory=list)
    waiting: list[SimRequest] = field(default_factory=list)
    assigned: list[SimRequest] = field(default_factory=list)  # placed here, still prefilling or in transfer
    stepping: bool = False
    used: int = 0  # KV tokens reserved by running requests (prompt + output each)

    def state(self, j: int, cluster: SimCluster) -> DecodeWorkerState:
        pending = self.waiting + self.assigned
        return DecodeWorkerState(str(j), self.cost,
                                 [RunningRequest(q.prompt + q.generated, q.tpot_slo) for q in self.running + pending],
                                 cluster.kv_capacity_tokens - self.used - sum(q.prompt for q in pending),
                                 cluster.max_batch)


def generate(w: Workload, n: int, seed: int = 0) -> list[tuple[float, int, int]]:
    rng = random.Random(seed)
    out, t = [], 0.0
    for i in range(n):
        if w.arrival == "uniform":
            t += 1.0 / w.rate
        elif w.arrival == "gamma":
            t += rng.gammavariate(w.burstiness, 1.0 / (w.rate * w.burstiness))
        else:
            t += rng.expovariate(w.rate)
        if w.samples:
            p, o = w.samples[i % len(w.samples)]
        else:
            p = _lognormal(rng, w.prompt_mean, w.prompt_sigma)
            o = _lognormal(rng, w.output_mean, w.output_sigma)
        out.append((t, p, o))
    return out


def _lognormal(rng: random.Random, mean: float, sigma: float) -> int:
    if sigma <= 0:
        return max(1, int(round(mean)))
    return max(1, int(round(rng.lognormvariate(math.log(mean) - sigma * sigma / 2, sigma))))


def simulate(cluster: SimCluster, arrivals: list[tuple[float, int, int]], ttft_slo: float = math.inf,
             tpot_slo: float = math.inf) -> list[SimRequest]:
    policy = make_policy(cluster.policy)
    prefillers = [_Prefiller(c) for c in cluster.prefill]
    decoders = [_Decoder(c) for c in cluster.decode]
    reqs = [SimRequest(i, t, p, o, ttft_slo, tpot_slo) for i, (t, p, o) in enumerate(arrivals)]
    events: list = []  # (time, seq, kind, payload)
    seq = 0

    def push(t, kind, payload):
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, kind, payload))

    for r in reqs:
        push(r.arrival, "arrive", r)
    while events:
        now, _, kind, x = heapq.heappop(events)
        if kind == "arrive":
            r = x
            got = policy.place(PlacementRequest(r.prompt, r.output, r.ttft_slo, r.tpot_slo),
                               [p.state(i, cluster) for i, p in enumerate(prefillers)],
                               [d.state(j, cluster) for j, d in enumerate(decoders)])
            if not isinstance(got, Placement):
                r.rejected = True
                continue
            p, d = prefillers[int(got.prefill)], decoders[int(got.decode)]
            p.waiting.append([r, d, 0, 0])
            p.queued += r.prompt
            d.assigned.append(r)
            if not p.stepping:  # the next step starts now: whatever else arrives at this instant joins it
                p.stepping = True
                push(now, "prefill", p)
        elif kind == "prefill":  # a prefill step starts
            p = x
            batch, budget, work = [], cluster.prefill_step_tokens, 0.0
            for item in p.waiting:
                if budget <= 0:
                    break
                r, _, done, _ = item
                take = min(r.prompt - done, budget)
                if take <= 0:
                    continue  # all of it in steps under way (pipelined)
                budget -= take
                item[2] += take
                work += p.cost.b * take + p.cost.c * ((done + take) ** 2 - done ** 2)
                batch.append((item, take))
            if batch:
                stage = p.cost.a + work / p.cost.stages
                push(now + p.cost.stages * stage + (p.cost.stages - 1) * p.cost.stage_hop, "prefilled", (p, batch))
                push(now + stage, "prefill", p)  # the first stage is free for the next step
            else:
                p.stepping = False
        elif kind == "prefilled":  # a prefill step ends
            p, batch = x
            for item, take in batch:
                item[3] += take
                p.queued -= take
                r, d, _, done = item
                if done < r.prompt:
                    continue  # chunked: the rest in a later step
                p.waiting.remove(item)
                r.hop = p.cost.hop
                ready = now + cluster.transfer_s_per_token * r.prompt
                r.first_token = ready + r.hop
                r.generated = 1
                if r.output <= 1:
                    r.finish = r.first_token
                    d.assigned.remove(r)
                    continue
                push(ready, "transferred", (r, d))
            if not p.stepping:
                p.stepping = True
                push(now, "prefill", p)
        elif kind == "transferred":
            r, d = x
            d.assigned.remove(r)
            d.waiting.append(r)
            if not d.stepping:  # the next step starts now: whatever else lands at this instant joins it
                d.stepping = True
                push(now, "start", d)
        elif kind == "start":
            d = x
            _admit(d, cluster, now)
            if d.running:
                push(now + _step_time(d), "step", d)
            else:
                d.stepping = False
        elif kind == "step":
            d = x
            for q in d.running:
                q.generated += 1
            done = [q for q in d.running if q.generated >= q.output]
            for q in done:
                q.finish = now + q.hop
                d.used -= q.prompt + q.output
            d.running = [q for q in d.running if q.generated < q.output]
            _admit(d, cluster, now)
            if d.running:
                push(now + _step_time(d), "step", d)
            else:
                d.stepping = False
    return reqs


def _admit(d: _Decoder, cluster: SimCluster, now: float) -> None:
    while d.waiting and len(d.running) < cluster.max_batch:
        q = d.waiting[0]
        need = q.prompt + q.output  # its whole KV: the simulator does not model preemption
        if d.running and d.used + need > cluster.kv_capacity_tokens:
            break  # no room: wait for a running request to finish (first come, first served)
        d.waiting.pop(0)
        d.running.append(q)
        d.used += need


def _step_time(d: _Decoder) -> float:
    ctx = sum(q.prompt + q.generated for q in d.running)
    return d.cost.step_seconds(len(d.running), ctx)


def attainment(reqs: list[SimRequest]) -> float:
    return sum(r.met() for r in reqs) / len(reqs) if reqs else 0.0


def goodput(cluster: SimCluster, w: Workload, ttft_slo: float, tpot_slo: float, target: float,
            n: int = 400, seed: int = 0, hi: float | None = None, iters: int = 12) -> float:
    """DistServe goodput: the highest rate at which at least `target` of requests meet both SLOs
    (bisection over the rate; the same arrival seed at every rate)."""
    def ok(rate: float) -> bool:
        wr = Workload(**{**w.__dict__, "rate": rate})
        return attainment(simulate(cluster, generate(wr, n, seed), ttft_slo, tpot_slo)) >= target
    lo = 0.0
    hi = hi or max(1.0, w.rate)
    while ok(hi) and hi < 1e6:  # grow until it fails
        lo, hi = hi, hi * 2
    if lo == 0.0 and not ok(hi / 1024):
        return 0.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo
