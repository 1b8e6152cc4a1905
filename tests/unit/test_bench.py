import random
import statistics

import pytest

from cluster.bench import Sample, arrivals, goodput, lognormal_int, pct, summarize


def test_poisson_and_gamma_arrivals_have_the_asked_rate_and_burstiness():
    rng = random.Random(0)
    for process, shape in (("poisson", 1.0), ("gamma", 0.25), ("gamma", 4.0)):
        ts = arrivals(rng, 50.0, 200.0, process, shape)
        gaps = [b - a for a, b in zip(ts, ts[1:])]
        assert len(ts) / 200.0 == pytest.approx(50.0, rel=0.05)
        cv2 = statistics.pvariance(gaps) / statistics.mean(gaps) ** 2  # squared coefficient of variation
        assert cv2 == pytest.approx(1.0 / shape, rel=0.15), process


def test_lognormal_lengths_have_the_asked_mean_and_bounds():
    rng = random.Random(1)
    xs = [lognormal_int(rng, 256, 0.5, 1, 100_000) for _ in range(20_000)]
    assert statistics.mean(xs) == pytest.approx(256, rel=0.03)
    assert all(8 <= lognormal_int(rng, 256, 2.0, 8, 300) <= 300 for _ in range(1000))


def test_percentiles_attainment_and_goodput():
    assert pct([1, 2, 3, 4], 0.5) == 2.5 and pct([], 0.5) is None
    fast = Sample(0.0, 10, 5, ttft=0.1, e2e=0.5, tokens=5)  # TPOT 0.1
    slow = Sample(0.0, 10, 5, ttft=0.9, e2e=1.3, tokens=5)
    failed = Sample(0.0, 10, 5, error="HTTP 503")
    r = summarize(1.0, [fast, slow, failed], 2.0, ttft_slo=0.5, tpot_slo=0.2)
    assert r["completed"] == 2 and r["failed"] == 1 and r["attainment"] == pytest.approx(1 / 3)
    assert r["ttft_s"]["p50"] == pytest.approx(0.5) and r["tpot_s"]["p99"] == pytest.approx(0.1)
    sweep = [{"rate": 1, "attainment": 1.0}, {"rate": 2, "attainment": 0.95}, {"rate": 4, "attainment": 0.7},
             {"rate": 8, "attainment": 0.2}]
    assert goodput(sweep, 0.9) == 2 and goodput(sweep, 0.99) == 1 and goodput(sweep, 1.01) == 0


def test_predicted_attainment_adds_the_warm_up_residual_to_the_simulated_ttft():
    from cluster.calibrate import predicted_attainment
    # one 10-token prompt every second, a 10 ms prefill step (a), no hop; one decode token each: every
    # simulated TTFT is 10 ms. Warm-up (arrivals before 2 s): one request measured at 10 ms (residual 0),
    # one at 40 ms (residual +30 ms). With a 25 ms TTFT SLO a counted request makes it with the
    # probability that 10 ms plus a residual is within 25 ms: one of two.
    profiles = {"m/prefill-tp1-pp1": {"prefill": {"a": 0.01, "b": 0.0, "c": 0.0, "hop": 0.0}},
                "m/decode-tp1-pp1": {"decode": {"base": 0.001, "per_seq": 0.0, "per_token": 0.0}}}
    warm = [Sample(0.0, 10, 1, ttft=0.01, e2e=0.01, tokens=1), Sample(1.0, 10, 1, ttft=0.04, e2e=0.04, tokens=1)]
    counted = [Sample(float(t), 10, 1, ttft=0.01, e2e=0.01, tokens=1) for t in range(2, 6)]
    got = predicted_attainment(profiles, "m", 1, 1, 10_000, "least-loaded", warm + counted, 2.0, 0.025, 1.0)
    assert got == pytest.approx(0.5)
    # a looser SLO takes both residuals; without warm-up requests the simulated TTFT stands alone
    assert predicted_attainment(profiles, "m", 1, 1, 10_000, "least-loaded", warm + counted, 2.0, 0.05, 1.0) == 1.0
    assert predicted_attainment(profiles, "m", 1, 1, 10_000, "least-loaded", counted, 2.0, 0.025, 1.0) == 1.0
    # a simulated TTFT over the SLO never counts as met, whatever the residual (here -0 ms or +30 ms)...
    assert predicted_attainment(profiles, "m", 1, 1, 10_000, "least-loaded", warm + counted, 2.0, 0.005, 1.0) == 0.0
    # ...nor a simulated TPOT over its SLO (three tokens at a 1 ms decode step: TPOT 1 ms)
    three = [Sample(float(t), 10, 3, ttft=0.01, e2e=0.012, tokens=3) for t in range(2, 6)]
    assert predicted_attainment(profiles, "m", 1, 1, 10_000, "least-loaded", warm + three, 2.0, 0.05, 0.002) == 1.0
    assert predicted_attainment(profiles, "m", 1, 1, 10_000, "least-loaded", warm + three, 2.0, 0.05, 0.0005) == 0.0


def test_multi_turn_summaries_split_first_and_later_turns():
    """cluster/multi_turn.summarize: first and later turns apart, hits and KV bytes from usage, turns
    never sent (a conversation cut short by a failure) counted as missed."""
    from cluster.multi_turn import Turn
    from cluster.multi_turn import summarize as summarize_turns

    first = Turn(0.0, 1000, 10, ttft=2.0, e2e=3.0, tokens=10, conversation=0, turn=0, kv_tokens=1000)
    later = Turn(5.0, 1100, 10, ttft=0.2, e2e=1.1, tokens=10, turn=1, cached_tokens=1000, kv_tokens=100)
    local = Turn(6.0, 1100, 10, ttft=0.3, e2e=1.2, tokens=10, conversation=1, turn=1, cached_tokens=1050)
    failed = Turn(1.0, 1000, 10, error="HTTP 503", conversation=2)
    r = summarize_turns(0.1, [first, later, local, failed], expected=6, ttft_slo=1.0, tpot_slo=0.2,
                        kv_bytes_per_token=2)
    assert r["failed"] == 1 and r["attainment"] == pytest.approx(2 / 6)  # the first turn misses TTFT
    assert r["first"]["completed"] == 1 and r["first"]["kv_bytes_per_prompt_token"] == pytest.approx(2.0)
    assert r["later"]["hit_rate"] == pytest.approx(2050 / 2200) and r["later"]["unshipped"] == 1
    assert r["later"]["kv_bytes_per_request"] == pytest.approx(100.0)  # 100 tokens x 2 bytes over 2 turns
    assert r["later"]["ttft_s"]["p50"] == pytest.approx(0.25)
