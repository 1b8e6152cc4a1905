"""The live view's indexed placement (policy.place_in on coordinator.candidates) chooses exactly what the
policies' reference `place` chooses on full lists, on random clusters and histories."""

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.kv_layout import KVLayoutSpec
from common.registry import Load, WorkerInfo
from coordinator.live_view import LiveView
from coordinator.policy import Placement, PlacementRequest, make_policy

INF = float("inf")
# a few shared cost models (ties between workers; the same `a` or step time with other per-token
# costs), and each worker its own (start-up profiles), with per-token costs that weigh in
SHARED = [{},
          {"prefill": {"a": 0.01, "b": 1e-3, "c": 0.0}, "decode": {"base": 0.02, "per_seq": 0.002, "per_token": 1e-5}},
          {"prefill": {"a": 0.01, "b": 2e-3, "c": 0.0}, "decode": {"base": 0.02, "per_seq": 0.002, "per_token": 3e-5}},
          {"prefill": {"a": 0.004, "b": 5e-4, "c": 1e-7},
           "decode": {"base": 0.01, "per_seq": 0.004, "per_token": 2e-5}}]


def own_profile(rng: random.Random) -> dict:
    f = lambda x: x * rng.uniform(0.7, 1.3)  # noqa: E731
    return {"prefill": {"a": f(0.005), "b": f(2e-4), "c": rng.choice([0.0, f(1e-7)])},
            "decode": {"base": f(0.02), "per_seq": f(0.001), "per_token": f(1e-5)}}


def info(wid, role, model, profile):
    return WorkerInfo(wid, role, model, 1, 1, 16, 4096, "tcp://x", [], KVLayoutSpec(30, 3, 64, 16, "float32"), 1, 0.1, profile)


class Twins:
    """Two live views fed the same inputs; one places through its indexes, the other by full scans."""

    def __init__(self, policy: str, seed: int):
        self.views = [LiveView(suspect_after=1.0), LiveView(suspect_after=1.0)]
        self.policies = [make_policy(policy), make_policy(policy)]
        self.rng = random.Random(seed)
        self.now = 0.0
        self.ids: list[str] = []

    def each(self, method, *args, **kw):
        return [getattr(v, method)(*args, **kw) for v in self.views]

    def register(self, wid, role, model, profile):
        self.each("registered", info(wid, role, model, profile), now=self.now)
        if wid not in self.ids:
            self.ids.append(wid)

    def beat(self, wid, running, free_blocks, queued, lag):
        load = Load(wid, 0.0, 0, running, free_blocks, 64, 10.0, 5, 0, queued)
        self.each("heartbeat", load, now=self.now, sampled_at=self.now - lag)

    def place(self, req, model, exclude):
        (fast, fast_colocated), (ref, ref_colocated) = [
            v.place(p, req, self.now, model, exclude, scan=scan)
            for v, p, scan in zip(self.views, self.policies, (False, True))]
        assert (fast, fast_colocated) == (ref, ref_colocated), (req, model, exclude)
        return fast


def load(rng: random.Random) -> tuple[int, int, int]:
    """running (256: a full batch), free blocks (of 16 tokens), queued prompt tokens: few values, so ties"""
    return rng.choice([0, 0, 1, 2, 3, 256]), rng.choice([0, 1, 2, 6, 20, 40]), rng.randrange(0, 3) * 500


ops = st.lists(st.tuples(st.sampled_from(["beat", "beat", "place", "place", "place", "tick", "drain", "churn"]),
                         st.integers(0, 10**9)), min_size=1, max_size=100)


def run(policy: str, n_workers: int, shared: bool, seed: int, steps):
    t = Twins(policy, seed)
    rng = t.rng
    pair = rng.sample(SHARED, 2)  # shared: two cost models only, so their workers tie and compete
    profile = (lambda: rng.choice(pair)) if shared else (lambda: own_profile(rng))
    roles = ["prefill", "decode", "colocated"]
    for i in range(n_workers):
        role = rng.choice(roles if rng.random() < 0.3 else roles[:2])
        t.register(f"w{i}", role, rng.choice(["m", "m", "n"]), profile())
    for wid in t.ids:
        if rng.random() < 0.9:
            t.beat(wid, *load(rng), 0.0)
    placed = 0
    for op, r in steps:
        rng = random.Random(r)
        wid = rng.choice(t.ids)
        if op == "beat":
            t.beat(wid, *load(rng), rng.choice([0.0, 0.3]))
        elif op == "tick":
            t.now += rng.choice([0.01, 0.4, 1.2])
        elif op == "drain":
            t.each("drain", wid, rng.random() < 0.5)
        elif op == "churn":  # dies, or comes back (a new registration, possibly another role or cost model)
            if rng.random() < 0.5:
                t.each("deregistered", wid)
            else:
                t.register(wid, rng.choice(["prefill", "decode", "colocated"]), "m", profile())
        else:
            # some workers hold a prefix of the prompt (any worker: excluded, decode-only, dead ones too)
            cached = {w: rng.choice([16, 96, 280, 300]) for w in rng.sample(t.ids, min(len(t.ids), rng.choice([0, 1, 3])))}
            req = PlacementRequest(rng.choice([1, 16, 100, 300]), rng.choice([0, 50, 400]),
                                   rng.choice([INF, INF, 0.05, 0.3, 2.0]), rng.choice([INF, INF, 0.03, 0.06, 0.5, 5.0]),
                                   cached)
            exclude = set(rng.sample(t.ids, min(len(t.ids), rng.choice([0, 0, 1, 2]))))
            placed += isinstance(t.place(req, rng.choice(["", "", "m", "n"]), exclude), Placement)
    return placed


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy=st.sampled_from(["slo", "least-loaded", "round-robin"]), n_workers=st.integers(1, 24),
       shared=st.booleans(), seed=st.integers(0, 10**9), steps=ops)
def test_indexed_placement_chooses_what_the_reference_scan_does(policy, n_workers, shared, seed, steps):
    run(policy, n_workers, shared, seed, steps)


def test_a_long_burst_on_a_large_cluster_matches_the_reference():
    """Many placements between heartbeats on 300 workers: big tie groups (identical idle workers) and
    every tier of decode room (whole request, prompt only, none)."""
    for policy in ("slo", "least-loaded", "round-robin"):
        for shared in (True, False):
            rng = random.Random(7)
            steps = [(rng.choice(["place"] * 8 + ["beat", "tick"]), rng.randrange(10**9)) for _ in range(400)]
            assert run(policy, 300, shared, 3, steps) > 0, policy


def test_a_cached_prefix_wins_until_its_queue_costs_more_than_recomputing():
    """Two equal prefill workers; p0 holds 2,000 of a 2,048-token prompt. It wins while idle, and keeps
    winning as requests pile onto it until its queue outweighs computing the prompt elsewhere; then p1
    gets one; the hot prefix does not melt p0."""
    v = LiveView(1.0)
    prof = {"prefill": {"a": 0.01, "b": 1e-3, "c": 0.0}, "decode": {"base": 0.01, "per_seq": 0.0, "per_token": 0.0}}
    for wid, role in (("p0", "prefill"), ("p1", "prefill"), ("d0", "decode")):
        v.registered(WorkerInfo(wid, role, "m", 1, 1, 16, 10**6, "tcp://x", ["tcp://k"],
                                KVLayoutSpec(30, 3, 64, 16, "float32"), 1, 0.0, prof), 0.0)
        v.heartbeat(Load(wid, 0.0, 0, 0, 10**5, 10**5, 0.0, 0), 0.0)
    req = PlacementRequest(2048, 1, cached={"p0": 2000})
    chosen = []
    for _ in range(100):
        got, _ = v.place(make_policy("slo"), req, now=0.0)
        chosen.append(got.prefill)
    k = chosen.index("p1")
    # p1 computes 2,048 tokens (~2.06 s), p0 48 (~0.06 s) after its queue of 48 per placement
    assert chosen[:k] == ["p0"] * k and 30 <= k <= 45, (k, chosen)
    assert "p0" in chosen[k:] and "p1" in chosen[k:]  # from then on both share the load


def test_a_role_left_alone_covers_for_the_missing_one():
    """No prefill + decode pair and no colocated worker: a prefill worker serves the whole request (it
    decodes too), or a decode worker with room does (it prefills too); both paths choose alike."""
    prof = {"prefill": {"a": 0.01, "b": 1e-3, "c": 0.0}, "decode": {"base": 0.01, "per_seq": 0.0, "per_token": 0.0}}

    def view(*workers):
        v = LiveView(1.0)
        for wid, role, free in workers:
            v.registered(WorkerInfo(wid, role, "m", 1, 1, 16, 10**6, "tcp://x", ["tcp://k"],
                                    KVLayoutSpec(30, 3, 64, 16, "float32"), 1, 0.0, prof), 0.0)
            v.heartbeat(Load(wid, 0.0, 0, 0, free, 10**5, 0.0, 0, queued_tokens=100 if wid == "p0" else 0), 0.0)
        return v

    req = PlacementRequest(64, 8, ttft_slo=0.001, tpot_slo=0.001)  # SLOs nobody meets: cover is best effort
    for scan in (False, True):
        got, colocated = view(("p0", "prefill", 0), ("p1", "prefill", 0)).place(make_policy("slo"), req, 0.0, scan=scan)
        assert colocated and (got.prefill, got.decode) == ("p1", "p1")  # the shorter queue
        got, colocated = view(("d0", "decode", 10**4), ("d1", "decode", 10**4)).place(make_policy("least-loaded"), req,
                                                                                     0.0, scan=scan)
        assert colocated and (got.prefill, got.decode) == ("d0", "d0")
        got, _ = view(("d0", "decode", 2)).place(make_policy("slo"), req, 0.0, scan=scan)  # 32 tokens free < 64
        assert not isinstance(got, Placement) and "room" in got.reason
        got, _ = view().place(make_policy("slo"), req, 0.0, scan=scan)
        assert not isinstance(got, Placement)


def test_a_cached_prefix_does_not_split_a_colocated_placement():
    """Colocated workers only: c0 holds 280 of the 300-token prompt but has no room for its KV, so c1
    (room, nothing cached) must both prefill and decode it, computing every token; c0's prefix must not
    make it the prefill worker of c1's request, and c1 alone misses a 200 ms TTFT SLO."""
    prof = {"prefill": {"a": 0.01, "b": 1e-3, "c": 0.0}, "decode": {"base": 0.01, "per_seq": 0.0, "per_token": 0.0}}

    def view():
        v = LiveView(1.0)
        for wid, free_blocks in (("c0", 0), ("c1", 100)):
            v.registered(info(wid, "colocated", "m", prof), now=0.0)
            v.heartbeat(Load(wid, 0.0, 0, 0, free_blocks, 100, 0.0, 0), now=0.0)
        return v

    for scan in (False, True):
        got, colocated = view().place(make_policy("slo"), PlacementRequest(300, 1, cached={"c0": 280}), 0.0, scan=scan)
        assert colocated and (got.prefill, got.decode) == ("c1", "c1") and got.predicted_ttft > 0.3, scan
        got, _ = view().place(make_policy("slo"), PlacementRequest(300, 1, ttft_slo=0.2, cached={"c0": 280}), 0.0,
                              scan=scan)
        assert not isinstance(got, Placement) and "TTFT" in got.reason, scan


def test_ties_go_to_the_first_registered_and_suspects_are_skipped():
    v = LiveView(suspect_after=1.0)
    for i in range(50):  # identical idle workers
        for role in ("prefill", "decode"):
            v.registered(info(f"{role[0]}{i}", role, "m", {}), now=0.0)
            v.heartbeat(Load(f"{role[0]}{i}", 0.0, 0, 0, 100, 100, 0.0, 0, 0, 0), now=0.0)
    for i in range(3, 50):
        for role in "pd":
            v.heartbeat(Load(f"{role}{i}", 0.0, 0, 0, 100, 100, 0.0, 0, 0, 0), now=1.0)
    req = PlacementRequest(100, 10, ttft_slo=1.0, tpot_slo=0.5)
    got, colocated = v.place(make_policy("slo"), req, now=1.5, exclude={"p3"})  # p0-p2, d0-d2: suspect
    assert (got.prefill, got.decode, colocated) == ("p4", "d3", False)


def test_equal_slack_goes_to_the_first_registered_whatever_the_cost_models():
    """p0 (queued) and p1 (idle, slower) predict the same TTFT: the walk meets p1 first, the scan p0."""
    v = LiveView(kv_bandwidth_gb_s=INF)  # no transfer time: TTFTs in powers of two
    fast, slow = {"a": 2**-6, "b": 2**-12, "c": 0.0}, {"a": 2**-5, "b": 2**-11, "c": 0.0}
    for wid, role, prefill_cost, queued in (("p0", "prefill", fast, 64), ("p1", "prefill", slow, 0),
                                            ("d0", "decode", fast, 0)):
        v.registered(info(wid, role, "m", {"prefill": prefill_cost}), now=0.0)
        v.heartbeat(Load(wid, 0.0, 0, 0, 100, 100, 0.0, 0, 0, queued), now=0.0)
    got, _ = v.place(make_policy("slo", local_prefill_tokens=0), PlacementRequest(64, 1, ttft_slo=1.0), now=0.0)
    assert got.prefill == "p0" and got.predicted_ttft == 2**-4


def test_the_roomiest_fallback_breaks_ties_by_worker_id_across_models():
    def view():
        v = LiveView()
        for wid, role, model in (("p0", "prefill", "m"), ("d-a", "decode", "m"), ("d-b", "decode", "n")):
            v.registered(info(wid, role, model, {}), now=0.0)
            v.heartbeat(Load(wid, 0.0, 0, 0, 1, 100, 0.0, 0, 0, 0), now=0.0)  # 16 tokens free
        return v

    for name in ("slo", "least-loaded", "round-robin"):
        for scan in (False, True):  # fits nowhere, no SLOs: waits at the roomiest
            got, _ = view().place(make_policy(name), PlacementRequest(100, 1), now=0.0, scan=scan)
            assert got.decode == "d-b", (name, scan)


def test_equally_loaded_decode_workers_differ_by_the_slos_they_run():
    """d0 and d1 run the same load, but d0's request has a 0.5 s TPOT SLO and d1's 5 s: a request
    without an SLO of its own has more slack on d1 than anywhere (idle d2 included)."""
    def view():
        v = LiveView()
        for wid, role in (("p0", "prefill"), ("d0", "decode"), ("d1", "decode"), ("d2", "decode")):
            v.registered(info(wid, role, "m", {}), now=0.0)
            v.heartbeat(Load(wid, 0.0, 0, 0, 100, 100, 0.0, 0, 0, 0), now=0.0)
        for tpot, to in ((0.5, "d0"), (5.0, "d1")):
            got, _ = v.place(make_policy("slo"), PlacementRequest(100, 1, tpot_slo=tpot), now=0.0)
            assert got.decode == to
        return v

    for scan in (False, True):
        got, _ = view().place(make_policy("slo"), PlacementRequest(100, 1), now=0.0, scan=scan)
        assert got.decode == "d1", scan


def conversation_view(prefill_queue: int = 0, transfer: float = 1e-3) -> LiveView:
    """p0 and two equal decode workers; shipping a token's KV costs `transfer` seconds."""
    layout = KVLayoutSpec(30, 3, 64, 16, "float32")  # 46,080 bytes a token
    v = LiveView(1.0, kv_bandwidth_gb_s=layout.block_bytes() / 16 / transfer / 1e9)
    prof = {"prefill": {"a": 0.01, "b": 1e-3, "c": 0.0}, "decode": {"base": 0.02, "per_seq": 0.002, "per_token": 0.0}}
    for wid, role in (("p0", "prefill"), ("d0", "decode"), ("d1", "decode")):
        v.registered(WorkerInfo(wid, role, "m", 1, 1, 16, 10**6, "tcp://x", ["tcp://k"], layout, 1, 0.0, prof), 0.0)
        v.heartbeat(Load(wid, 0.0, 0, 0, 10**5, 10**5, 0.0, 0, queued_tokens=prefill_queue if wid == "p0" else 0), 0.0)
    return v


def test_the_decode_worker_holding_a_conversation_wins_until_its_batch_costs_more_than_the_transfer():
    """d1 holds 960 of a 1,024-token prompt (the earlier turns it decoded): only 64 tokens' KV would be
    shipped there, so it wins, and the predicted TTFT counts only that transfer. As requests pile onto
    d1 its TPOT slack shrinks until the transfer it saves no longer pays: then d0 gets one."""
    for scan in (False, True):
        v = conversation_view()
        req = PlacementRequest(1024, 64, ttft_slo=3.0, tpot_slo=0.1, cached={"d1": 960, "p0": 960})
        chosen = []
        for _ in range(20):
            got, colocated = v.place(make_policy("slo", local_prefill_tokens=0), req, now=0.0, scan=scan)
            assert not colocated and got.prefill == "p0"
            chosen.append((got.decode, got.predicted_ttft))
        # P computes 64 tokens (0.01 + 0.064 s); shipping to d1: 64 tokens, to d0: 1,024
        assert chosen[0] == ("d1", pytest.approx(0.074 + 0.064))
        # d1's held prefix saves 0.96 s of the 3 s TTFT SLO (0.32 of slack); each request running there
        # costs 0.02 of TPOT slack (2 ms of a 100 ms limit): the 17th goes to d0
        k = [d for d, _ in chosen].index("d0")
        assert k == 16 and chosen[k][1] == pytest.approx(0.01 + 16 * 0.064 + 0.074 + 1.024), chosen  # 16 prompts queued at p0: one step
        # an unrelated prompt goes by TPOT alone: to the less loaded d0
        got, _ = v.place(make_policy("slo", local_prefill_tokens=0), PlacementRequest(1024, 64), now=0.0, scan=scan)
        assert got.decode == "d0"


def test_a_decode_worker_holding_most_of_the_prompt_prefills_it_locally_when_that_is_sooner():
    """Conditional disaggregation. d1 holds 960 of 1,024 tokens and p0 is busy: d1 computing the last 64
    itself (one batch step + 0.074 s) beats p0's queue, so the placement is d1 alone (colocated).
    With an idle p0 shipping 64 tokens' KV is sooner; and the cluster file's threshold overrides the
    cost model either way (0: never)."""
    req = PlacementRequest(1024, 64, cached={"d1": 960, "p0": 960})
    for scan in (False, True):
        got, colocated = conversation_view(prefill_queue=4000, transfer=1e-5).place(make_policy("slo"), req, now=0.0, scan=scan)
        assert colocated and (got.prefill, got.decode) == ("d1", "d1")
        assert got.predicted_ttft == pytest.approx(0.022 + 0.074)  # d1's step, then its prefill of 64
        got, colocated = conversation_view(transfer=1e-5).place(make_policy("slo"), req, now=0.0, scan=scan)
        assert not colocated and (got.prefill, got.decode) == ("p0", "d1")
        got, colocated = conversation_view(transfer=1e-5).place(make_policy("slo", local_prefill_tokens=64), req, now=0.0, scan=scan)
        assert colocated and (got.prefill, got.decode) == ("d1", "d1")
        got, colocated = conversation_view(prefill_queue=4000, transfer=1e-5).place(make_policy("slo", local_prefill_tokens=0), req,
                                                                     now=0.0, scan=scan)
        assert not colocated and (got.prefill, got.decode) == ("p0", "d1")
        for name in ("least-loaded", "round-robin"):  # the baselines stay as they were
            got, colocated = conversation_view(prefill_queue=4000, transfer=1e-5).place(make_policy(name), req, now=0.0, scan=scan)
            assert not colocated and got.prefill == "p0"


def test_a_local_prefill_must_not_stall_a_busy_decode_batch_or_break_its_tpot_slo():
    """The local prefill stalls every request running at d1 once: with 80 of them running (80 x 74 ms) it
    costs more than p0's 4 s queue saves, so p0 prefills; a running request's 50 ms TPOT SLO rules a
    74 ms stall out."""
    req = PlacementRequest(1024, 64, cached={"d1": 960, "p0": 960})
    for scan in (False, True):
        v = conversation_view(prefill_queue=4000, transfer=1e-5)
        v.heartbeat(Load("d1", 0.0, 0, 80, 10**5, 10**5, 0.0, 0), 0.0)
        v.heartbeat(Load("d0", 0.0, 0, 80, 10**5, 10**5, 0.0, 0), 0.0)
        got, colocated = v.place(make_policy("slo"), req, now=0.0, scan=scan)
        assert not colocated and got.prefill == "p0"
        v = conversation_view(prefill_queue=4000, transfer=1e-5)
        got, _ = v.place(make_policy("slo"), PlacementRequest(16, 8, tpot_slo=0.05), now=0.0, scan=scan)
        got, colocated = v.place(make_policy("slo"), PlacementRequest(1024, 64, cached={"d0": 960, "d1": 960}),
                                 now=0.0, scan=scan)
        assert got.decode != "d0" or not colocated  # d0 runs the 50 ms request; d1 does not


def test_a_long_new_prompt_stays_with_the_prefill_workers_however_long_their_queue():
    """Local prefill is for what a decode worker should prefill at all: a short uncached part (here 8
    tokens: 18 ms, under one 22 ms decode step) or a prompt it holds most of. A 1,024-token prompt it
    holds none of goes to the prefill worker even behind a 4 s queue, although an idle decode worker
    would start it sooner."""
    for scan in (False, True):
        got, colocated = conversation_view(prefill_queue=4000, transfer=1e-5).place(
            make_policy("slo"), PlacementRequest(1024, 64), now=0.0, scan=scan)
        assert not colocated and got.prefill == "p0"
        got, colocated = conversation_view(prefill_queue=4000, transfer=1e-5).place(
            make_policy("slo"), PlacementRequest(8, 64), now=0.0, scan=scan)
        assert colocated and got.prefill == got.decode
