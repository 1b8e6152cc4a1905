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

from live_cluster import LiveCluster, get_json  # noqa: E402

from common.sampling import SamplingSpec  # noqa: E402
from common.worker_client import WorkerClient  # noqa: E402


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def direct_ttft(p: dict, d: dict, n: int) -> list[float]:
    c = WorkerClient()
    out = []
    for i in range(n):
        rid = f"direct-{i}"
        t0 = time.perf_counter()
        c.submit(p, rid, [5, 6, 7, 8, 9, 10, 11, 12], SamplingSpec(max_tokens=4, temperature=0.0, ignore_eos=True),
                 d)
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
                     SamplingSpec(max_tokens=4, temperature=0.0, ignore_eos=True), d)
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


class _StreamClient(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection that streams completions back to back, with as little
    client work as possible (prebuilt request bytes, no header or SSE parsing beyond the end marker),
    so the load generator costs a fraction of what the gateway does."""

    END = b"\r\n0\r\n\r\n"  # the last chunk of a chunked (streamed) response

    def __init__(self, requests: list[bytes], t_end: float, done: asyncio.Future):
        self.requests, self.t_end, self.done = requests, t_end, done
        self.buf = bytearray()
        self.count = self.k = 0
        self.errors = 0

    def connection_made(self, transport):
        self.transport = transport
        self._send()

    def _send(self):
        self.k += 1
        self.transport.write(self.requests[self.k % len(self.requests)])

    def data_received(self, data):
        self.buf += data
        if not self.buf.endswith(self.END):
            return
        if not self.buf.startswith(b"HTTP/1.1 200"):
            self.errors += 1
        self.buf.clear()
        self.count += 1
        if time.perf_counter() < self.t_end:
            self._send()
        elif not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc):
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"connection lost: {exc}"))


async def lean_throughput(url: str, model: str, concurrency: int, seconds: float) -> tuple[float, int]:
    """Streamed requests/s through the gateway with `concurrency` keep-alive connections."""
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    reqs = []
    for k in range(200):
        body = json.dumps({"model": model, "prompt": [5, 6, 7, 8, 9, 10, 11, 12, k + 3], "max_tokens": 4,
                           "temperature": 0.0, "ignore_eos": True, "stream": True}).encode()
        reqs.append(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (host.encode(), len(body), body))
    loop = asyncio.get_running_loop()
    t0 = time.perf_counter()
    t_end = t0 + seconds
    conns = []
    for i in range(concurrency):
        done = loop.create_future()
        _, proto = await loop.create_connection(lambda d=done, i=i: _StreamClient(reqs[i:] + reqs[:i], t_end, d),
                                                host, int(port))
        conns.append((proto, done))
    await asyncio.gather(*(d for _, d in conns))
    elapsed = time.perf_counter() - t0
    for proto, _ in conns:
        proto.transport.close()
    return sum(p.count for p, _ in conns) / elapsed, sum(p.errors for p, _ in conns)


def run_loop(coro):
    try:
        import uvloop
        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    import os
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
        # the same load from a lean client (it takes far less of the 2 cores than aiohttp's), and the
        # gateway's own CPU time per request: the rate one gateway process holds on a core of its own
        cpu0, t0 = cpu_seconds(gw.pid), time.perf_counter()
        lean_rps, lean_errors = run_loop(lean_throughput(gw.info["url"], model.name, a.concurrency, a.seconds))
        gw_cpu = cpu_seconds(gw.pid) - cpu0
        lean_done = lean_rps * (time.perf_counter() - t0)
    finally:
        live.close()
    res = {
        "direct_ttft_p50_ms": 1e3 * statistics.median(direct), "direct_ttft_p99_ms": 1e3 * pct(direct, 0.99),
        "gateway_ttft_p50_ms": 1e3 * statistics.median(via), "gateway_ttft_p99_ms": 1e3 * pct(via, 0.99),
        "added_ttft_p50_ms": 1e3 * (statistics.median(via) - statistics.median(direct)),
        "direct_requests_per_s": direct_rps, "gateway_requests_per_s": via_rps,
        "gateway_vs_direct_throughput": via_rps / direct_rps,
        "lean_client_requests_per_s": lean_rps, "lean_client_errors": lean_errors,
        "gateway_cpu_ms_per_request": 1e3 * gw_cpu / max(lean_done, 1),
        "gateway_requests_per_core_s": lean_done / max(gw_cpu, 1e-9),
        "concurrency": a.concurrency, "tokens_per_request": 4,
    }
    print(f"TTFT p50: direct {res['direct_ttft_p50_ms']:.2f} ms, through the gateway {res['gateway_ttft_p50_ms']:.2f} ms "
          f"(+{res['added_ttft_p50_ms']:.2f} ms; target <= 2 ms)")
    print(f"streamed requests/s at concurrency {a.concurrency}: direct {direct_rps:.0f}, gateway {via_rps:.0f} "
          f"({res['gateway_vs_direct_throughput']:.2f}x; target >= 1,000/s)")
    print(f"with a lean client: {lean_rps:.0f} streamed requests/s ({lean_errors} errors); the gateway used "
          f"{res['gateway_cpu_ms_per_request']:.3f} ms of CPU per request = "
          f"{res['gateway_requests_per_core_s']:.0f} requests per core-second")
    print(json.dumps(res))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
