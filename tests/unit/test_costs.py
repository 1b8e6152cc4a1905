import pytest

from coordinator.costs import CostRefiner
from coordinator.policy import DecodeCost, PrefillCost

STORED = {"prefill": {"a": 0.01, "b": 1e-4, "c": 0.0}, "decode": {"base": 0.02, "per_seq": 0.001, "per_token": 1e-7}}


def feed(r, role, truth, model_cost, n=100):
    p, d = PrefillCost(**STORED["prefill"]), DecodeCost(**STORED["decode"])
    for i in range(n):
        if role == "prefill":
            tokens = 64 + (i % 5) * 64
            r.observe("m", "prefill-tp1-pp1", "prefill", 2, 1e3 * truth(tokens), 2 * tokens, 2, p, d)
        else:
            b = 1 + i % 16
            r.observe("m", "decode-tp1-pp1", "decode", 5, 1e3 * truth(b), 5 * b, 5 * b, p, d)


def test_a_fleet_twice_as_slow_as_its_profile_gets_the_profile_doubled():
    r = CostRefiner(min_steps=50)
    feed(r, "decode", lambda b: 2 * (0.02 + 0.001 * b), None)
    feed(r, "prefill", lambda n: 0.5 * (0.01 + 1e-4 * n), None)
    props = {(m, s): (prof, k) for m, s, prof, k in r.proposals({("m", "decode-tp1-pp1"): STORED,
                                                                   ("m", "prefill-tp1-pp1"): STORED})}
    prof, k = props[("m", "decode-tp1-pp1")]
    assert k["decode"] == pytest.approx(2.0, rel=0.01) and prof["decode"]["base"] == pytest.approx(0.04, rel=0.01)
    assert prof["prefill"] == STORED["prefill"]  # no prefill steps on a decode shape: untouched
    prof, k = props[("m", "prefill-tp1-pp1")]
    assert k["prefill"] == pytest.approx(0.5, rel=0.01) and prof["prefill"]["b"] == pytest.approx(5e-5, rel=0.01)
    assert r.proposals({("m", "decode-tp1-pp1"): STORED}) == []  # the average restarted after a proposal


def test_agreement_within_tolerance_or_too_few_steps_proposes_nothing():
    r = CostRefiner(min_steps=50, tolerance=0.15)
    feed(r, "decode", lambda b: 1.1 * (0.02 + 0.001 * b), None)
    assert r.proposals({("m", "decode-tp1-pp1"): STORED}) == []
    r = CostRefiner(min_steps=10_000)
    feed(r, "decode", lambda b: 3 * (0.02 + 0.001 * b), None)
    assert r.proposals({("m", "decode-tp1-pp1"): STORED}) == []
    r.observe("m", "x", "colocated", 5, 10.0, 5, 5, PrefillCost(), DecodeCost())  # mixed steps: ignored
    assert ("m", "x", "decode") not in r.tracks


def test_decode_intervals_that_also_prefilled_do_not_skew_the_decode_model():
    """A decode worker prefilling locally (conditional disaggregation) has intervals whose steps computed
    prompt tokens too (tokens > sequences): slow, but not because decoding is. They are left out, so
    a fleet that decodes as profiled and sometimes prefills keeps its profile."""
    r = CostRefiner(min_steps=50)
    p, d = PrefillCost(**STORED["prefill"]), DecodeCost(**STORED["decode"])
    for i in range(200):
        b = 1 + i % 16
        if i % 3 == 0:  # 5 steps with a 500-token prompt among them: far slower than decoding alone
            r.observe("m", "decode-tp1-pp1", "decode", 5, 1e3 * (0.02 + 0.001 * b + 0.05), 5 * b + 500, 5 * b, p, d)
        else:
            r.observe("m", "decode-tp1-pp1", "decode", 5, 1e3 * (0.02 + 0.001 * b), 5 * b, 5 * b, p, d)
    assert r.tracks[("m", "decode-tp1-pp1", "decode")].steps == 5 * 133
    assert r.proposals({("m", "decode-tp1-pp1"): STORED}) == []
