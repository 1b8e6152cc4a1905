import math

import pytest

from coordinator.policy import DecodeCost, PrefillCost
from coordinator.simulator import SimCluster, Workload, attainment, generate, goodput, simulate


def cluster(pa=0.1, pb=0.0, base=0.01, per_seq=0.0, n_p=1, n_d=1, hop=0.0, **kw):
    # a step budget of 10 tokens: one 10-token prompt per prefill step (the cases below), unless asked
    kw.setdefault("prefill_step_tokens", 10)
    return SimCluster([PrefillCost(pa, pb, 0.0, hop)] * n_p, [DecodeCost(base, per_seq, 0.0)] * n_d,
                      policy="least-loaded", **kw)


def test_one_prefill_worker_with_deterministic_arrivals_queues_exactly():
    # a prefill takes 0.1 s, a request arrives every 0.05 s: request k waits 0.05 k more than the one before
    arr = generate(Workload(rate=20, prompt_mean=10, output_mean=1, arrival="uniform"), 6)
    reqs = simulate(cluster(), arr)
    assert [round(r.ttft, 9) for r in reqs] == [round(0.1 + 0.05 * k, 9) for k in range(6)]


def test_decode_steps_give_exact_tpot_alone_and_batched():
    # alone: 11 tokens = the first from prefill + 10 decode steps of 0.01 s
    r = simulate(cluster(), [(0.0, 10, 11)])[0]
    assert r.ttft == pytest.approx(0.1) and r.tpot == pytest.approx(0.01)
    # two requests decoding together on one worker: each step 0.01 + 0.005 * 2
    two = simulate(cluster(n_p=2, per_seq=0.005), [(0.0, 10, 11), (0.0, 10, 11)])
    assert all(r.tpot == pytest.approx(0.02) for r in two)
    # with a KV transfer of 1 ms per prompt token, decoding starts 10 ms later; TPOT counts from the first token
    r = simulate(cluster(transfer_s_per_token=0.001), [(0.0, 10, 11)])[0]
    assert r.finish == pytest.approx(0.1 + 0.01 + 10 * 0.01)


def test_kv_capacity_makes_requests_wait_their_turn():
    # room for one request's KV (10 prompt + 11 tokens) at a time: the second decodes after the first
    a, b = simulate(cluster(n_p=2, kv_capacity_tokens=25), [(0.0, 10, 11), (0.0, 10, 11)])
    assert a.finish == pytest.approx(0.2) and b.finish == pytest.approx(0.3)


def test_attainment_and_goodput_follow_the_slos():
    c = cluster(pa=0.1)
    w = Workload(rate=5, prompt_mean=10, output_mean=2, arrival="uniform")
    assert attainment(simulate(c, generate(w, 50), ttft_slo=0.15, tpot_slo=1.0)) == 1.0
    # one prefill worker serves at most 10 prompts/s; with a 0.3 s TTFT SLO and deterministic arrivals
    # the queue never grows below 10 req/s: goodput is just under 10 req/s
    g = goodput(c, w, ttft_slo=0.3, tpot_slo=1.0, target=0.9, n=200)
    assert 9.0 <= g <= 10.5
    assert goodput(cluster(pa=1.0), w, ttft_slo=0.5, tpot_slo=1.0, target=0.9) == 0.0  # never fast enough
    assert math.isclose(goodput(cluster(pa=0.05, n_p=2), w, 0.3, 1.0, 0.9, n=200), 4 * g, rel_tol=0.15)


def test_prompts_waiting_for_a_prefill_step_share_the_next_one():
    # a step costs 0.125 s whatever it holds (b = 0); a 16-token prompt every 0.0625 s, room for all in
    # a step: r0 alone (0.0625-0.1875), r1 and r2 together (0.1875-0.3125), r3 and r4 (0.3125-0.4375)
    arr = generate(Workload(rate=16, prompt_mean=16, output_mean=1, arrival="uniform"), 5)
    reqs = simulate(cluster(pa=0.125, prefill_step_tokens=2048), arr)
    assert [r.ttft for r in reqs] == [0.125, 0.1875, 0.125, 0.1875, 0.125]
    # the per-request hop adds to every TTFT and to nobody's queue; TPOT is unchanged by it
    reqs = simulate(cluster(pa=0.125, prefill_step_tokens=2048, hop=0.25), arr)
    assert [r.ttft for r in reqs] == [0.375, 0.4375, 0.375, 0.4375, 0.375]
    r = simulate(cluster(hop=0.05), [(0.0, 10, 11)])[0]
    assert r.ttft == pytest.approx(0.15) and r.tpot == pytest.approx(0.01) and r.finish == pytest.approx(0.25)


def test_a_long_prompt_is_chunked_into_steps():
    # 20 tokens in steps of at most 8: 3 steps (8, 8, 4): 3a + 20b + c (8^2 + (16^2 - 8^2) + (20^2 - 16^2))
    c = SimCluster([PrefillCost(0.1, 0.01, 0.001)], [DecodeCost(0.01, 0.0, 0.0)], policy="least-loaded",
                   prefill_step_tokens=8)
    r = simulate(c, [(0.0, 20, 1)])[0]
    assert r.ttft == pytest.approx(0.3 + 0.2 + 0.4)
    # a 4-token prompt arriving meanwhile rides along in the last step's spare room (4 tokens)
    a, b = simulate(c, [(0.0, 20, 1), (0.05, 4, 1)])
    assert a.ttft == pytest.approx(0.3 + 0.24 + 0.4 + 0.016) and b.first_token == a.first_token
