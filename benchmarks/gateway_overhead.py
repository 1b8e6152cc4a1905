"""Gateway overhead: what the gateway + coordinator hop adds to TTFT, and streamed requests/s through
one gateway process, against calling the prefill/decode path directly (a WorkerClient sending
PrefillRequests to P with D's address, as the gateway does, minus HTTP and placement).

    python benchmarks/gateway_overhead.py [--requests 300] [--concurrency 64] [--seconds 10]

A tiny random-weight model (1 layer) so the model is not the bottleneck; every process is real
(etcd, coordinator, P, D, gateway on loopback). Both paths run in the same session on the same
processes. Targets (issue: gateway): <= 2 ms added p50 TTFT, >= 1,000 streamed requests/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from cluster.worker_client import WorkerClient  # noqa: E402
from live_cluster import LiveCluster, get_json  # noqa: E402


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def direct_ttft(p: dict, d: dict, n: int) -> list[float]:
    c = WorkerClient()
    out = []
    for i in range(n):
        rid = f"direct-{i}"
        t0 = time.perf_counter()
        c.submit(p, rid, [5, 6, 7, 8, 9, 10, 11, 12], {"max_tokens": 4, "temperature": 0.0, "ignore_eos": True}, d)
        c.collect(timeout=30, until=lambda r=rid: bool(c.streams[r].token_ids))
        out.append(time.perf_counter() - t0)
        c.collect(timeout=30, until=lambda r=rid: c.streams[r].finish_reason is not None)
    c.close()
    return out


def direct_throughput(p: dict, d: dict, concurrency: int, seconds: float) -> float:
    c = WorkerClient()
    done, k = 0, 0
    inflight: set[str] = set()
    t_end = time.perf_counter() + seconds
    t0 = time.perf_counter()
    while time.perf_counter() < t_end:
        while len(inflight) < concurrency:
            rid = f"tp-{k}"
            k += 1
            c.submit(p, rid, [5, 6, 7, 8, 9, 10, 11, 12, k % 200 + 3],
                     {"max_tokens": 4, "temperature": 0.0, "ignore_eos": True}, d)
            inflight.add(rid)
        c.collect(timeout=1.0, until=lambda: any(c.streams[r].finish_reason for r in inflight))
        finished = {r for r in inflight if c.streams[r].finish_reason}
        done += len(finished)
        inflight -= finished
        for r in finished:
            del c.streams[r]
    elapsed = time.perf_counter() - t0
    c.close()
    return done / elapsed


async def gateway_run(url: str, model: str, n: int, concurrency: int, seconds: float) -> tuple[list[float], float]:
    import aiohttp

    body = {"model": model, "prompt": [5, 6, 7, 8, 9, 10, 11, 12], "max_tokens": 4, "temperature": 0.0,
            "ignore_eos": True, "stream": True}

    async def one(session, prompt=None) -> float:
        t0 = time.perf_counter()
        ttft = None
        async with session.post(url + "/v1/completions", json=body if prompt is None else {**body, "prompt": prompt}) as r:
            async for line in r.content:
                if ttft is None and line.startswith(b"data: {"):
                    ttft = time.perf_counter() - t0
        return ttft

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        ttfts = [await one(s) for _ in range(n)]
        done = 0
        t_end = time.perf_counter() + seconds

        async def loop(i):
            nonlocal done
            k = 0
            while time.perf_counter() < t_end:
                k += 1
                await one(s, [5, 6, 7, 8, 9, 10, 11, 12, (i * 7 + k) % 200 + 3])
                done += 1
        t0 = time.perf_counter()
        await asyncio.gather(*(loop(i) for i in range(concurrency)))
        return ttfts, done / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=300, help="sequential requests for TTFT")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--json", default=None, help="write the results here too")
    a = ap.parse_args()

    from helpers import make_tiny_model
    tmp = Path(tempfile.mkdtemp(prefix="tandem-gw-bench-"))
    model = make_tiny_model(tmp / "tiny", num_hidden_layers=1)
    live = LiveCluster(tmp, model, worker_flags=("--kv-cache-memory", "16MiB", "--block-size", "16"))
    try:
        coord = live.coordinator()
        p = live.worker("prefill", "p0")
        d = live.worker("decode", "d0")
        gw = live.gateway()
        live.wait_ready(gw)
        for _ in range(50):
            if all(w["state"] == "live" for w in get_json(coord.info["admin"] + "/v1/cluster")["workers"]):
                break
            time.sleep(0.1)
        direct = direct_ttft(p.info, d.info, a.requests)
        direct_rps = direct_throughput(p.info, d.info, a.concurrency, a.seconds)
        via, via_rps = asyncio.run(gateway_run(gw.info["url"], model.name, a.requests, a.concurrency, a.seconds))
    finally:
        live.close()
    res = {
        "direct_ttft_p50_ms": 1e3 * statistics.median(direct), "direct_ttft_p99_ms": 1e3 * pct(direct, 0.99),
        "gateway_ttft_p50_ms": 1e3 * statistics.median(via), "gateway_ttft_p99_ms": 1e3 * pct(via, 0.99),
        "added_ttft_p50_ms": 1e3 * (statistics.median(via) - statistics.median(direct)),
        "direct_requests_per_s": direct_rps, "gateway_requests_per_s": via_rps,
        "gateway_vs_direct_throughput": via_rps / direct_rps,
        "concurrency": a.concurrency, "tokens_per_request": 4,
    }
    print(f"TTFT p50: direct {res['direct_ttft_p50_ms']:.2f} ms, through the gateway {res['gateway_ttft_p50_ms']:.2f} ms "
          f"(+{res['added_ttft_p50_ms']:.2f} ms; target <= 2 ms)")
    print(f"streamed requests/s at concurrency {a.concurrency}: direct {direct_rps:.0f}, gateway {via_rps:.0f} "
          f"({res['gateway_vs_direct_throughput']:.2f}x; target >= 1,000/s)")
    print(json.dumps(res))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
