"""`cluster profile`, and the simulator against live runs: the workers' step costs fitted to what
their heartbeats report while a load generator (cluster/bench.py) drives the gateway, stored for the
coordinator (GET/PUT /v1/profiles); those costs rescaled to a run's heartbeats (`calibrated`, the
coordinator's online refinement applied at once); and the SLO attainment the simulator predicts for
a run (`predicted_attainment`), which tests/integration/test_sim_validation.py and
benchmarks/serving.py hold against the measured one. Torch-free.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import sys
import time
import urllib.error
import urllib.request

from cluster.bench import Sample, one, pct, run_rate


def predicted_attainment(profiles: dict, model: str, prefill: int, decode: int, kv_tokens: int, policy: str,
                         samples: list[Sample], warmup: float, ttft_slo: float, tpot_slo: float) -> float:
    """What the simulator (coordinator/simulator.py, with the coordinator's policy code) predicts for a
    run: the same arrivals and lengths (warm-up included, counted from its end), the stored cost models
    of `model` (GET /v1/profiles), `prefill` + `decode` workers of `kv_tokens` KV each.

    What the simulator leaves out (the CPU that the gateway, placement, the workers' loops and the
    load generator take from the cores the workers share, which grows with the rate) is taken from the
    warm-up, as the step times are (`calibrated`): each warm-up request's measured TTFT minus the
    simulated one is a sample of it, and a counted request meets its TTFT SLO with the probability
    that its simulated TTFT plus one of those samples does. Without completed warm-up requests the
    simulator's own TTFT stands. The samples come from the start of the run, so the prediction is only
    as good as the warm-up is like the rest (near capacity, later queues may add more than it saw)."""
    from coordinator.planner import _costs
    from coordinator.simulator import SimCluster, simulate

    pre, dec, _ = _costs(profiles, model)
    reqs = simulate(SimCluster([pre] * prefill, [dec] * decode, kv_tokens, policy=policy),
                    [(s.arrival, s.prompt_tokens, s.output_tokens) for s in samples], ttft_slo, tpot_slo)
    residual = [s.ttft - r.ttft for r, s in zip(reqs, samples)
                if s.arrival < warmup and s.ttft is not None and r.ttft is not None] or [0.0]
    counted = [r for r, s in zip(reqs, samples) if s.arrival >= warmup]
    if not counted:
        return 0.0
    met = 0.0
    for r in counted:
        if r.rejected or r.ttft is None or r.tpot is None or r.tpot > r.tpot_slo:
            continue
        met += sum(r.ttft + x <= r.ttft_slo for x in residual) / len(residual)
    return met / len(counted)


# ---- cluster profile -------------------------------------------------------------------------------
# Prefill: the worker's step cost a + b·n + c·n² is fitted to what its own heartbeats report (mean step
# time at tokens per step) while prompts of one length at a time go through the gateway, each alone;
# the hop (what a request pays outside the worker's steps: gateway, placement, reservation at D, the
# first token's way back) is the rest of its TTFT. Decode: the step time at B streams decoding together
# is their TPOT.
def heartbeats(admin: str, stop, out: list) -> None:
    """Collects every worker's heartbeats with steps in them, as the coordinator at `admin` lists them
    ((worker record, load) pairs, each load once), until `stop` (a threading.Event) is set."""
    seen = set()
    while not stop.is_set():
        try:
            with urllib.request.urlopen(admin + "/v1/cluster", timeout=5) as r:
                view = json.loads(r.read())
        except (OSError, ValueError):
            view = {"workers": []}
        for w in view.get("workers", []):
            ld = w.get("load") or {}
            if ld.get("steps") and (w["worker_id"], ld["ts"]) not in seen:
                seen.add((w["worker_id"], ld["ts"]))
                out.append((w, ld))
        stop.wait(0.05)


def run_watched(url: str, model: str, rate: float, args, rng, admin: str | None = None,
                beats: list | None = None) -> tuple[list, float]:
    """One `run_rate` (all samples, warm-up included) and its start (wall clock), collecting the
    workers' heartbeats from the coordinator at `admin` into `beats` meanwhile (when given)."""
    import threading
    stop = threading.Event()
    poller = None
    if beats is not None:
        poller = threading.Thread(target=heartbeats, args=(admin, stop, beats), daemon=True)
        poller.start()
    t0 = time.time()
    try:
        samples = asyncio.run(run_rate(url, model, rate, args, rng))
    finally:
        stop.set()
        if poller is not None:
            poller.join(10)
    return samples, t0


def calibrated(profiles: dict, beats: list[tuple[dict, dict]], since: float = 0.0, until: float = math.inf) -> dict:
    """The stored profiles (GET /v1/profiles) rescaled to the step times the workers' heartbeats
    (taken in [since, until), wall clock) report: the coordinator's online refinement
    (coordinator/costs.py) applied at once. A busy host runs steps slower than an idle profile says."""
    from coordinator.costs import CostRefiner
    from coordinator.planner import _costs

    ref = CostRefiner(min_steps=1, tolerance=0.0)
    for w, ld in beats:
        if since <= ld["ts"] < until:
            shape = f"{w['role']}-tp{w['tp']}-pp{w['pp']}"
            pre, dec, _ = _costs({k: v for k, v in profiles.items() if k.startswith(w["model"] + "/")}, w["model"])
            ref.observe(w["model"], shape, w["role"], ld["steps"], ld["step_ms"], ld.get("tokens", 0),
                        ld.get("seqs", 0), pre, dec)
    stored = {tuple(k.rsplit("/", 1)): v for k, v in profiles.items()}
    out = dict(profiles)
    for model, shape, prof, _ in ref.proposals(stored):
        out[f"{model}/{shape}"] = prof
    return out


async def _profile_measure(url: str, model: str, lengths: list[int], batches: list[int], reps: int,
                           min_seconds: float = 0.6) -> tuple:
    import aiohttp

    rng = random.Random(0)
    pre, dec = [], []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=600)) as session:
        for n in lengths:  # one prompt at a time, for at least a few heartbeats per length
            t0, k = time.perf_counter(), 0
            while k < reps or time.perf_counter() - t0 < min_seconds:
                s = Sample(0.0, n, 1)
                await one(session, url, model, [rng.randrange(10, 250) for _ in range(n)], 2, s, time.perf_counter())
                if s.ttft is not None:
                    pre.append((n, s.ttft))
                k += 1
            await asyncio.sleep(0.25)  # a heartbeat with this length's steps only
        for b in batches:  # B streams decoding together: their TPOT is the step time
            ss = [Sample(0.0, 8, 32) for _ in range(b)]
            t0 = time.perf_counter()
            await asyncio.gather(*(one(session, url, model, [rng.randrange(10, 250) for _ in range(8)], 32, s, t0)
                                   for s in ss))
            # TPOT, not the gaps between stream events: a gateway writes the tokens of one loop turn
            # in one event, so some gaps hold several steps and others none
            tpots = [s.tpot for s in ss if s.tpot is not None]
            if tpots:
                dec.append((b, pct(tpots, 0.5)))
    return pre, dec


def fit_prefill(steps: list[tuple[float, float, int]], ttfts: list[tuple[int, float]]) -> dict:
    """{a, b, c, hop}: a + b·n + c·n² fitted (weighted by steps) to (tokens per step, step seconds, steps)
    samples, c dropped if negative and a, b clamped non-negative; hop the median TTFT left over."""
    import numpy as np

    xs, ys, ws = (np.array([t[i] for t in steps], dtype=float) for i in range(3))
    if len(set(xs.round())) >= 3:
        c, b, a = np.polyfit(xs, ys, 2, w=np.sqrt(ws))
    else:
        c = -1.0
    if c < 0:
        c = 0.0
        b, a = np.polyfit(xs, ys, 1, w=np.sqrt(ws)) if len(set(xs.round())) >= 2 else (0.0, float(np.mean(ys)))
    a, b = max(float(a), 1e-4), max(float(b), 1e-8)
    rest = sorted(t - (a + b * n + c * n * n) for n, t in ttfts)
    return {"a": a, "b": b, "c": float(c), "hop": max(rest[len(rest) // 2], 0.0) if rest else 0.0}


def profile(args) -> int:
    import threading

    import numpy as np

    from cluster.ops import read_state
    try:
        st = read_state(args)
    except RuntimeError as e:
        if not (args.url and args.admin):
            print(f"error: {e} (or pass --url and --admin)", file=sys.stderr)
            return 1
        st = {}
    url, admin = (args.url or st["url"]).rstrip("/"), (args.admin or st["admin"]).rstrip("/")
    with urllib.request.urlopen(url + "/v1/models", timeout=10) as r:
        m = json.loads(r.read())["data"][0]
    model, max_len = m["id"], m.get("max_model_len", 2048)
    with urllib.request.urlopen(admin + "/v1/cluster", timeout=10) as r:
        view = json.loads(r.read())
    shapes, ids = {}, {}
    for w in view["workers"]:
        if w["model"] == model and w["role"] in ("prefill", "decode") and w["role"] not in shapes:
            shapes[w["role"]], ids[w["role"]] = f"{w['role']}-tp{w['tp']}-pp{w['pp']}", w["worker_id"]
    if set(shapes) != {"prefill", "decode"}:
        print("error: the cluster needs a prefill and a decode worker of the model to profile", file=sys.stderr)
        return 1
    if sum(w["role"] == "prefill" and w["model"] == model for w in view["workers"]) > 1:
        print("note: several prefill workers: the gateway spreads the probes; heartbeats of "
              f"{ids['prefill']} only are fitted", file=sys.stderr)
    lengths = sorted({min(n, max_len - 4) for n in (16, 64, 256, 1024)})
    seen, stop = [], threading.Event()
    poller = threading.Thread(target=heartbeats, args=(admin, stop, seen), daemon=True)
    poller.start()
    try:
        pre, dec = asyncio.run(_profile_measure(url, model, lengths, [1, 4, 16], args.reps))
    finally:
        stop.set()
        poller.join(10)
    beats = [(ld["tokens"] / ld["steps"], ld["step_ms"] / 1e3, ld["steps"]) for w, ld in seen
             if w["worker_id"] == ids["prefill"] and ld.get("tokens")]
    if not beats or not pre:
        print("error: no prefill steps seen in the heartbeats (is the prefill worker heartbeating?)", file=sys.stderr)
        return 1
    prefill = fit_prefill(beats, pre)
    per_seq, base = np.polyfit([b_ for b_, _ in dec], [t for _, t in dec], 1) if len(dec) > 1 else (0.0, dec[0][1])
    decode = {"base": max(float(base), 1e-4), "per_seq": max(float(per_seq), 0.0), "per_token": 1e-8}
    out = {}
    for role, prof in (("prefill", {"prefill": prefill}), ("decode", {"decode": decode})):
        req = urllib.request.Request(f"{admin}/v1/profiles/{model}/{shapes[role]}", method="PUT",
                                     data=json.dumps({**prof, "source": "cluster profile"}).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                out[shapes[role]] = json.loads(r.read())
        except urllib.error.HTTPError as e:
            print(f"error: storing {shapes[role]}: {json.loads(e.read())['error']['message']}", file=sys.stderr)
            return 1
    print(json.dumps({"model": model, "profiles": out,
                      "measured": {"prefill_ttft_s": pre, "prefill_steps": beats, "decode_step_s": dec}},
                     indent=1))
    return 0
