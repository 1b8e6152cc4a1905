"""Placement policies: pure functions of the cluster's live view (no I/O, no etcd, no torch).

DESIGN.md §6. Cost models (DistServe's form): prefill time of n prompt tokens a + b*n + c*n^2;
decode step time base + per_seq*batch + per_token*total_context. For a request the `slo` policy
predicts, per prefill worker, TTFT = hop + queue wait + prefill of the prompt tokens that worker has not
cached (the cluster's KV index, coordinator/kv_index.py) + transfer, and per decode
worker the step time after adding it, which must stay within the TPOT SLO of the new request *and*
of every request already running there. A worker holding the prompt's prefix wins until its queue
costs more than computing the prefix elsewhere, so a hot prefix spreads instead of melting one worker.
P and D are chosen independently (TTFT depends on P alone,
TPOT on D alone), so a placement is O(P + D). The pair with the most slack wins; none: rejected
early with a reason (HTTP 429 upstream), as Mooncake does. `least-loaded` and `round-robin` are the
baselines.

The prefill queue (`queue_wait`): a prefill worker batches the prompts waiting for it into steps of
up to `step_tokens` tokens (the engine's max_num_batched_tokens; chunked prefill splits longer
ones), so queued prompts share a step's fixed cost `a`: Q queued tokens in k prompts take
a*ceil(Q/step_tokens) + b*Q + c*Q^2/k (the quadratic term as if the k prompts were of equal length),
and the new prompt's own step follows. What a request pays once and does not make others wait for
(the gateway, the placement round trip, the reservation at D, its first token's way back) is the
cost model's `hop`: added to its TTFT, never to a queue.

Each policy's `place` scans full lists of worker states: the reference, and what tests run on
synthetic states. The coordinator calls `place_in` instead, on `Candidates` that the live view keeps
indexed (coordinator/candidates.py): it walks a few workers in the order its key gives, stops as soon
as no worker further on can be chosen, and hands that shortlist to `place`, so the choice is the
reference's (tests/unit/test_placement_index.py checks it on random clusters) at a cost that does not
grow with the number of workers.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from coordinator.records import (  # noqa: F401  (re-exported: the policies' vocabulary)
    INF,
    DecodeCost,
    DecodeLoad,
    DecodeWorkerState,
    Placement,
    PlacementRequest,
    PrefillCost,
    PrefillWorkerState,
    Rejection,
    RunningRequest,
)


def to_compute(p: PrefillWorkerState, req: PlacementRequest) -> int:
    """The prompt tokens `p` must compute: those it does not hold, and at least one (the step that
    computes the last token samples the first output token)."""
    return req.prompt_tokens - min(req.cached.get(p.worker_id, 0), req.prompt_tokens - 1)


def queue_wait(p: PrefillWorkerState) -> float:
    """The worker's time for what is queued there before a new prompt's step (module docstring)."""
    return p.cost.queue_seconds(p.queued_tokens, p.queued_prompts, p.step_tokens)


def held(decode_id: str, req: PlacementRequest) -> int:
    """The prompt tokens decode worker `decode_id` holds in its prefix cache: their KV is linked there at
    reservation, not shipped (and at least the last token is always computed)."""
    return min(req.cached.get(decode_id, 0), req.prompt_tokens - 1)


def predicted_ttft(p: PrefillWorkerState, req: PlacementRequest, wait: float | None = None, held: int = 0) -> float:
    """`wait`: queue_wait(p), when the caller has it already. Only the tokens `p` has not cached are
    computed, and only the KV of the tokens the decode worker does not hold (`held`) is shipped."""
    return (p.cost.hop + (queue_wait(p) if wait is None else wait) + p.cost.seconds(to_compute(p, req))
            + p.transfer_s_per_token * (req.prompt_tokens - held))


def local_ttft(p: PrefillWorkerState, d: DecodeWorkerState | DecodeLoad, req: PlacementRequest) -> float:
    """The TTFT of the decode worker prefilling the request itself (conditional disaggregation): the
    tokens it does not hold, computed at the cost P's model gives (same model; a decode worker's profile
    times its decode steps only), after the batch step it is in, with no queue and nothing shipped."""
    return p.cost.hop + predicted_tpot(d, req) + p.cost.seconds(req.prompt_tokens - held(d.worker_id, req))


def predicted_tpot(d: DecodeWorkerState | DecodeLoad, req: PlacementRequest) -> float:
    return d.cost.step_seconds(d.num_running + 1, d.total_context + req.prompt_tokens)


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


# ---- indexed candidates (the live view's fast path) ----------------------------------------------
@dataclass(frozen=True)
class Room:
    """What a decode worker must have free: KV for `tokens` and, with `batch`, a slot in its batch."""
    tokens: int
    batch: bool = False


class Candidates(Protocol):
    """One side of one placement as the live view indexes it: the healthy workers of the roles and model
    asked for, less those excluded, without a list of them being built. Prefill candidates are
    PrefillWorkerState records, decode candidates DecodeLoad records (which `room` filters)."""

    def ordered(self, key, room: Room | None = None) -> Iterator[tuple[tuple, object]]:
        """(key(w), w) by ascending key, then scan order; of candidates with equal keys only the first in
        scan order, so a key must hold all that ranks them. `key` is a module-level function: the view
        keeps an index per key it is asked for."""
        ...

    def exists(self, room: Room | None = None) -> bool: ...

    def count(self, room: Room | None = None) -> int: ...

    def nth(self, k: int, room: Room | None = None):
        """The k-th candidate in scan order."""
        ...

    def roomiest(self) -> DecodeLoad | None:
        """The candidate with the most free KV (ties: the largest worker id)."""
        ...

    def floor(self):
        """A record whose cost coefficients are each the least any candidate has: a lower bound."""
        ...

    def loosest_tpot(self) -> float | None:
        """The largest finite tightest_tpot among the candidates (None: no finite one)."""
        ...

    def states(self, records=None) -> list:
        """The reference states of `records`, in scan order; of every worker on this side (healthy or
        not, as LiveView.prefill_states / decode_states list them) by default."""
        ...


# The walks' lower bounds hold for non-negative cost coefficients (profiles are clamped so), and are
# shrunk by this, far more than float rounding can move them.
_SHRINK = 1.0 - 1e-12


def _slack(t: float, limit: float) -> float:
    return 1.0 - t / limit if limit != INF else 1.0 / (1.0 + t)


def _tier(req: PlacementRequest, decodes: Candidates) -> Room | list[DecodeLoad]:
    """`_candidates` on indexed candidates: the Room its first non-empty tier asks for, else the worker
    it falls back to (for a request with SLOs it is rejected, and says a healthy worker exists)."""
    for room in (Room(req.prompt_tokens + req.max_tokens, batch=True), Room(req.prompt_tokens)):
        if decodes.exists(room):
            return room
    roomiest = decodes.roomiest()
    return [roomiest] if roomiest is not None else []


def _queued(p: PrefillWorkerState) -> tuple:
    return (p.queued_tokens, p.worker_id)


def _lightest(d: DecodeLoad) -> tuple:
    return (d.num_running, d.total_context, d.worker_id)


def _ttft_rank(p: PrefillWorkerState) -> tuple:
    """The TTFT of an empty prompt (the walk's order: TTFT = that + b*n + c*n^2 + transfer*n), then all
    else TTFT depends on."""
    wait = queue_wait(p)  # the cost model by identity: the live view keeps one instance per model
    return (p.cost.hop + wait + p.cost.seconds(0), wait, id(p.cost), p.transfer_s_per_token)


def _tpot_rank(d: DecodeLoad) -> tuple:
    """The step time with one more sequence of no context (the walk's order: TPOT = that +
    per_token*prompt tokens), then all else TPOT and its limit depend on."""
    return (d.cost.step_seconds(d.num_running + 1, d.total_context), d.num_running, d.total_context, id(d.cost),
            d.tightest_tpot)


def _per_token_rank(p: PrefillWorkerState) -> tuple:
    """What a prompt token adds to TTFT (b + transfer; c is bounded by the floor's), then all else TTFT
    depends on (so equal keys mean equal TTFT, as `ordered` needs)."""
    return (p.cost.b + p.transfer_s_per_token, *_ttft_rank(p))


def _ttft_shortlist(req: PlacementRequest, prefills: Candidates) -> list[PrefillWorkerState]:
    """The prefill candidates with the most TTFT slack (ties: all). TTFT = (TTFT of an empty prompt) +
    (b + transfer)·n + c·n², so two walks go side by side, one by each of the first two terms (Fagin's
    threshold algorithm): a candidate neither has reached yet has both terms at least where the walks
    stand, so once those (and the least c of any candidate) leave less slack than the best found, no
    unseen one can do better. With one shared cost model the second walk adds nothing and the first
    stops as soon as the queues alone decide; with a cost model per worker, the second finds the
    cheap-per-token workers that a walk by the first term alone would reach last."""
    n, slo, best, found, seen = req.prompt_tokens, req.ttft_slo, -INF, [], set()
    for wid in req.cached:  # workers holding a prefix: the walks' bound (every token computed) is not
        for _, p in prefills.only(wid).ordered(_ttft_rank):  # theirs, so they are met first, by name
            seen.add(p.worker_id)
            slack = _slack(predicted_ttft(p, req), slo)
            found.append((slack, p))
            best = max(best, slack)
    walks = [prefills.ordered(_ttft_rank), prefills.ordered(_per_token_rank)]
    at = [0.0, 0.0]
    least_c = None
    while True:
        for i, walk in enumerate(walks):
            item = next(walk, None)
            if item is None:  # a walk ran out: every candidate has been met
                return [p for slack, p in found if slack == best]
            key, p = item
            at[i] = key[0]
            if p.worker_id in seen:
                continue
            seen.add(p.worker_id)
            slack = _slack(predicted_ttft(p, req, key[1 + i]), slo)  # the key holds the queue wait
            found.append((slack, p))
            best = max(best, slack)
        if least_c is None:
            least_c = prefills.floor().cost.c * n * n
        if _slack((at[0] + at[1] * n + least_c) * _SHRINK, slo) < best:
            return [p for slack, p in found if slack == best]


def _tpot_shortlist(req: PlacementRequest, decodes: Candidates, gain=lambda d: 0.0) -> list[DecodeLoad]:
    """The decode candidates (of `_candidates`' tier) with the best score, TPOT slack + gain(record)
    (ties: all). The workers holding a prefix of the prompt (the only ones with a gain) are met first,
    by name; then a walk by the step time before the prompt's context goes on until the least TPOT the
    next one could predict leaves less slack than the best score found (or none: then it cannot meet its
    limit), under the loosest limit any candidate has."""
    tier = _tier(req, decodes)
    if not isinstance(tier, Room):
        return tier
    n, slo = req.prompt_tokens, req.tpot_slo
    limits = [slo] if slo != INF else [INF] + [t for t in [decodes.loosest_tpot()] if t is not None]
    best, found, seen = 0.0, [], set()

    def consider(d):
        nonlocal best
        seen.add(d.worker_id)
        tpot, limit = predicted_tpot(d, req), min(slo, d.tightest_tpot)
        if tpot <= limit:
            score = _slack(tpot, limit) + gain(d)
            found.append((score, d))
            best = max(best, score)

    for wid in req.cached:
        for _, d in decodes.only(wid).ordered(_tpot_rank, tier):
            consider(d)
    least, first = None, None
    for key, d in decodes.ordered(_tpot_rank, tier):
        if first is None:
            first, least = d, decodes.floor().cost.per_token * n
        if max(_slack((key[0] + least) * _SHRINK, limit) for limit in limits) < best:
            break
        if d.worker_id not in seen:
            consider(d)
    return [d for score, d in found if score == best] or [first]  # none can: one of the tier, for the reason


class Policy:
    name = "base"

    def place(self, req: PlacementRequest, prefills: list[PrefillWorkerState],
              decodes: list[DecodeWorkerState]) -> Placement | Rejection:
        raise NotImplementedError

    def place_in(self, req: PlacementRequest, prefills: Candidates, decodes: Candidates) -> Placement | Rejection:
        """`place` on indexed candidates, choosing what `place` would on their full lists. By default it
        is just that; the policies here walk an index for a shortlist."""
        return self.place(req, prefills.states(), decodes.states())


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

    def place_in(self, req, prefills, decodes):
        n, tier = prefills.count(), _tier(req, decodes)
        ps = [prefills.nth(self._p % n)] if n else []
        ds = [decodes.nth(self._d % decodes.count(tier), tier)] if isinstance(tier, Room) else tier
        return self.place(req, prefills.states(ps), decodes.states(ds))


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

    def place_in(self, req, prefills, decodes):
        tier = _tier(req, decodes)
        ps = [p for _, p in itertools.islice(prefills.ordered(_queued), 1)]
        ds = [d for _, d in itertools.islice(decodes.ordered(_lightest, tier), 1)] if isinstance(tier, Room) else tier
        return self.place(req, prefills.states(ps), decodes.states(ds))


class SloAware(Policy):
    """The prefill worker with the most TTFT slack (computing what it has not cached, shipping the
    whole prompt), then the decode worker with the best TPOT slack + what its held prefix saves the
    request's TTFT slack (the KV it holds is not shipped): a decode worker keeping a conversation's KV
    wins until its batch costs more than the transfer it saves. Then conditional disaggregation: the
    decode worker prefills the request itself when the part it lacks is short (no longer to compute
    than one of its decode steps) or it holds most of the prompt, and that is sooner for this request
    even counting the stall its running requests take (the local prefill's time, once for each of
    them), and keeps every running request's TPOT SLO; `local_prefill_tokens` overrides the cost model
    (local iff at most that many tokens are left to compute there; 0: never)."""
    name = "slo"

    def __init__(self, local_prefill_tokens: int | None = None):
        self.local_prefill_tokens = local_prefill_tokens

    def place(self, req, prefills, decodes):
        got = self._prefill(req, prefills)
        if isinstance(got, Rejection):
            return got
        return self._decode(req, *got, decodes)

    def place_in(self, req, prefills, decodes):
        got = self._prefill(req, prefills.states(_ttft_shortlist(req, prefills)))
        if isinstance(got, Rejection):
            return got
        p, ttft = got
        return self._decode(req, p, ttft, decodes.states(_tpot_shortlist(req, decodes, self._gain(req, p, ttft))))

    @staticmethod
    def _prefill(req, prefills) -> tuple[PrefillWorkerState, float] | Rejection:
        best_p, p_slack, best_ttft = None, -1.0, INF
        for p in prefills:
            if not p.healthy:
                continue
            ttft = predicted_ttft(p, req)
            slack = _slack(ttft, req.ttft_slo)
            if ttft <= req.ttft_slo and slack > p_slack:
                best_p, p_slack, best_ttft = p, slack, ttft
        if best_p is None:
            fastest = min((predicted_ttft(p, req) for p in prefills if p.healthy), default=None)
            why = "no healthy prefill worker" if fastest is None else \
                f"no prefill worker can meet TTFT {req.ttft_slo * 1e3:.0f} ms (best predicted {fastest * 1e3:.0f} ms)"
            return Rejection(why, retry_after=max(1.0, fastest or 1.0))
        return best_p, best_ttft

    def _gain(self, req, p: PrefillWorkerState, ttft: float):
        """gain(d): what decode worker d's held prefix adds to the request's TTFT slack: the pages it
        holds are not shipped, and it may prefill the rest itself when that is sooner (`_local`; its
        running requests' stall counted in). 0.0 exactly for a worker holding none of the prompt."""
        base = _slack(ttft, req.ttft_slo)

        def gain(d) -> float:
            h = held(d.worker_id, req)
            if h <= 0:
                return 0.0
            remote = predicted_ttft(p, req, held=h)
            local = self._local(req, p, d, remote)
            return _slack(remote if local is None else min(remote, local), req.ttft_slo) - base
        return gain

    def _decode(self, req, p, ttft, decodes):
        best_d, best, best_tpot = None, -1.0, INF
        candidates = _candidates(decodes, req)
        if not candidates:
            return Rejection("no healthy decode worker" if not any(d.healthy for d in decodes)
                             else "no decode worker has room for the prompt's KV")
        gain = self._gain(req, p, ttft)
        for d in candidates:
            tpot = predicted_tpot(d, req)
            limit = min(req.tpot_slo, d.tightest_tpot)  # nobody already running may be pushed over
            if tpot > limit:
                continue
            score = _slack(tpot, limit) + gain(d)
            if score > best:
                best_d, best, best_tpot = d, score, tpot
        if best_d is None:
            return Rejection(f"no decode worker can take it within TPOT {req.tpot_slo * 1e3:.0f} ms "
                             "without breaking a running request's SLO")
        ttft = predicted_ttft(p, req, held=held(best_d.worker_id, req))
        if p.worker_id != best_d.worker_id and self._local(req, p, best_d, ttft) is not None:
            return Placement(best_d.worker_id, best_d.worker_id, local_ttft(p, best_d, req), best_tpot)
        return Placement(p.worker_id, best_d.worker_id, ttft, best_tpot)

    def _local(self, req, p, d, remote_ttft: float) -> float | None:
        """Conditional disaggregation: decode worker d prefilling the request itself, if it should: the
        delay that costs (its TTFT, plus the stall of every request running at d: the prefill's time
        once each), else None. Only for what a decode worker should prefill at all: a short uncached
        part (its prefill costs no more than one of d's decode steps) or a prompt d holds most of (at
        least as many tokens as are left); a long prompt stays with the prefill workers, whatever
        their queues, as disaggregation is for."""
        h = held(d.worker_id, req)
        left = req.prompt_tokens - h
        if self.local_prefill_tokens is not None:
            return local_ttft(p, d, req) if left <= self.local_prefill_tokens else None
        stall, step = p.cost.seconds(left), predicted_tpot(d, req)
        if not (stall <= step or h >= left):
            return None
        cost = local_ttft(p, d, req) + stall * d.num_running
        return cost if cost <= remote_ttft and step + stall <= min(d.tightest_tpot, req.tpot_slo) else None


POLICIES = {"slo": SloAware, "least-loaded": LeastLoaded, "round-robin": RoundRobin}


def make_policy(name: str, local_prefill_tokens: int | None = None) -> Policy:
    """`local_prefill_tokens`: the slo policy's conditional disaggregation threshold (None: its cost
    model decides; the other policies never prefill on a decode worker)."""
    if name not in POLICIES:
        raise ValueError(f"placement policy {name!r} is not one of {sorted(POLICIES)}")
    if local_prefill_tokens is not None and local_prefill_tokens < 0:
        raise ValueError(f"local_prefill_tokens = {local_prefill_tokens}: must be >= 0")
    return SloAware(local_prefill_tokens) if name == "slo" else POLICIES[name]()


def apply(placement: Placement, req: PlacementRequest, prefills: dict[str, PrefillWorkerState],
          decodes: dict[str, DecodeWorkerState]) -> None:
    """Counts a placement in the live view until the workers' next heartbeats confirm it, so a burst
    does not pile onto one worker."""
    p = prefills[placement.prefill]
    p.queued_tokens += to_compute(p, req)
    p.queued_prompts += 1
    d = decodes[placement.decode]
    d.running.append(RunningRequest(req.prompt_tokens, req.tpot_slo))
    d.free_tokens -= req.prompt_tokens
