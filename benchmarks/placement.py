"""Placement speed: placements/s and p50/p99 latency of each policy with 10, 100 and 1,000 workers.

    python benchmarks/placement.py [--workers 10 100 1000] [--placements 2000]

Synthetic live view (half prefill, half decode workers, random queues and running batches), built
through coordinator.live_view.LiveView exactly as the coordinator does: each placement reads the
view's states, runs the policy and records the placement. Target (issue: coordinator): >= 10,000
placements/s and p99 <= 1 ms at 1,000 workers.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.registry import Load, WorkerInfo  # noqa: E402
from coordinator.live_view import LiveView  # noqa: E402
from coordinator.policy import PlacementRequest, Rejection, make_policy  # noqa: E402


def build(n: int, seed: int = 0) -> LiveView:
    rng = random.Random(seed)
    v = LiveView(suspect_after=1e9)
    for i in range(n):
        role = "prefill" if i % 2 == 0 else "decode"
        wid = f"{role[0]}{i}"
        v.registered(WorkerInfo(wid, role, "m", 1, 1, 16, 65536, "tcp://x", [], {}, 1, 0.1), now=0.0)
        v.heartbeat(Load(wid, 0.0, rng.randrange(0, 8), rng.randrange(0, 32), rng.randrange(100, 4096), 4096,
                         20.0, 10, 0, rng.randrange(0, 4000)), now=0.0)
    return v


def run(policy_name: str, n: int, placements: int) -> dict:
    v = build(n)
    policy = make_policy(policy_name)
    rng = random.Random(1)
    lat = []
    rejected = 0
    t_all = time.perf_counter()
    for k in range(placements):
        req = PlacementRequest(rng.randrange(16, 2048), rng.randrange(16, 256), ttft_slo=5.0, tpot_slo=1.0)
        t0 = time.perf_counter()
        got = policy.place(req, v.prefill_states(0.0), v.decode_states(0.0))
        if isinstance(got, Rejection):
            rejected += 1
        else:
            v.placed(got, req, now=float(k))
        lat.append(time.perf_counter() - t0)
        if k % 50 == 49:  # heartbeats keep arriving: pending placements get confirmed
            for wid in list(v.workers)[: max(1, n // 10)]:
                w = v.workers[wid]
                v.heartbeat(w.load, now=float(k), sampled_at=float(k))
    total = time.perf_counter() - t_all
    lat.sort()
    return {"policy": policy_name, "workers": n, "placements_per_s": round(placements / total),
            "p50_ms": round(lat[len(lat) // 2] * 1e3, 3), "p99_ms": round(lat[int(len(lat) * 0.99)] * 1e3, 3),
            "rejected": rejected}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--placements", type=int, default=2000)
    ap.add_argument("--policies", nargs="+", default=["slo", "least-loaded", "round-robin"])
    ap.add_argument("--out", default="bench_results/placement.json")
    args = ap.parse_args()
    rows = [run(p, n, args.placements) for n in args.workers for p in args.policies]
    for r in rows:
        print(json.dumps(r))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
