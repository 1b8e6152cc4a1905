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

Prefix reuse (requests with a `Prefix`: coordinator/conversations.py's turns; single-turn workloads
have none, and nothing below touches them). Every worker, prefill "p<i>" and decode "d<j>", has a
PrefixCache of full blocks (coordinator/prefix_cache.py):

    arrive      cached = {worker: leading prompt blocks it holds × block_size}  (the KV index, exact)
                policy.place(PlacementRequest(..., cached)) → P + D, or D + D (local prefill)
                D links (pins) the blocks it holds: their KV is never shipped
    P's step    a prompt's first step looks P's cache up: it computes from the first block P lacks
                (a chunk s..e costs b·(e - s) + c·(e² - s²)); when done P stores the prompt's blocks
    transfer    transfer_s_per_token × (prompt - what D holds): `shipped`
    D local     the decode step that admits it also prefills what D lacks: it lasts
                P's seconds(those tokens) longer, for every request in the batch; no transfer
    D finish    D stores the blocks of prompt + output (all but the last token made have KV)

A prefill worker's cache holds `prefill_kv_capacity_tokens`; a decode worker's lives in the KV room no
request has reserved (capacity - running requests' prompt + output - placed requests' prompts), so
it shrinks as the batch grows. Not modelled: the prefill worker's KV of prompts in flight, the
blocks a running request fills before it finishes (they are stored when it does), preemption, and the
index's lag (events here are instant and never lost).
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from coordinator.policy import (
    DecodeCost,
    DecodeWorkerState,
    Placement,
    PlacementRequest,
    PrefillCost,
    PrefillWorkerState,
    RunningRequest,
    held,
    make_policy,
    to_compute,
)
from coordinator.prefix_cache import Prefix, PrefixCache


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
    # prefix caches (requests with a Prefix only: conversations.py's turns)
    prefix_caching: bool = True  # False: no worker caches a block
    block_size: int = 16
    prefill_kv_capacity_tokens: int = 1 << 30  # per prefill worker: its prefix cache's room
    local_prefill_tokens: int | None = None  # the slo policy's local prefill threshold (None: its cost model)


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
    conversation: int | None = None
    turn: int = 0  # 0: a conversation's first
    prefix: Prefix | None = None  # None: no block of it is cached anywhere (single-turn workloads)
    hit: int = 0  # prompt tokens the worker that prefilled it found in its prefix cache
    held: int = 0  # prompt tokens its decode worker held at reservation (linked, not shipped)
    shipped: int = 0  # prompt tokens whose KV went from the prefill worker to the decode worker
    local: bool = False  # prefilled by its decode worker (conditional disaggregation)
    linked: int = 0  # blocks of the decode worker's cache it links (pinned until it finishes)

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
class _Job:
    """A prompt at a prefill worker."""
    req: SimRequest
    decoder: _Decoder
    planned: int  # the tokens the placement counted in the worker's queue
    scheduled: int = 0  # prompt tokens in steps started (from the cache hit on)
    computed: int = 0  # prompt tokens in steps done
    started: bool = False  # its cache looked up (at its first step, as the engine does)


@dataclass
class _Prefiller:
    wid: str
    cost: PrefillCost
    cache: PrefixCache
    waiting: deque = field(default_factory=deque)  # _Jobs, first come first served
    stepping: bool = False
    queued: int = 0  # prompt tokens not computed yet (waiting or in the step under way)

    def state(self, cluster: SimCluster) -> PrefillWorkerState:
        return PrefillWorkerState(self.wid, self.cost, self.queued, True, cluster.transfer_s_per_token,
                                  len(self.waiting), cluster.prefill_step_tokens)


@dataclass
class _Decoder:
    wid: str
    cost: DecodeCost
    cache: PrefixCache
    running: list[SimRequest] = field(default_factory=list)
    waiting: list[SimRequest] = field(default_factory=list)
    assigned: list[SimRequest] = field(default_factory=list)  # placed here, still prefilling or in transfer
    stepping: bool = False
    used: int = 0  # KV tokens reserved by running requests (prompt + output each)

    def free_tokens(self, cluster: SimCluster) -> int:
        return cluster.kv_capacity_tokens - self.used - sum(q.prompt for q in self.waiting + self.assigned)

    def state(self, cluster: SimCluster) -> DecodeWorkerState:
        pending = self.waiting + self.assigned
        return DecodeWorkerState(self.wid, self.cost,
                                 [RunningRequest(q.prompt + q.generated, q.tpot_slo) for q in self.running + pending],
                                 self.free_tokens(cluster), cluster.max_batch)

    def fit_cache(self, cluster: SimCluster) -> None:
        """Its prefix cache lives in the KV room no request has reserved."""
        if len(self.cache):
            self.cache.resize(self.free_tokens(cluster) // cluster.block_size)


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
            p = lognormal(rng, w.prompt_mean, w.prompt_sigma)
            o = lognormal(rng, w.output_mean, w.output_sigma)
        out.append((t, p, o))
    return out


def lognormal(rng: random.Random, mean: float, sigma: float, most: int | None = None) -> int:
    """A log-normal draw of that mean (sigma 0: the mean), rounded, at least 1 and at most `most`."""
    if sigma <= 0:
        v = max(1, int(round(mean)))
    else:
        v = max(1, int(round(rng.lognormvariate(math.log(mean) - sigma * sigma / 2, sigma))))
    return v if most is None else min(v, most)


def simulate(cluster: SimCluster, arrivals: list[tuple[float, int, int]], ttft_slo: float = math.inf,
             tpot_slo: float = math.inf) -> list[SimRequest]:
    reqs = [SimRequest(i, t, p, o, ttft_slo, tpot_slo) for i, (t, p, o) in enumerate(arrivals)]
    run(cluster, reqs)
    return reqs


def run(cluster: SimCluster, requests: list[SimRequest],
        follow: Callable[[SimRequest], SimRequest | None] | None = None) -> None:
    """Simulates `requests` (arrival times set) to the end, filling in what happened to them. When one
    is over (finished or rejected) `follow(it)`, if given, may answer the next request to send (its
    arrival set, not earlier than the end of this one): a closed loop."""
    _Engine(cluster, follow).run(requests)


class _Engine:
    def __init__(self, cluster: SimCluster, follow):
        c = self.cluster = cluster
        self.follow = follow
        self.policy = make_policy(c.policy, c.local_prefill_tokens)
        room = c.prefill_kv_capacity_tokens // c.block_size if c.prefix_caching else 0
        self.prefillers = [_Prefiller(f"p{i}", cost, PrefixCache(room)) for i, cost in enumerate(c.prefill)]
        self.decoders = [_Decoder(f"d{j}", cost, PrefixCache(0)) for j, cost in enumerate(c.decode)]
        self.workers = {w.wid: w for w in self.prefillers + self.decoders}
        # a decode worker prefills at the cost the policy predicts it with: a prefill worker's model
        self.local_cost = c.prefill[0]
        self.events: list = []  # (time, seq, kind, payload)
        self.seq = 0

    def push(self, t, kind, payload):
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, payload))

    def blocks(self, r: SimRequest, tokens: int) -> list[tuple]:
        if r.prefix is None or not self.cluster.prefix_caching:
            return []
        return r.prefix.blocks(tokens, self.cluster.block_size)

    def run(self, requests: list[SimRequest]) -> None:
        for r in requests:
            self.push(r.arrival, "arrive", r)
        handlers = {"arrive": self.arrive, "prefill": self.prefill_step, "prefilled": self.prefilled,
                    "transferred": self.transferred, "start": self.decode_start, "step": self.decode_step}
        while self.events:
            now, _, kind, x = heapq.heappop(self.events)
            handlers[kind](now, x)

    def over(self, r: SimRequest) -> None:
        nxt = self.follow(r) if self.follow else None
        if nxt is not None:
            self.push(nxt.arrival, "arrive", nxt)

    def arrive(self, now: float, r: SimRequest) -> None:
        c, bs = self.cluster, self.cluster.block_size
        blocks = self.blocks(r, r.prompt)
        cached = {}  # what the KV index would say with perfect events: leading blocks each worker holds
        if blocks:
            for w in self.workers.values():
                n = w.cache.match(blocks)
                if n:
                    cached[w.wid] = n * bs
        req = PlacementRequest(r.prompt, r.output, r.ttft_slo, r.tpot_slo, cached)
        got = self.policy.place(req, [p.state(c) for p in self.prefillers], [d.state(c) for d in self.decoders])
        if not isinstance(got, Placement):
            r.rejected = True
            self.over(r)
            return
        d = self.workers[got.decode]
        r.held, r.linked = held(d.wid, req), cached.get(d.wid, 0) // bs
        d.cache.pin(blocks[:r.linked])  # linked at reservation: its KV is not shipped
        if got.prefill == got.decode:  # conditional disaggregation: d prefills what it does not hold
            r.local, r.hit, r.hop = True, r.held, self.local_cost.hop
            d.waiting.append(r)
            d.fit_cache(c)
            if not d.stepping:
                d.stepping = True
                self.push(now, "start", d)
            return
        p = self.workers[got.prefill]
        planned = to_compute(p.state(c), req)
        p.waiting.append(_Job(r, d, planned))
        p.queued += planned
        d.assigned.append(r)
        d.fit_cache(c)
        if not p.stepping:  # the next step starts now: whatever else arrives at this instant joins it
            p.stepping = True
            self.push(now, "prefill", p)

    def prefill_step(self, now: float, p: _Prefiller) -> None:
        batch, budget, work = [], self.cluster.prefill_step_tokens, 0.0
        for job in p.waiting:
            if budget <= 0:
                break
            if not job.started:
                self.look_up(p, job)
            r, done = job.req, job.scheduled
            take = min(r.prompt - done, budget)
            if take <= 0:
                continue  # all of it in steps under way (pipelined)
            budget -= take
            job.scheduled += take
            # a chunk from s to e costs c·(e² - s²): attention over the cached prefix too
            work += p.cost.b * take + p.cost.c * ((done + take) ** 2 - done ** 2)
            batch.append((job, take))
        if batch:
            stage = p.cost.a + work / p.cost.stages
            self.push(now + p.cost.stages * stage + (p.cost.stages - 1) * p.cost.stage_hop, "prefilled", (p, batch))
            self.push(now + stage, "prefill", p)  # the first stage is free for the next step
        else:
            p.stepping = False

    def look_up(self, p: _Prefiller, job: _Job) -> None:
        """The prompt's first step: what the worker's cache holds now is not computed (at least the last
        token is), and its queue counts what is left instead of what the placement counted."""
        r = job.req
        blocks = self.blocks(r, r.prompt)
        n = p.cache.match(blocks)
        p.cache.touch(blocks[:n])
        r.hit = min(n * self.cluster.block_size, r.prompt - 1)
        job.scheduled = job.computed = r.hit
        job.started = True
        p.queued += r.prompt - r.hit - job.planned

    def prefilled(self, now: float, x) -> None:
        p, batch = x
        c = self.cluster
        for job, take in batch:
            job.computed += take
            p.queued -= take
            r, d = job.req, job.decoder
            if job.computed < r.prompt:
                continue  # chunked: the rest in a later step
            p.waiting.remove(job)
            p.cache.store(self.blocks(r, r.prompt))
            r.hop = p.cost.hop
            r.shipped = r.prompt - r.held
            ready = now + c.transfer_s_per_token * r.shipped
            r.first_token = ready + r.hop
            r.generated = 1
            if r.output <= 1:
                r.finish = r.first_token
                d.assigned.remove(r)
                d.cache.unpin(self.blocks(r, r.prompt)[:r.linked])
                d.fit_cache(c)
                self.over(r)
                continue
            self.push(ready, "transferred", (r, d))
        if not p.stepping:
            p.stepping = True
            self.push(now, "prefill", p)

    def transferred(self, now: float, x) -> None:
        r, d = x
        d.assigned.remove(r)
        d.waiting.append(r)
        if not d.stepping:  # the next step starts now: whatever else lands at this instant joins it
            d.stepping = True
            self.push(now, "start", d)

    def decode_start(self, now: float, d: _Decoder) -> None:
        self.admit(d)
        if d.running:
            self.push(now + self.step_time(d), "step", d)
        else:
            d.stepping = False

    def decode_step(self, now: float, d: _Decoder) -> None:
        c = self.cluster
        for q in d.running:
            q.generated += 1
            if q.generated == 1:  # prefilled locally in this step
                q.first_token = now + q.hop
        done = [q for q in d.running if q.generated >= q.output]
        for q in done:
            q.finish = now + q.hop
            d.used -= q.prompt + q.output
            # decode-side reuse: the blocks of every token computed here (all but the last one made)
            blocks = self.blocks(q, q.prompt + q.generated - 1)
            if blocks:
                d.cache.unpin(blocks[:q.linked])
                d.cache.resize(d.free_tokens(c) // c.block_size)
                d.cache.store(blocks)
        d.running = [q for q in d.running if q.generated < q.output]
        self.admit(d)
        if d.running:
            self.push(now + self.step_time(d), "step", d)
        else:
            d.stepping = False
        for q in done:
            self.over(q)

    def admit(self, d: _Decoder) -> None:
        c = self.cluster
        while d.waiting and len(d.running) < c.max_batch:
            q = d.waiting[0]
            need = q.prompt + q.output  # its whole KV: the simulator does not model preemption
            if d.running and d.used + need > c.kv_capacity_tokens:
                break  # no room: wait for a running request to finish (first come, first served)
            d.waiting.pop(0)
            d.running.append(q)
            d.used += need
        d.fit_cache(c)

    def step_time(self, d: _Decoder) -> float:
        ctx = sum(q.prompt + q.generated for q in d.running)
        t = d.cost.step_seconds(len(d.running), ctx)
        for q in d.running:
            if q.generated == 0:  # a local prefill rides in this step, and the whole batch waits for it
                t += self.local_cost.seconds(q.prompt - q.held)
        return t


def attainment(reqs: list[SimRequest]) -> float:
    return sum(r.met() for r in reqs) / len(reqs) if reqs else 0.0


def percentile(xs: list[float], f: float) -> float | None:
    """The f-quantile of xs (the nearest rank at or above it); None for none."""
    return sorted(xs)[min(len(xs) - 1, int(f * len(xs)))] if xs else None


def goodput(cluster: SimCluster, w: Workload, ttft_slo: float, tpot_slo: float, target: float,
            n: int = 400, seed: int = 0, hi: float | None = None, iters: int = 12) -> float:
    """DistServe goodput: the highest rate at which at least `target` of requests meet both SLOs
    (bisection over the rate; the same arrival seed at every rate)."""
    def ok(rate: float) -> bool:
        wr = Workload(**{**w.__dict__, "rate": rate})
        return attainment(simulate(cluster, generate(wr, n, seed), ttft_slo, tpot_slo)) >= target
    return bisect_rate(ok, hi or max(1.0, w.rate), iters)


def bisect_rate(ok: Callable[[float], bool], hi: float, iters: int = 12) -> float:
    """The highest rate for which ok(rate) holds, taking ok as monotone: doubling from `hi` until it
    fails, then `iters` halvings (0.0 if it fails even at hi / 1024)."""
    lo = 0.0
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
