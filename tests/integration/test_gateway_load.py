"""200 concurrent streaming clients for 60 s against a live cluster on the tiny model: no request
fails, and the gateway's memory is flat (bounded) over the run."""

import asyncio
import json
import os
import time

import aiohttp
import pytest
from live_cluster import LiveCluster

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CLIENTS = 200
DURATION_S = float(os.environ.get("TANDEM_LOAD_SECONDS", "60"))


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def test_200_streaming_clients_for_60_s_no_failures_and_flat_gateway_memory(tmp_path, tiny_llama):
    live = LiveCluster(tmp_path, tiny_llama, worker_flags=("--kv-cache-memory", "16MiB", "--block-size", "16"))
    try:
        live.coordinator()
        live.worker("prefill", "p0", wait=False)
        live.worker("decode", "d0", wait=False)
        gw = live.gateway(wait=False)
        live.wait_ready(gw)
        url = gw.info["url"] + "/v1/completions"
        model = os.path.basename(str(tiny_llama))
        stats = {"ok": 0, "failed": 0, "tokens": 0, "errors": []}
        rss = []

        async def client(session, i, stop_at):
            n = 0
            while time.monotonic() < stop_at:
                n += 1
                body = {"model": model, "prompt": f"client {i} request {n}: the", "max_tokens": 8 + (i + n) % 8,
                        "temperature": 0.8, "seed": i * 1000 + n, "stream": True, "ignore_eos": True}
                try:
                    async with session.post(url, json=body) as r:
                        if r.status != 200:
                            raise RuntimeError(f"HTTP {r.status}: {await r.text()}")
                        tokens, done = 0, False
                        async for line in r.content:
                            if line.startswith(b"data: [DONE]"):
                                done = True
                            elif line.startswith(b"data: "):
                                ev = json.loads(line[6:])
                                if "error" in ev:
                                    raise RuntimeError(ev["error"]["message"])
                                tokens += len(ev["choices"][0]["text"]) > 0 or ev["choices"][0]["finish_reason"] is None
                        if not done:
                            raise RuntimeError("stream ended without [DONE]")
                    stats["ok"] += 1
                except Exception as e:  # every failure is counted and shown
                    stats["failed"] += 1
                    stats["errors"].append(repr(e)[:200])

        async def sample_rss(stop_at):
            while time.monotonic() < stop_at:
                rss.append((time.monotonic(), rss_mib(gw.pid)))
                await asyncio.sleep(1.0)

        async def main():
            timeout = aiohttp.ClientTimeout(total=120)
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as s:
                stop_at = time.monotonic() + DURATION_S
                await asyncio.gather(sample_rss(stop_at), *(client(s, i, stop_at) for i in range(CLIENTS)))
        t0 = time.monotonic()
        asyncio.run(main())
        elapsed = time.monotonic() - t0
        print(f"{stats['ok']} requests in {elapsed:.0f} s ({stats['ok'] / elapsed:.0f}/s), {stats['failed']} failed")
        assert stats["failed"] == 0, stats["errors"][:5]
        assert stats["ok"] >= CLIENTS
        # memory: after the first third (warm: buffers, sockets, caches) the RSS stays within 10 %
        warm = [m for t, m in rss if t - rss[0][0] >= DURATION_S / 3]
        assert warm and max(warm) <= 1.10 * warm[0] + 5, f"gateway RSS grew: {[round(m) for _, m in rss]}"
        assert gw.alive() and all(p.alive() for p in live.procs)
    except BaseException:
        print(live.logs())
        raise
    finally:
        live.close()
