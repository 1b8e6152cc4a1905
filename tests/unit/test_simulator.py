import math

import pytest

from coordinator.policy import DecodeCost, PrefillCost
from coordinator.simulator import SimCluster, Workload, attainment, generate, goodput, simulate


def cluster(pa=0.1, pb=0.0, base=0.01, per_seq=0.0, n_p=1, n_d=1, **kw):
    return SimCluster([PrefillCost(pa, pb, 0.0)] * n_p, [DecodeCost(base, per_seq, 0.0)] * n_d,
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
