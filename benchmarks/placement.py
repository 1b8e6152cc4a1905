"""Placement speed: placements/s and p50/p99 latency of each policy with 10, 100 and 1,000 workers.

    python benchmarks/placement.py [--workers 10 100 1000] [--placements 2000]
                                   [--paths indexed scan] [--profiles shared own]

A synthetic live view (half prefill, half decode workers, random queues and running batches), built
through coordinator.live_view.LiveView as the coordinator builds it. Each placement is
`LiveView.place`, the function the coordinator's leader calls per request: choose, then count the
placement against its workers. Heartbeats keep arriving (a tenth of the workers every 50
placements), so placements get confirmed; their cost is reported apart (`heartbeat_us`).

- path `indexed`: the policies' `place_in` on the view's indexes (what the coordinator runs);
  `scan`: their reference `place` on full lists of states (what it ran before).
- profiles `shared`: every worker the default cost model; `own`: each worker its own, as start-up
  profiles give (the defaults times 0.7-1.3 per coefficient), so no two rank alike.

Target (issue: coordinator): >= 10,000 placements/s and p99 <= 1 ms at 1,000 workers.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.kv_layout import KVLayoutSpec  # noqa: E402
from common.registry import Load, WorkerInfo  # noqa: E402
from coordinator.live_view import LiveView  # noqa: E402
from coordinator.policy import DecodeCost, PlacementRequest, PrefillCost, Rejection, make_policy  # noqa: E402


def own_profile(rng: random.Random) -> dict:
    f = lambda x: x * rng.uniform(0.7, 1.3)  # noqa: E731
    p, d = PrefillCost(), DecodeCost()
    return {"prefill": {"a": f(p.a), "b": f(p.b), "c": f(1e-8)},
            "decode": {"base": f(d.base), "per_seq": f(d.per_seq), "per_token": f(d.per_token)}}


def build(n: int, profiles: str, seed: int = 0) -> LiveView:
    rng = random.Random(seed)
    v = LiveView(suspect_after=1e9)
    for i in range(n):
        role = "prefill" if i % 2 == 0 else "decode"
        wid = f"{role[0]}{i}"
        profile = own_profile(rng) if profiles == "own" else {}
        v.registered(WorkerInfo(wid, role, "m", 1, 1, 16, 65536, "tcp://x", [], KVLayoutSpec(30, 3, 64, 16, "float32"), 1, 0.1, profile), now=0.0)
        v.heartbeat(Load(wid, 0.0, rng.randrange(0, 8), rng.randrange(0, 32), rng.randrange(100, 4096), 4096,
                         20.0, 10, 0, rng.randrange(0, 4000)), now=0.0)
    return v


def run(policy_name: str, n: int, placements: int, path: str, profiles: str) -> dict:
    v = build(n, profiles)
    policy = make_policy(policy_name)
    rng = random.Random(1)
    lat, beats = [], []
    rejected = 0
    t_all = time.perf_counter()
    for k in range(placements):
        req = PlacementRequest(rng.randrange(16, 2048), rng.randrange(16, 256), ttft_slo=5.0, tpot_slo=1.0)
        t0 = time.perf_counter()
        got, _ = v.place(policy, req, now=float(k), scan=path == "scan")
        lat.append(time.perf_counter() - t0)
        rejected += isinstance(got, Rejection)
        if k % 50 == 49:  # heartbeats keep arriving: pending placements get confirmed
            t0 = time.perf_counter()
            wids = list(v.workers)[: max(1, n // 10)]
            for wid in wids:
                v.heartbeat(v.workers[wid].load, now=float(k), sampled_at=float(k))
            beats.append((time.perf_counter() - t0) / len(wids))
    total = time.perf_counter() - t_all
    lat.sort()
    return {"policy": policy_name, "workers": n, "path": path, "profiles": profiles,
            "placements_per_s": round(placements / total),
            "p50_ms": round(lat[len(lat) // 2] * 1e3, 3), "p99_ms": round(lat[int(len(lat) * 0.99)] * 1e3, 3),
            "max_ms": round(lat[-1] * 1e3, 3), "heartbeat_us": round(sum(beats) / max(1, len(beats)) * 1e6, 1),
            "rejected": rejected}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--placements", type=int, default=2000)
    ap.add_argument("--policies", nargs="+", default=["slo", "least-loaded", "round-robin"])
    ap.add_argument("--paths", nargs="+", default=["indexed", "scan"], choices=["indexed", "scan"])
    ap.add_argument("--profiles", nargs="+", default=["shared", "own"], choices=["shared", "own"])
    ap.add_argument("--out", default="bench_results/placement.json")
    args = ap.parse_args()
    rows = []
    for profiles in args.profiles:
        for n in args.workers:
            for p in args.policies:
                for path in args.paths:
                    rows.append(run(p, n, args.placements, path, profiles))
                    print(json.dumps(rows[-1]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
