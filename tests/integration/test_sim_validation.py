"""The simulator against the live cluster (issue 8's validation): the same workload, the same arrivals
and lengths, through a real 1P+1D cluster (etcd, coordinator with the `slo` policy, workers, gateway on
loopback; a small random-weight model) and through coordinator/simulator.py with the cost models
`cluster profile` stored, rescaled to the step times the workers' heartbeats reported during each
run's warm-up (what the coordinator's online refinement does). Predicted SLO attainment must be
within 15 points of measured well inside capacity, and within 20 near it.

The rates are fractions of the prefill worker's capacity as profiled at the start (one mean prompt per
step), and the SLOs multiples of the profiled costs, so the test asks the same on a fast and a slow
machine. "Near" is about half of it: the gateway, the workers' loops, the coordinator and the load
generator share the same 2 cores and take the rest. The model is wide enough that the workers' steps
(what the simulator models) outweigh that Python; what remains of it is calibrated on each run's
warm-up (`calibrate.predicted_attainment`)."""

import contextlib
import io
import os
import random
import types

import pytest
from live_cluster import LiveCluster, get_json

from cluster import bench, calibrate

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MIN_COUNTED, MIN_WARM = 200, 60  # requests per run counted / calibrating (about), whatever the rate...
MAX_DURATION, MAX_WARM = 20.0, 6.0  # ...up to this many seconds


def load_args(warmup: float, duration: float, ttft: float, tpot: float) -> types.SimpleNamespace:
    # the SLOs are sent with every request, so the live policy rejects what it cannot serve
    return types.SimpleNamespace(warmup=warmup, duration=duration, arrival="poisson", burstiness=1.0,
                                 dataset=None, prompt_tokens=128, prompt_sigma=0.5, output_tokens=16,
                                 output_sigma=0.5, max_prompt=400, max_output=64, ttft_ms=ttft * 1e3,
                                 tpot_ms=tpot * 1e3, send_slos=True, timeout=60)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    from helpers import make_tiny_model
    tmp = tmp_path_factory.mktemp("simval")
    # wider than the usual tiny model, so that the workers' steps (what the simulator models), not the
    # Python around them, are what fills up: a 128-token prompt is 30-70 ms of prefill on one core
    # (a 256-wide model's 10-20 ms put the rate at 45% near 40 req/s on a fast CPU, where the gateway
    # and the load generator took the cores and measured attainment swung by 25 points from run to run)
    model = make_tiny_model(tmp / "model", "llama", hidden_size=512, intermediate_size=1024)
    c = LiveCluster(tmp, model, worker_flags=("--kv-cache-memory", "8MiB", "--block-size", "4"))
    try:
        c.admin = c.coordinator("coord-0", "--policy", "slo").info["admin"]
        c.worker("prefill", "p0", wait=False)
        c.worker("decode", "d0", wait=False)
        c.gw = c.gateway(wait=False)
        c.wait_ready(c.gw)
        c.url, c.model = c.gw.info["url"], os.path.basename(str(model))
        args = types.SimpleNamespace(url=c.url, admin=c.admin, cluster="test", state_dir=None, reps=3)
        with contextlib.redirect_stdout(io.StringIO()):
            assert calibrate.profile(args) == 0
    except BaseException:
        print(c.logs())
        c.close()
        raise
    yield c
    c.close()


def measure(live, rate: float, seed: int, ttft: float, tpot: float) -> tuple[float, float]:
    """(measured, predicted) attainment of one run at `rate`."""
    # near capacity, long enough to count ~150-200 requests and to calibrate on ~40-60 (step times and
    # the residual TTFT come from the warm-up): a burst of arrivals costs more on the live cluster than
    # in the simulator (its 429s cascade), and one in a 10 s run moved attainment by up to 18 points.
    # Well inside capacity, fewer (the caps: at 5 req/s, ~30 and ~100), where the two agree more easily.
    args = load_args(min(MAX_WARM, max(3.0, MIN_WARM / rate)), min(MAX_DURATION, max(10.0, MIN_COUNTED / rate)),
                     ttft, tpot)
    beats: list = []
    samples, t0 = calibrate.run_watched(live.url, live.model, rate, args, random.Random(seed), live.admin, beats)
    counted = [s for s in samples if s.arrival >= args.warmup]
    measured = bench.summarize(rate, counted, args.duration, ttft, tpot)["attainment"]
    profiles = calibrate.calibrated(get_json(live.admin + "/v1/profiles"), beats, until=t0 + args.warmup)
    kv = next(w["kv_capacity_tokens"] for w in get_json(live.admin + "/v1/cluster")["workers"] if w["role"] == "decode")
    predicted = calibrate.predicted_attainment(profiles, live.model, 1, 1, kv, "slo", samples, args.warmup, ttft, tpot)
    return measured, predicted


def test_profile_splits_the_hop_from_the_step_cost(live):
    prof = get_json(live.admin + "/v1/profiles")[f"{live.model}/prefill-tp1-pp1"]
    assert prof["source"] == "cluster profile"
    p = prof["prefill"]
    assert p["a"] > 0 and p["b"] > 0 and p["hop"] > 0
    # a 128-token prompt: most of its TTFT is the worker's step on this model, not the hop
    assert p["a"] + 128 * p["b"] + 128 ** 2 * p["c"] > p["hop"]


# of P's profiled capacity: well inside; near saturation, where the simulator has been pessimistic by
# up to 16 points on a 2-core AMX machine since the CPU kernels made the workers' steps cheaper
# relative to the Python around them (12 runs of 2026-12-02 at 45%: -2 to +13 points without the
# kernels, +5 to +16 with them; docs/benchmarks.md)
@pytest.mark.parametrize("share,points", [(0.15, 0.15), (0.45, 0.20)])
def test_predicted_attainment_is_within_15_to_20_points_of_measured(live, share, points):
    from coordinator.planner import _costs
    pre, dec, _ = _costs(get_json(live.admin + "/v1/profiles"), live.model)
    rate = round(share / pre.seconds(128), 1)
    # a mean prompt's TTFT is about 1.2-1.5 of its step alone at these rates; a 400-token one ~3.5
    ttft = round(3 * (pre.seconds(128) + pre.hop), 4)
    tpot = round(3 * dec.step_seconds(8, 8 * 160), 4)  # 8 requests decoding together, mid-answer
    # a second run (other arrivals) when the first misses: the prediction is calibrated on the run's
    # own warm-up, and one warm-up slowed by something else on the 2 cores (in a full suite run of
    # 2026-12-03, at 15%: predicted 0.765 vs measured 0.915, where three runs alone were within 1-4
    # points) skews it for the whole run; two misses in a row fail
    runs = []
    for seed in (int(100 * share), int(100 * share) + 1):
        measured, predicted = measure(live, rate, seed, ttft, tpot)
        runs.append((measured, predicted))
        print(f"rate {rate:g} req/s ({share:.0%} of P's capacity), SLOs TTFT {ttft * 1e3:.0f} ms TPOT "
              f"{tpot * 1e3:.0f} ms: measured {measured:.3f}, predicted {predicted:.3f}")
        if abs(measured - predicted) <= points:
            break
    assert abs(measured - predicted) <= points, runs
