import random

import pytest

from coordinator.policy import (
    DecodeCost,
    DecodeWorkerState,
    Placement,
    PlacementRequest,
    PrefillCost,
    PrefillWorkerState,
    Rejection,
    RunningRequest,
    apply,
    make_policy,
    predicted_tpot,
)

PREFILL_COST = PrefillCost(0.01, 1e-3, 0.0)
DECODE_COST = DecodeCost(0.02, 0.002, 1e-5)


def prefill(wid, queued=0, healthy=True, cost=PREFILL_COST):
    return PrefillWorkerState(wid, cost, queued, healthy)


def decode(wid, running=(), free=10_000, cost=DECODE_COST, healthy=True):
    return DecodeWorkerState(wid, cost, [RunningRequest(c, s) for c, s in running], free, healthy=healthy)


def test_slo_never_breaks_a_running_requests_tpot_when_another_worker_would_not():
    req = PlacementRequest(prompt_tokens=200, max_tokens=50, ttft_slo=1.0, tpot_slo=0.2)
    # d0 is emptier, but it runs a request with a tight 30 ms TPOT that one more request would break
    d0 = decode("d0", running=[(1000, 0.03)])
    d1 = decode("d1", running=[(500, 0.2)] * 5)
    assert predicted_tpot(d0, req) > 0.03 and predicted_tpot(d1, req) <= 0.2
    got = make_policy("slo").place(req, [prefill("p0")], [d0, d1])
    assert isinstance(got, Placement) and got.decode == "d1"
    assert make_policy("least-loaded").place(req, [prefill("p0")], [d0, d1]).decode == "d0"  # the baseline would


def test_slo_rejects_early_when_no_prefill_can_meet_ttft():
    req = PlacementRequest(prompt_tokens=2000, max_tokens=10, ttft_slo=0.5, tpot_slo=1.0)
    got = make_policy("slo").place(req, [prefill("p0", queued=1000), prefill("p1", queued=3000)], [decode("d0")])
    assert isinstance(got, Rejection) and "TTFT" in got.reason and got.retry_after >= 1.0


def test_slo_prefers_the_most_slack_and_skips_unhealthy_and_full_workers():
    req = PlacementRequest(prompt_tokens=100, max_tokens=100, ttft_slo=2.0, tpot_slo=0.5)
    ps = [prefill("p0", queued=500), prefill("p1", queued=0, healthy=False), prefill("p2", queued=100)]
    ds = [decode("d0", free=150), decode("d1", running=[(100, 1.0)] * 3), decode("d2", running=[(100, 1.0)])]
    got = make_policy("slo").place(req, ps, ds)
    assert (got.prefill, got.decode) == ("p2", "d2")
    assert make_policy("slo").place(req, ps, [decode("d0", free=50)]).reason.startswith("no decode worker")


def test_round_robin_cycles_and_apply_counts_reservations():
    rr = make_policy("round-robin")
    req = PlacementRequest(10, 10)
    ps = {w: prefill(w) for w in ("p0", "p1")}
    ds = {w: decode(w) for w in ("d0", "d1", "d2")}
    picks = []
    for _ in range(6):
        pl = rr.place(req, list(ps.values()), list(ds.values()))
        apply(pl, req, ps, ds)
        picks.append((pl.prefill, pl.decode))
    assert [p for p, _ in picks] == ["p0", "p1"] * 3 and [d for _, d in picks] == ["d0", "d1", "d2"] * 2
    assert ps["p0"].queued_tokens == 30 and len(ds["d0"].running) == 2 and ds["d0"].free_tokens == 10_000 - 20  # the prompts' reservations


def test_a_burst_spreads_out_once_placements_are_counted():
    slo = make_policy("slo")
    ps = {f"p{i}": prefill(f"p{i}") for i in range(3)}
    ds = {f"d{i}": decode(f"d{i}") for i in range(3)}
    req = PlacementRequest(300, 50, ttft_slo=5.0, tpot_slo=0.5)
    chosen = []
    for _ in range(9):
        pl = slo.place(req, list(ps.values()), list(ds.values()))
        apply(pl, req, ps, ds)
        chosen.append(pl)
    assert {pl.prefill for pl in chosen} == set(ps) and {pl.decode for pl in chosen} == set(ds)
    assert max(len(d.running) for d in ds.values()) == 3


def test_unknown_policy():
    with pytest.raises(ValueError, match="slo"):
        make_policy("random")


def test_placements_stay_fast_with_many_workers():
    """Not a timing assertion (benchmarks do that): a sanity check that 1,000 workers place fine."""
    rng = random.Random(0)
    ps = [prefill(f"p{i}", queued=rng.randrange(0, 5000)) for i in range(1000)]
    ds = [decode(f"d{i}", running=[(rng.randrange(10, 2000), 0.3)] * rng.randrange(0, 20)) for i in range(1000)]
    got = make_policy("slo").place(PlacementRequest(200, 50, 10.0, 0.5), ps, ds)
    assert isinstance(got, Placement)
    assert got.prefill == min(ps, key=lambda p: p.queued_tokens).worker_id


def test_decode_room_for_the_whole_request_is_preferred_but_the_prompt_alone_suffices():
    req = PlacementRequest(prompt_tokens=100, max_tokens=400)
    for name in ("slo", "least-loaded", "round-robin"):
        roomy = make_policy(name).place(req, [prefill("p0")], [decode("d0", free=150), decode("d1", free=600)])
        assert roomy.decode == "d1", name
        # every decode worker's last report is short of prompt + max_tokens: still placed where the prompt fits
        tight = make_policy(name).place(req, [prefill("p0")], [decode("d0", free=50), decode("d1", free=150)])
        assert tight.decode == "d1", name
        # nobody has room: a request without SLOs waits at the roomiest healthy worker (D refuses if it
        # really is full, and the gateway retries); one with SLOs is rejected early
        full = [decode("d0", free=50), decode("d1", free=80), decode("d2", free=999, healthy=False)]
        assert make_policy(name).place(req, [prefill("p0")], full).decode == "d1", name
        strict = PlacementRequest(prompt_tokens=100, max_tokens=400, ttft_slo=10.0, tpot_slo=10.0)
        assert make_policy(name).place(strict, [prefill("p0")], full).reason, name


def test_queued_prompts_share_step_costs_and_the_hop_is_paid_once():
    from coordinator.policy import predicted_ttft, queue_wait
    cost = PrefillCost(a=0.01, b=1e-3, c=1e-6, hop=0.004)
    # 3000 queued tokens in 3 prompts, 2048 tokens a step: 2 steps; Σn² as 3 prompts of 1000
    p = PrefillWorkerState("p0", cost, 3000, queued_prompts=3)
    assert queue_wait(p) == pytest.approx(2 * 0.01 + 3.0 + 1e-6 * 3000 ** 2 / 3)
    req = PlacementRequest(100, 10)
    assert predicted_ttft(p, req) == pytest.approx(0.004 + queue_wait(p) + 0.01 + 0.1 + 1e-6 * 100 ** 2)
    # idle: the hop and its own step only
    assert predicted_ttft(PrefillWorkerState("p1", cost), req) == pytest.approx(0.004 + 0.01 + 0.1 + 0.01)
    # ten 10-token prompts queued wait one step, not ten (the hop is in none of them)
    ten = PrefillWorkerState("p2", cost, 100, queued_prompts=10)
    assert queue_wait(ten) == pytest.approx(0.01 + 0.1 + 1e-6 * 100 ** 2 / 10)
